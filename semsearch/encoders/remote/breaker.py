"""A per-server circuit breaker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """closed --(N consecutive failures)--> open --(reset_s)--> half-open: one probe --> closed | open.

    An open circuit makes a dead server cost nothing: no connect timeout per call, straight to
    the next server (or a fast UNAVAILABLE when none is left).
    """

    def __init__(self, failure_threshold: int, reset_s: float, clock: Callable[[], float]) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def try_acquire(self) -> bool:
        """May a request use this server now? In half-open, only one (the probe) may."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_s:
                self._state = BreakerState.HALF_OPEN
                self._probe_in_flight = False
            if self._state is BreakerState.HALF_OPEN and not self._probe_in_flight:
                self._probe_in_flight = True
                return True
            return False

    def is_probing(self) -> bool:
        return self._state is BreakerState.HALF_OPEN

    def record_success(self) -> bool:
        """The server answered; True when this closed an open or half-open circuit."""
        with self._lock:
            closed = self._state is not BreakerState.CLOSED
            self._state = BreakerState.CLOSED
            self._failures = 0
            self._probe_in_flight = False
            return closed

    def record_failure(self) -> bool:
        """Count a failure; True when this one opened the circuit."""
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
                opened = self._state is not BreakerState.OPEN
                self._state = BreakerState.OPEN
                self._opened_at = self._clock()
                self._probe_in_flight = False
                return opened
            return False

    def force_open(self) -> None:
        with self._lock:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._probe_in_flight = False

    def release(self) -> None:
        """A probe that ended with neither verdict (e.g. the caller's deadline) frees its slot."""
        with self._lock:
            self._probe_in_flight = False

    def retry_in(self) -> float:
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_s - self._clock())
