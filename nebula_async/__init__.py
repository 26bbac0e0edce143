"""nebula-async: bulk, rate-limited, fault-tolerant asyncio client for Nebula v4 img2img.

Sends very large numbers of image-to-image requests to the Nebula v4 API
concurrently, under a rate limit, retries what is safe to retry, and gathers
every image URL of each job. ``NebulaClient`` is the entry point: ``img2img``
for one request, ``run_job`` for one job fanned out over several submissions,
``stream`` and ``run_batch`` for any number of jobs read lazily.
``nebula_async.testing.MockNebulaServer`` is a Nebula API on loopback for tries
and tests; ``nebula-async`` is the command line for JSONL files of jobs.

>>> import anyio
>>> import nebula_async as na
>>> from nebula_async.testing import MockNebulaServer
>>> async def main():
...     async with MockNebulaServer() as server:  # drop it (and base_url) for the real API
...         async with na.NebulaClient(token="mock-token", base_url=server.base_url) as client:
...             request = na.Img2ImgRequest(model="m", prompt="a fox", n=2)
...             result = await client.run_job(na.Job(request, images=5))  # 2 + 2 + 1 images
...             print(result.ok, result.submissions, len(result.urls))
>>> anyio.run(main)
True 3 5

Against the service, credentials come from ``token=`` or ``NEBULA_TOKEN`` (or
``username=``/``password=``, ``NEBULA_USERNAME``/``NEBULA_PASSWORD``).
Documentation: the site built from ``docs/`` in the source tree (``nox -s docs``,
or ``mkdocs serve`` to browse it), the README, and ``help()`` on every public
name, for instance ``help(nebula_async.NebulaClient)``.

>>> na.to_payload(na.Img2ImgRequest(model="m", prompt="a fox"))["batchImageGenerationDTO.prompt"]
'a fox'
"""

from ._batch import JobStream
from ._client import NebulaClient
from ._codec import from_payload, to_payload
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientStateError,
    NebulaError,
    NotAttemptedError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
    ValidationError,
)
from ._limiter import Limiter, LimiterFactory, LimiterStatistics, Outcome
from ._models import (
    BatchReport,
    GeneratedImage,
    ImageResult,
    Img2ImgRequest,
    Job,
    JobResult,
    RateLimit,
    RetryPolicy,
    Timeout,
)
from ._shared import SharedRateLimit
from ._stats import ClientStatistics

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchReport",
    "ClientStateError",
    "ClientStatistics",
    "GeneratedImage",
    "ImageResult",
    "Img2ImgRequest",
    "Job",
    "JobResult",
    "JobStream",
    "Limiter",
    "LimiterFactory",
    "LimiterStatistics",
    "NebulaClient",
    "NebulaError",
    "NotAttemptedError",
    "Outcome",
    "RateLimit",
    "RateLimitError",
    "ResponseDecodeError",
    "RetryPolicy",
    "ServerError",
    "SharedRateLimit",
    "Timeout",
    "ValidationError",
    "__version__",
    "from_payload",
    "to_payload",
]
