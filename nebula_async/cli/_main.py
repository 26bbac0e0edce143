"""The ``nebula-async`` command line: ``run``, ``demo``, ``submit`` and ``mock-server``.

Credentials and the API address come from the environment (``NEBULA_TOKEN``, or
``NEBULA_USERNAME`` and ``NEBULA_PASSWORD``; ``NEBULA_BASE_URL``), never from
flags, so they stay out of shell history and process listings.

Exit codes: 0 every job ok, 1 some job failed (all recorded; with ``--download``
a job whose images are not all saved counts as failed), 2 bad usage or bad input
(nothing sent; also a results file written from another jobs file), 3 the
results file could not be written (the run stopped), 130 / 143 drained after
SIGINT / SIGTERM (every answer received is on disk).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from nebula_async import __version__
from nebula_async._exceptions import ValidationError
from nebula_async._jobs import job_fingerprint
from nebula_async._models import Job

from ._download import ImageDownloader, api_is_loopback
from ._execute import job_results
from ._jobfile import Shard, job_from_fields
from ._results import download_record, error_record, job_result_record
from ._runner import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOME_FAILED,
    ClientSettings,
    RunOptions,
    cli_message,
    prepare_download_dir,
    run_command,
)

__all__ = ["build_parser", "main"]

_PROG = "nebula-async"
_ENV_HELP = (
    "credentials come from NEBULA_TOKEN (or NEBULA_USERNAME and NEBULA_PASSWORD); "
    "the API address from NEBULA_BASE_URL unless --base-url is given"
)


# -- flag types ---------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _shard(text: str) -> Shard:
    index, slash, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        shard = None
    if not slash or shard is None or not 0 <= shard.index < shard.count:
        raise argparse.ArgumentTypeError(
            f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}"
        ) from None
    return shard


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


# -- the parser ---------------------------------------------------------------------------


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def _add_client_arguments(parser: argparse.ArgumentParser, *, concurrency: bool) -> None:
    add = parser.add_argument
    if concurrency:
        add("--concurrency", type=_int_at_least(1), default=16, metavar="N",
            help="requests in flight at once (default: 16)")  # fmt: skip
    add("--rate", type=_positive_float, default=None, metavar="R",
        help="at most R requests per second; adaptive: it slows down on 429s and "
             "probes back up to R (default: no limit until a 429, then adaptive)")  # fmt: skip
    add("--burst", type=_int_at_least(1), default=1, metavar="B",
        help="sends allowed at once after an idle spell, within --rate (default: 1)")  # fmt: skip
    add("--no-adaptive", dest="adaptive", action="store_false",
        help="keep --rate fixed: never slow down on 429s")  # fmt: skip
    add("--redis", default=None, metavar="URL", dest="redis_url",
        help="share --rate with every process given the same --redis and --limit-key "
             "(redis://HOST:6379/0; needs the redis extra)")  # fmt: skip
    add("--limit-key", default=None, metavar="NAME",
        help="the name of the shared limit in --redis (e.g. the account)")  # fmt: skip
    add("--retries", type=_int_at_least(0), default=3, metavar="K",
        help="retries after the first attempt of each submission (default: 3)")  # fmt: skip
    add("--retry-ambiguous", action=argparse.BooleanOptionalAction, default=True,
        help="also retry failures where the request may have been processed (and "
             "billed); --no-retry-ambiguous retries only connect errors, 429 and 503 "
             "(default: on)")  # fmt: skip
    add("--timeout", type=_positive_float, default=120.0, metavar="S",
        help="seconds for one HTTP attempt (default: 120)")  # fmt: skip
    add("--payload-style", choices=("dotted", "nested", "flat"), default="dotted",
        help="wire form of the request fields (default: dotted)")  # fmt: skip
    add("--base-url", default=None, metavar="URL",
        help="API address (default: $NEBULA_BASE_URL, else https://ai-nebula.com)")  # fmt: skip
    add("--allow-insecure-http", action="store_true",
        help="accept an http:// API address that is not loopback (the token then "
             "travels unencrypted)")  # fmt: skip
    add("--trust-env", action="store_true",
        help="use HTTP_PROXY / HTTPS_PROXY / NO_PROXY from the environment")  # fmt: skip
    add("--header", type=_header, action="append", default=[], metavar="NAME=VALUE",
        help="an extra header on every request, e.g. an API gateway key (repeatable)")  # fmt: skip


def _client_settings(args: argparse.Namespace) -> ClientSettings:
    return ClientSettings(
        concurrency=getattr(args, "concurrency", 1),
        rate=args.rate,
        retries=args.retries,
        timeout=args.timeout,
        payload_style=args.payload_style,
        base_url=args.base_url,
        burst=args.burst,
        adaptive=args.adaptive,
        retry_ambiguous=args.retry_ambiguous,
        trust_env=args.trust_env,
        allow_insecure_http=args.allow_insecure_http,
        headers=tuple(args.header),
        redis_url=args.redis_url,
        limit_key=args.limit_key,
    )


def _logging_parent() -> argparse.ArgumentParser:
    """``-v`` and ``--log-level``, shared by every subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("logging")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="log the library's events to stderr: -v INFO (pauses, rate "
                            "changes, re-logins), -vv DEBUG (every retry)")  # fmt: skip
    group.add_argument("--log-level", type=_log_level, default=None, metavar="LEVEL",
                       help="the same by name: DEBUG, INFO, WARNING (default), ERROR")  # fmt: skip
    return parent


