"""The storage retry policy on its own: which failures are retried, and when it gives up.

(End-to-end through a faulting proxy in front of a real S3 server: test_storage_faults.py.)
"""

from __future__ import annotations

import random

import botocore.exceptions
import pytest

from layervault.agent.storage.retry import RetriesExhausted, RetryPolicy, call_with_retries, is_transient


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize("exc, transient", [
    (client_error("SlowDown", 503), True),
    (client_error("ServiceUnavailable", 503), True),
    (client_error("InternalError", 500), True),
    (client_error("BadGateway", 502), True),
    (client_error("GatewayTimeout", 504), True),
    (client_error("RequestTimeout", 400), True),
    (client_error("ThrottlingException", 400), True),
    (client_error("TooManyRequests", 429), True),
    (client_error("AccessDenied", 403), False),
    (client_error("NoSuchKey", 404), False),
    (client_error("InvalidArgument", 400), False),
    (client_error("PreconditionFailed", 412), False),
    (client_error("ConditionalRequestConflict", 409), False),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), True),
    (botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"), True),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), True),
    (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x"), True),
    (botocore.exceptions.ResponseStreamingError(error="reset"), True),
    (botocore.exceptions.IncompleteReadError(actual_bytes=1, expected_bytes=2), True),
    (botocore.exceptions.SSLError(endpoint_url="http://x", error="bad certificate"), False),
    (botocore.exceptions.NoCredentialsError(), False),
    (ValueError("not a storage error"), False),
])
def test_only_transient_failures_are_retried(exc: Exception, transient: bool) -> None:
    assert is_transient(exc) is transient


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int, exc: Exception, clock: FakeClock, cost: float = 0.0):
    calls = []

    def fn() -> str:
        calls.append(clock.now)
        clock.now += cost
        if len(calls) <= times:
            raise exc
        return "ok"

    return fn, calls


def test_transient_failures_then_success() -> None:
    clock, retried = FakeClock(), []
    fn, calls = failing(3, client_error("SlowDown", 503), clock)
    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=1.0, deadline=60)
    assert call_with_retries(fn, policy, on_retry=retried.append, clock=clock, sleep=clock.sleep,
                             rng=random.Random(1)) == "ok"
    assert len(calls) == 4 and len(retried) == 3
    # full jitter: each wait lies in [0, min(max, base * 2**n)]
    assert all(0 <= wait <= min(1.0, 0.1 * 2**n) for n, wait in enumerate(clock.sleeps))


def test_gives_up_after_the_attempts() -> None:
    clock = FakeClock()
    fn, calls = failing(100, client_error("InternalError", 500), clock)
    with pytest.raises(RetriesExhausted) as info:
        call_with_retries(fn, RetryPolicy(attempts=4, deadline=60), clock=clock, sleep=clock.sleep)
    assert len(calls) == 4 and info.value.attempts == 4
    assert "gave up after 4 attempts" in info.value.summary()
    assert isinstance(info.value.last, botocore.exceptions.ClientError)


def test_starts_no_attempt_after_the_deadline() -> None:
    clock = FakeClock()
    fn, calls = failing(10_000, botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), clock, cost=1.0)
    with pytest.raises(RetriesExhausted) as info:
        call_with_retries(fn, RetryPolicy(attempts=10_000, base_delay=0.5, max_delay=2, deadline=10),
                          clock=clock, sleep=clock.sleep, rng=random.Random(2))
    assert 5 <= len(calls) < 10_000 and all(start < 10 for start in calls)
    assert clock.now <= 10 + 1.0  # only the attempt in flight may run past the deadline; no wait after it
    assert info.value.elapsed == clock.now


def test_permanent_failure_is_raised_at_once() -> None:
    clock = FakeClock()
    fn, calls = failing(1, client_error("AccessDenied", 403), clock)
    with pytest.raises(botocore.exceptions.ClientError):
        call_with_retries(fn, RetryPolicy(), clock=clock, sleep=clock.sleep)
    assert len(calls) == 1 and clock.sleeps == []


def test_policy_from_the_environment() -> None:
    policy = RetryPolicy.from_env({"LAYERVAULT_S3_RETRY_ATTEMPTS": "3", "LAYERVAULT_S3_RETRY_DEADLINE": "2.5"})
    assert (policy.attempts, policy.deadline) == (3, 2.5)
    assert RetryPolicy.from_env({}) == RetryPolicy()
    with pytest.raises(ValueError, match="LAYERVAULT_S3_RETRY_DEADLINE='soon' is not a number"):
        RetryPolicy.from_env({"LAYERVAULT_S3_RETRY_DEADLINE": "soon"})
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RetryPolicy.from_env({"LAYERVAULT_S3_RETRY_ATTEMPTS": "0"})
