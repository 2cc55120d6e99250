"""Retries of one request: tenacity, exponential backoff with full jitter, the caller's deadline, Retry-After."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from semsearch.errors import BackendUnavailableError

T = TypeVar("T")

# Honor a server's Retry-After up to this (and never past the caller's deadline).
RETRY_AFTER_CAP_S = 10.0


class Transient(Exception):
    """One attempt failed in a way another attempt may not (connection, timeout, 408/429/5xx)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Quarantined(Exception):
    """The server serves another model than ours: never use it, try the others."""


class StopAtDeadline(stop_base):
    """Stop retrying once the caller's deadline has passed."""

    def __init__(self, deadline: float | None, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and self.deadline - self.clock() <= 0.001


def retry_transient(
    fn: Callable[[], T],
    *,
    retries: int,
    deadline: float | None,
    clock: Callable[[], float],
    backoff_base_s: float,
    backoff_max_s: float,
    before_retry: Callable[[int, BaseException | None, float], None] | None = None,
) -> T:
    """Run `fn`, retrying `Transient` failures up to `retries` times within the deadline; the last
    one becomes BackendUnavailableError. Anything else is raised at once.

    `before_retry(attempt, exception, sleep_s)` runs before each wait (counting, logging)."""
    jitter = wait_random_exponential(multiplier=backoff_base_s, max=backoff_max_s)

    def wait(state: RetryCallState) -> float:
        delay = jitter(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Transient) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, RETRY_AFTER_CAP_S))
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - clock()))
        return delay

    def before_sleep(state: RetryCallState) -> None:
        if before_retry is not None:
            exc = state.outcome.exception() if state.outcome else None
            before_retry(state.attempt_number, exc, state.upcoming_sleep)

    retrying = Retrying(
        stop=stop_any(stop_after_attempt(retries + 1), StopAtDeadline(deadline, clock)),
        wait=wait, retry=retry_if_exception_type(Transient), before_sleep=before_sleep, reraise=True,
    )
    try:
        return retrying(fn)
    except Transient as exc:
        if deadline is not None and deadline - clock() <= 0.001:
            raise BackendUnavailableError(f"encoder deadline exceeded: {exc}") from exc
        raise BackendUnavailableError(f"encoder failed after {retries + 1} attempts: {exc}") from exc