def _log_level(text: str) -> int:
    level = logging.getLevelNamesMapping().get(text.upper())
    if level is None or text.upper() in ("NOTSET", "WARN", "FATAL"):
        raise argparse.ArgumentTypeError(
            f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {text!r}"
        )
    return level


def _add_run_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        parents=[_logging_parent()],
        help="run every job of a JSONL file, appending results (resumable)",
        description=(
            "Run the jobs of JOBS (one JSON object per line: request fields in snake_case or "
            "camelCase, plus optional 'id' (default: the line number) and 'images'). 'image' "
            "may be a local file (relative to JOBS' directory; to the current directory when "
            "JOBS is -, read from stdin), sent as a data: URI. The whole "
            "file is checked before anything is sent. One result line per job is appended to "
            "--out, with the job's fingerprint; rerunning with the same --out reuses a result "
            "only for the same id and fingerprint, generates edited and failed jobs again, "
            "and saves images still pending. A first SIGINT/SIGTERM stops new submissions "
            "and keeps every answer in flight (exit 130/143); a second stops at once."
        ),
        epilog=_ENV_HELP,
    )
    run.add_argument("jobs", type=Path, metavar="JOBS.jsonl",
                     help="the jobs file, or - to read the jobs from stdin")  # fmt: skip
    run.add_argument("--out", type=Path, required=True, metavar="RESULTS.jsonl",
                     help="results file, appended to and resumed from (a file: not -)")  # fmt: skip
    run.add_argument("--summary-json", type=Path, default=None, metavar="FILE",
                     help="also write the end-of-run summary to FILE as JSON (- for stdout), "
                          "even when some jobs failed")  # fmt: skip
    _add_client_arguments(run, concurrency=True)
    run.add_argument("--download", type=Path, default=None, metavar="DIR",
                     help="save every image into DIR as {id}-{k}.{ext}")  # fmt: skip
    run.add_argument("--skip-invalid", action="store_true",
                     help="record bad lines as failed jobs and run the rest "
                          "(default: refuse the file, exit 2)")  # fmt: skip
    run.add_argument("--replace-mismatched", action="store_true",
                     help="run even when --out looks written from another jobs file (ids "
                          "recorded for other jobs, no job matching): such jobs are generated "
                          "again and their new lines supersede the old ones "
                          "(default: refuse, exit 2, nothing sent)")  # fmt: skip
    run.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                     help="run only the jobs whose id hashes to shard I of N (I from 0), so N "
                          "processes (each with its own --out) split one jobs file")  # fmt: skip
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_demo_parser(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        parents=[_logging_parent()],
        help="run ~200 jobs against a built-in mock server and print a summary",
        description=(
            "Start a mock Nebula server in this process (latency 0.1-0.6 s, ~5% faults), run "
            "the jobs through the client with a progress bar, write the results and print "
            "a summary table. Needs no credentials and no network."
        ),
    )
    demo.add_argument("--jobs", type=_int_at_least(1), default=200, metavar="N",
                      help="number of jobs (default: 200)")  # fmt: skip
    demo.add_argument("--concurrency", type=_int_at_least(1), default=32, metavar="N",
                      help="requests in flight at once (default: 32)")  # fmt: skip
    demo.add_argument("--out", type=Path, default=Path("demo-results.jsonl"),
                      metavar="RESULTS.jsonl",
                      help="results file, replaced (default: demo-results.jsonl)")  # fmt: skip
    demo.add_argument("--seed", type=int, default=0, help="seed of the mock's faults")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_submit_parser(commands: Any) -> None:
    submit = commands.add_parser(
        "submit",
        parents=[_logging_parent()],
        help="run one job from flags and print its image URLs",
        description="Run one image-to-image job and print its URLs, one per line.",
        epilog=_ENV_HELP,
    )
    add = submit.add_argument
    add("--model", required=True, help="model name, e.g. doubao-seedream-4-0-250828")
    add("--prompt", required=True, help="what to generate")
    add("--image", default=None, metavar="URL|FILE",
        help="input image: http(s) URL, data: URI or local file")  # fmt: skip
    add("--n", type=_int_at_least(1), default=None, help="images per submission (1-15)")
    add("--images", type=_int_at_least(1), default=None,
        help="images in total, over several submissions if more than --n")  # fmt: skip
    add("--size", default=None, help="1K, 2K, 3K, 4K or WIDTHxHEIGHT (default: 2048x2048)")
    add("--temperature", type=int, default=None)
    add("--watermark", action="store_true", default=None, help="ask for a watermark")
    add("--quality", default=None)
    add("--response-format", choices=("url", "b64_json"), default=None,
        help="b64_json needs --download")  # fmt: skip
    add("--optimize-prompt", default=None)
    add("--score", type=float, default=None)
    add("--sequential-image-generation", choices=("auto", "disabled"), default=None)
    add("--max-images", type=_int_at_least(1), default=None,
        help="sequential_image_generation_options.max_images")  # fmt: skip
    add("--prompt-options", type=_json_object, default=None, metavar="JSON",
        help="prompt_options as a JSON object")  # fmt: skip
    add("--id", default="submit", help="job id, used for --download file names")
    add("--download", type=Path, default=None, metavar="DIR",
        help="save the images into DIR and print their paths instead of URLs")  # fmt: skip
    add("--json", action="store_true", help="print the result line (JSON) instead of URLs")
    _add_client_arguments(submit, concurrency=False)


