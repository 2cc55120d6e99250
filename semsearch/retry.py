"""One retry policy for calls to backends: exponential backoff with full jitter, bounded by a deadline.

Jitter matters: the shards of an Indexed Job hit the same Milvus outage at the same moment, and
without it they would all retry in lockstep and stampede it as it comes back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

T = TypeVar("T")


def retry_call(
    call: Callable[[], T],
    *,
    retry_on: Callable[[BaseException], bool],
    deadline_s: float,
    base_s: float = 0.5,
    max_wait_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    before_retry: Callable[[BaseException, int, float], None] | None = None,
    max_attempts: int | None = None,
) -> T:
    """`call()` until it returns; an exception `retry_on` accepts is retried while the next attempt
    would still start within `deadline_s`, any other (or the last) is raised as it is.

    `sleep` may raise to cut a wait short (a stopping job); `before_retry(exc, attempt, wait_s)`
    runs before each wait (logging, reconnecting); `max_attempts` bounds the attempts too."""
    retrying = Retrying(sleep=sleep, **_policy(retry_on, deadline_s, base_s, max_wait_s, before_retry, max_attempts))
    return retrying(call)


async def async_retry_call(
    call: Callable[[], Awaitable[T]],
    *,
    retry_on: Callable[[BaseException], bool],
    deadline_s: float,
    base_s: float = 0.5,
    max_wait_s: float = 30.0,
    before_retry: Callable[[BaseException, int, float], None] | None = None,
    max_attempts: int | None = None,
) -> T:
    """`retry_call` for coroutines: the waits are `asyncio.sleep`, so the event loop keeps running."""
    retrying = AsyncRetrying(sleep=asyncio.sleep,
                             **_policy(retry_on, deadline_s, base_s, max_wait_s, before_retry, max_attempts))
    return await retrying(call)


def _policy(retry_on: Callable[[BaseException], bool], deadline_s: float, base_s: float, max_wait_s: float,
            before_retry: Callable[[BaseException, int, float], None] | None,
            max_attempts: int | None) -> dict[str, Any]:
    def notify(state: RetryCallState) -> None:
        if before_retry is not None and state.outcome is not None and state.next_action is not None:
            exc = state.outcome.exception()
            assert exc is not None
            before_retry(exc, state.attempt_number, state.next_action.sleep)

    stop: stop_base = stop_before_delay(deadline_s)
    if max_attempts is not None:
        stop = stop | stop_after_attempt(max_attempts)
    return {
        "retry": retry_if_exception(retry_on),
        "wait": wait_random_exponential(multiplier=base_s, max=max_wait_s, min=base_s / 5),
        "stop": stop,
        "before_sleep": notify,
        "reraise": True,
    }
