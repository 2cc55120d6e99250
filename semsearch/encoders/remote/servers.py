"""The server pool: per-server state (circuit, concurrency slots, pinned identity, quarantine) and
which server the next request goes to."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import structlog

from semsearch.encoders.remote.breaker import BreakerState, CircuitBreaker
from semsearch.encoders.remote.identity import ServerIdentity

log = structlog.get_logger(__name__)


@dataclass(eq=False)  # compared by identity: `server in avoid`
class Server:
    url: str
    client: httpx.Client
    breaker: CircuitBreaker
    slots: threading.BoundedSemaphore
    inflight: int = 0
    # The identity first accepted for this server: any later change quarantines it.
    pinned: ServerIdentity | None = None
    verified_at: float = -math.inf
    # When it last answered well (a request or an identity check): recent evidence of health.
    last_ok: float = -math.inf
    quarantine_reason: str | None = None
    # Quarantined for what it answered (other model, other dimension), not for what /model_info
    # says: a probe of /model_info cannot clear it; only a restart of this process does.
    sticky: bool = False

    @property
    def state(self) -> str:
        return "quarantined" if self.quarantine_reason else self.breaker.state.value

    def quarantine(self, reason: str, *, sticky: bool = False) -> None:
        self.quarantine_reason = reason
        self.sticky = self.sticky or sticky
        self.breaker.force_open()


class ServerPool:
    """Servers in a fixed order; selection rotates the start so that ties spread the load."""

    def __init__(self, servers: Sequence[Server], clock: Callable[[], float]) -> None:
        self.servers = list(servers)
        self._clock = clock
        self._lock = threading.Lock()
        self._rr = 0

    def candidates(self, avoid: Sequence[Server]) -> list[Server]:
        """Servers in the order to try: not the one that just failed (when there is a choice),
        servers due a probe first (a recovered server comes back promptly), then least in flight."""
        with self._lock:
            self._rr = (self._rr + 1) % len(self.servers)
            rotated = self.servers[self._rr :] + self.servers[: self._rr]
        return sorted(rotated, key=lambda s: (s in avoid, s.breaker.state is BreakerState.CLOSED, s.inflight))

    def take_slot(self, server: Server, timeout: float | None) -> bool:
        """One of the server's concurrency slots, waiting up to `timeout`; False when none came."""
        with self._lock:
            server.inflight += 1
        if server.slots.acquire(timeout=timeout):
            return True
        with self._lock:
            server.inflight -= 1
        server.breaker.release()
        return False

    def release(self, server: Server) -> None:
        server.slots.release()
        with self._lock:
            server.inflight -= 1

    def ok(self, server: Server) -> None:
        server.last_ok = self._clock()
        if server.breaker.record_success():
            log.warning("encoder_circuit_closed", server=server.url)

    def failed(self, server: Server, reason: str) -> None:
        if server.breaker.record_failure():
            log.error("encoder_circuit_open", server=server.url, reason=reason, reset_s=server.breaker.reset_s)

    def states(self) -> dict[str, str]:
        return {s.url: s.state for s in self.servers}

    def all_quarantined(self) -> bool:
        return all(s.quarantine_reason for s in self.servers)

    def retry_in(self) -> float:
        """Seconds until the first circuit of a server that is not quarantined may be probed."""
        return min((s.breaker.retry_in() for s in self.servers if not s.quarantine_reason), default=0.0)

    def answered_within(self, seconds: float) -> bool:
        """Has a usable server answered well in the last `seconds`?"""
        now = self._clock()
        return any(
            not s.quarantine_reason and s.breaker.state is BreakerState.CLOSED and now - s.last_ok < seconds
            for s in self.servers
        )
