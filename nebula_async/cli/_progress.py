"""The CLI's progress bar: done / total, failed, images, 429s, rate and ETA on stderr."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Self, TextIO

from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

__all__ = ["JobProgress", "progress_wanted"]


def progress_wanted(*, disabled_by_user: bool, stream: TextIO | None = None) -> bool:
    """Show a bar only on a terminal (never in logs or pipes) and unless switched off."""
    stream = sys.stderr if stream is None else stream
    if disabled_by_user:
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class JobProgress:
    """Counts finished jobs, with a tqdm bar when ``enabled``.

    tqdm shows n/total, the rate (jobs/s) and the ETA; the postfix adds failed
    jobs, images gathered and rate-limit answers (429s) seen so far. The counts
    are kept even when the bar is hidden.
    """

    def __init__(self, total: int, *, enabled: bool, initial: int = 0) -> None:
        self.done = 0
        self.failed = 0
        self.images = 0
        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="job",
            desc="jobs",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            smoothing=0.05,
        )

    def job_finished(self, *, ok: bool, images: int, rate_limited: int | None = None) -> None:
        """Record one finished job and refresh the bar (tqdm throttles redraws)."""
        self.done += 1
        self.images += images
        if not ok:
            self.failed += 1
        postfix = {"failed": self.failed, "images": self.images}
        if rate_limited:
            postfix["429s"] = rate_limited
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Draw the final state and release the terminal line."""
        self._bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
