"""nebula-async: bulk, rate-limited, fault-tolerant asyncio client for Nebula v4 img2img.

>>> import nebula_async as na
>>> na.to_payload(na.Img2ImgRequest(model="m", prompt="a fox"))["batchImageGenerationDTO.prompt"]
'a fox'
"""

from ._client import NebulaClient
from ._codec import from_payload, to_payload
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    NebulaError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
    ValidationError,
)
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
    "ClientStatistics",
    "GeneratedImage",
    "ImageResult",
    "Img2ImgRequest",
    "Job",
    "JobResult",
    "NebulaClient",
    "NebulaError",
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