def build_parser() -> argparse.ArgumentParser:
    """The ``nebula-async`` argument parser with its four subcommands."""
    from nebula_async.testing import add_mock_server_arguments

    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Bulk, rate-limited, fault-tolerant client for the Nebula v4 img2img API.",
        epilog=(
            "exit codes: 0 all ok, 1 some jobs failed (or their images not saved, or some "
            "not attempted), 2 bad usage or input, 3 results file not writable, "
            "130 / 143 drained after SIGINT / SIGTERM"
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_run_parser(commands)
    _add_demo_parser(commands)
    _add_submit_parser(commands)
    mock = commands.add_parser(
        "mock-server",
        parents=[_logging_parent()],
        help="serve a mock Nebula API on loopback (for tests and trials)",
        description="Serve a mock Nebula v4 API on loopback until Ctrl-C.",
    )
    add_mock_server_arguments(mock)
    return parser


# -- commands -----------------------------------------------------------------------------


def _progress_enabled(args: argparse.Namespace) -> bool:
    from ._progress import progress_wanted

    return progress_wanted(disabled_by_user=args.no_progress)


async def _run(args: argparse.Namespace) -> int:
    if str(args.out) == "-":
        # stdout is not a results file: it cannot be locked, resumed or cut back.
        print(f"{_PROG} run: --out - is not supported: give a file (results are appended "
              "and resumed from it); use --summary-json - for figures on stdout",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    options = RunOptions(
        jobs_path=args.jobs,
        out_path=args.out,
        client=_client_settings(args),
        download_dir=args.download,
        skip_invalid=args.skip_invalid,
        progress=_progress_enabled(args),
        replace_mismatched=args.replace_mismatched,
        shard=args.shard,
        summary_json=args.summary_json,
    )
    if str(args.jobs) != "-":
        return await run_command(options)
    # The run reads its jobs twice (checked first, then sent), so stdin is spooled
    # to a private temporary file; local images resolve against the current directory.
    with tempfile.TemporaryDirectory(prefix="nebula-async-") as spool_dir:
        spool = Path(spool_dir) / "stdin.jsonl"
        with spool.open("wb") as file:
            shutil.copyfileobj(sys.stdin.buffer, file)
        return await run_command(
            replace(options, jobs_path=spool, jobs_base_dir=Path.cwd(), jobs_label="<stdin>")
        )


async def _demo(args: argparse.Namespace) -> int:
    from ._demo import DemoOptions, demo_command

    return await demo_command(
        DemoOptions(
            jobs=args.jobs,
            concurrency=args.concurrency,
            out_path=args.out,
            seed=args.seed,
            progress=_progress_enabled(args),
        )
    )


def _submit_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": args.id,
        "images": args.images,
        "model": args.model,
        "prompt": args.prompt,
        "image": args.image,
        "n": args.n,
        "size": args.size,
        "temperature": args.temperature,
        "watermark": args.watermark,
        "quality": args.quality,
        "response_format": args.response_format,
        "optimize_prompt": args.optimize_prompt,
        "score": args.score,
        "sequential_image_generation": args.sequential_image_generation,
        "prompt_options": args.prompt_options,
    }
    if args.max_images is not None:
        fields["sequential_image_generation_options"] = {"max_images": args.max_images}
    # Unset flags are left out, so the request's own defaults apply.
    return {key: value for key, value in fields.items() if value is not None}


async def _submit(args: argparse.Namespace) -> int:
    try:
        job: Job = job_from_fields(
            _submit_fields(args),
            default_id=args.id,
            base_dir=Path.cwd(),
            allow_b64_json=args.download is not None,
        )
        client = _client_settings(args).make_client()
    except ValidationError as exc:
        print(f"{_PROG} submit: {cli_message(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.download is not None:  # checked before anything is sent (and billed)
        problem = prepare_download_dir(args.download)
        if problem is not None:
            print(f"{_PROG} submit: {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
    async with client, job_results(client, [job]) as results:
        result = await anext(results)
    record = job_result_record(result, line_no=None, fingerprint=job_fingerprint(job))
    del record["line"]
    not_saved = False
    if args.download is not None:
        images = dict(enumerate(result.images, start=1))
        try:
            loopback = api_is_loopback(args.base_url)  # the mock server's images
            async with ImageDownloader(args.download, allow_loopback=loopback) as downloader:
                outcome = await downloader.download_job(result.job_id, result.images)
        except BaseException:  # interrupted: the generated images are still to be had
            _print_unsaved_urls(result.urls)
            raise
        record = download_record(
            record,
            generated=result.ok,
            files=outcome.files,
            failures=outcome.failures,
            images=images,
        )
        if outcome.error:
            not_saved = True
            print(f"{_PROG} submit: download failed: {outcome.error}", file=sys.stderr)
            _print_unsaved_urls([images[k].url for k in sorted(outcome.failures)])
    if args.json:
        sys.stdout.write(orjson.dumps(record).decode() + "\n")
    else:
        for line in record.get("files") or result.urls:
            if line is not None:
                print(line)
    if not result.ok:
        error = error_record(result.error) or {}
        print(f"{_PROG} submit: {error.get('type')}: {error.get('message')}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_SOME_FAILED if not_saved else EXIT_OK


def _print_unsaved_urls(urls: Sequence[str | None]) -> None:
    shown = [url for url in urls if url is not None]
    if shown:
        print(f"{_PROG} submit: images not saved, at:", *shown, sep="\n  ", file=sys.stderr)


async def _mock_server(args: argparse.Namespace) -> int:
    from nebula_async.testing import serve_mock_server

    return await serve_mock_server(args)


_COMMANDS = {"run": _run, "demo": _demo, "submit": _submit, "mock-server": _mock_server}


class _OneLine(logging.Formatter):
    """The library's warnings as one line each: the job's own error is in its results
    line, so a user never sees a traceback (``-X dev`` or a logging config shows more)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{_PROG}: {record.getMessage()}"


class _Verbose(logging.Formatter):
    """``-v``: one line per record, UTC time + level + message (no traceback)."""

    converter = staticmethod(time.gmtime)

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(self.formatMessage(self._prepared(record)).splitlines())

    def _prepared(self, record: logging.LogRecord) -> logging.LogRecord:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        return record


class _Redact(logging.Filter):
    """A last guard: the credentials of the environment never reach stderr, whatever
    a log record holds (the library logs none; this keeps it so)."""

    def __init__(self) -> None:
        super().__init__()
        names = ("NEBULA_TOKEN", "NEBULA_PASSWORD")
        self._secrets = [value for name in names if len(value := os.environ.get(name, "")) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = record.getMessage()
            for secret in self._secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


_HANDLER_NAME = "nebula-async-cli"


def _configure_logging(level: int | None) -> None:
    """The ``nebula_async`` logger to stderr: warnings only, one line each, by default;
    ``level`` (``-v``/``--log-level``) from there down, with time and level."""
    logger = logging.getLogger("nebula_async")
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:  # main() called again (tests)
            logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)  # undo a -v of the previous call
    if logger.handlers and level is None:
        return  # an embedding program configured it
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(_Redact())
    if level is None or level >= logging.WARNING:
        handler.setFormatter(_OneLine())
        handler.setLevel(logging.WARNING if level is None else level)
    else:
        handler.setFormatter(_Verbose())
        handler.setLevel(level)
        logger.setLevel(level)
    logger.addHandler(handler)


def _wanted_level(args: argparse.Namespace) -> int | None:
    if args.log_level is not None:
        return int(args.log_level)
    verbose = int(args.verbose)
    if verbose == 0:
        return None
    return logging.INFO if verbose == 1 else logging.DEBUG


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nebula-async`` command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    _configure_logging(_wanted_level(args))
    try:
        return asyncio.run(_COMMANDS[args.command](args))
    except KeyboardInterrupt:
        on_disk = "; results so far are on disk" if args.command == "run" else ""
        print(f"\n{_PROG}: interrupted{on_disk}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
