"""When and how often a failed storage request is tried again.

There is exactly one retry policy for S3: botocore's own retries are off
(``total_max_attempts=1``), so a request is never retried behind our back and every retry is
counted in :attr:`StoreStats.retries`. A request is retried only if

* its failure is *transient* (:func:`is_transient`): throttling (503 SlowDown, 429, the
  ``Throttl*`` codes), 500/502/503/504, 400 RequestTimeout, a connection that was refused,
  reset or closed, a connect or read timeout; never 403, 404, 400, 412, ... which would
  fail again the same way, and
* the operation is idempotent, which the caller decides: GET, HEAD, LIST and DELETE are;
  so is the PUT of a chunk (its key is unique to one save attempt, so a second PUT writes
  the same bytes). The create-only manifest PUT is not; see :mod:`.s3` for how an
  ambiguous failure of it is settled.

Waits use "full jitter" (a uniform draw from ``[0, min(max_delay, base_delay * 2**n)]``),
which spreads the retries of many agents hit by the same throttling, and no attempt starts
after the policy's deadline: an operation gives up after ``attempts`` tries or ``deadline``
seconds, whichever comes first (plus at most one request timeout for the attempt in flight).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import botocore.exceptions

T = TypeVar("T")

#: S3 error codes that mean "slow down" or "try again"; the HTTP status alone decides for the rest.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "InternalError", "ServiceUnavailable", "RequestTimeout",
    "RequestTimeoutException", "PriorRequestNotComplete",
    # The body the server got does not match the checksum we sent: damaged on the way, and
    # the agent still holds the right bytes, so sending them again is safe.
    "BadDigest", "XAmzContentChecksumMismatch",
})
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})

#: Transport failures worth another try. SSL errors are ConnectionErrors too, but a bad
#: certificate does not heal, so they are excluded below.
_TRANSIENT_TRANSPORT = (
    botocore.exceptions.ConnectionError,          # refused, connect timeout, endpoint unreachable
    botocore.exceptions.ConnectionClosedError,    # reset or closed while sending or awaiting the reply
    botocore.exceptions.ReadTimeoutError,         # no reply within read_timeout
    botocore.exceptions.ResponseStreamingError,   # reset while reading the body
    botocore.exceptions.IncompleteReadError,      # body shorter than its Content-Length
)

ENV_PREFIX = "LAYERVAULT_S3_RETRY_"


def status_of(exc: BaseException) -> int | None:
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    return None


def code_of(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_transient(exc: BaseException) -> bool:
    """True if the same request may well succeed when sent again."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return code_of(exc) in TRANSIENT_CODES or status_of(exc) in TRANSIENT_STATUS
    if isinstance(exc, botocore.exceptions.SSLError):
        return False
    return isinstance(exc, _TRANSIENT_TRANSPORT)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How many times, and for how long, one storage operation is tried."""

    attempts: int = 10          # tries in all, the first one included
    base_delay: float = 0.2     # seconds; the jitter window doubles from here...
    max_delay: float = 10.0     # ...up to this
    deadline: float = 120.0     # seconds from the first try after which no new try starts

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError(f"retry delays must satisfy 0 <= base ({self.base_delay}) <= max ({self.max_delay})")
        if self.deadline <= 0:
            raise ValueError(f"retry deadline must be > 0 seconds, got {self.deadline}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RetryPolicy:
        """The defaults, overridden by ``LAYERVAULT_S3_RETRY_{ATTEMPTS,BASE_DELAY,MAX_DELAY,DEADLINE}``."""
        values: dict[str, float | int] = {}
        for field in dataclasses.fields(cls):
            text = environ.get(ENV_PREFIX + field.name.upper())
            if text is None or text == "":
                continue
            try:
                values[field.name] = int(text) if field.type in (int, "int") else float(text)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{field.name.upper()}={text!r} is not a number") from None
        return cls(**values)  # type: ignore[arg-type]

    def delay(self, retry: int, rng: random.Random) -> float:
        """Full-jitter wait before retry number ``retry`` (0 for the first retry)."""
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * 2.0 ** retry))


class RetriesExhausted(Exception):
    """The last transient failure of an operation that ran out of attempts or time."""

    def __init__(self, last: BaseException, attempts: int, elapsed: float, policy: RetryPolicy) -> None:
        super().__init__(str(last))
        self.last = last
        self.attempts = attempts
        self.elapsed = elapsed
        self.policy = policy

    def summary(self) -> str:
        return (f"gave up after {self.attempts} attempt{'s' if self.attempts != 1 else ''} over {self.elapsed:.1f}s "
                f"(retry limits: {self.policy.attempts} attempts, {self.policy.deadline:g}s)")


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    retryable: Callable[[BaseException], bool] = is_transient,
    on_retry: Callable[[BaseException], None] = lambda exc: None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``fn`` until it returns, fails for good, or the policy runs out.

    A failure ``retryable`` rejects is raised as is. When attempts or time run out, the
    last failure is raised as :class:`RetriesExhausted` (its ``last`` is the cause), so
    callers can tell "refused" from "kept failing".
    """
    rng = rng or random.Random()
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified right here
            if not retryable(exc):
                raise
            wait = policy.delay(attempt - 1, rng)
            elapsed = clock() - started
            if attempt >= policy.attempts or elapsed + wait >= policy.deadline:
                raise RetriesExhausted(exc, attempt, elapsed, policy) from exc
            on_retry(exc)
            sleep(wait)
