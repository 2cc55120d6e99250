"""Encoder server discovery: `dns+http://NAME:PORT` in `encoder_url` means every address NAME resolves to.

Behind one ClusterIP, the remote client would see a fleet of sglang pods as one server: one circuit
breaker, no failover between pods, and a model-identity check that asks whichever pod the
connection landed on. A Kubernetes headless Service (`clusterIP: None`) answers DNS with one
record per ready pod instead, so `dns+http://semsearch-sglang:30000` expands to
`http://10.1.2.3:30000,http://10.1.2.4:30000,...`: each pod is its own server with its own breaker,
failover and identity check.

Pods come and go (rollouts, scaling, rescheduling). `DiscoveringEncoder` re-resolves every
`interval_s` and, when the set changes, builds a new `RemoteEncoder` for it (which verifies each
server's model identity, as at start-up) and swaps it in; the previous one is closed once calls
that started on it have had time to finish. A failed lookup or an empty answer keeps the current
set (a DNS blip must not drop every server; dead ones are handled by their breakers), and a new
set that serves another model version is refused (the core invariant).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
import structlog

from semsearch.config import Settings
from semsearch.encoders.base import Encoder
from semsearch.errors import BackendUnavailableError, SemsearchError
from semsearch.manifest import ModelManifest

log = structlog.get_logger(__name__)

DNS_PREFIX = "dns+"
DEFAULT_INTERVAL_S = 10.0

Resolver = Callable[[str, int], Sequence[str]]


def is_discovery_url(value: str | None) -> bool:
    return bool(value) and any(part.strip().startswith(DNS_PREFIX) for part in str(value).split(","))


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA records: one per ready pod of a headless Service)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def expand_encoder_urls(value: str, resolve: Resolver = resolve_addresses) -> str:
    """`encoder_url` with each `dns+http://NAME:PORT[/path]` replaced by one URL per address of NAME."""
    expanded: list[str] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        if not part.startswith(DNS_PREFIX):
            expanded.append(part)
            continue
        url = httpx.URL(part[len(DNS_PREFIX):])
        if url.scheme != "http":
            # A certificate names the Service, not each pod address: TLS to pod IPs cannot verify.
            raise ValueError(f"encoder URL {part!r}: only dns+http:// is supported (for TLS to the pods use a "
                             "mesh, or list https URLs)")
        if not url.host or url.port is None:
            raise ValueError(f"encoder URL {part!r} must look like dns+http://NAME:PORT")
        try:
            addresses = list(resolve(url.host, url.port))
        except OSError as exc:
            raise BackendUnavailableError(
                f"encoder URL {part!r}: {url.host} does not resolve ({exc}); is the headless Service there?"
            ) from exc
        if not addresses:
            raise BackendUnavailableError(f"encoder URL {part!r}: {url.host} has no addresses (no ready pods?)")
        path = url.path.rstrip("/")
        for address in addresses:
            host = f"[{address}]" if ":" in address else address
            expanded.append(f"http://{host}:{url.port}{path}")
    return ",".join(dict.fromkeys(expanded))  # an address behind two names is one server


class DiscoveringEncoder:
    """The `Encoder` protocol over a RemoteEncoder whose server list follows DNS (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        resolve: Resolver = resolve_addresses,
        build: Callable[[Settings], Any] | None = None,
        close_delay_s: float | None = None,
    ) -> None:
        if not settings.encoder_url:
            raise ValueError("DiscoveringEncoder needs settings.encoder_url")
        if build is None:
            from semsearch.encoders.remote import RemoteEncoder

            build = RemoteEncoder.from_settings
        self._settings = settings
        self._resolve = resolve
        self._build = build
        # Calls on a replaced encoder are bounded by their gRPC deadline; this outlasts the longest
        # call the encoder itself allows (every retry timing out).
        self._close_delay_s = (close_delay_s if close_delay_s is not None
                               else settings.encoder_timeout_s * (settings.encoder_retries + 1) + 1.0)
        self.urls = expand_encoder_urls(settings.encoder_url, resolve)
        self._current = build(self._with_urls(self.urls))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closers: list[threading.Timer] = []
        self._thread = threading.Thread(target=self._watch, args=(interval_s,), daemon=True,
                                        name="encoder-discovery")
        self._thread.start()

    def _with_urls(self, urls: str) -> Settings:
        return self._settings.model_copy(update={"encoder_url": urls})

    # ----- the Encoder protocol, delegated to the current RemoteEncoder -----

    @property
    def current(self) -> Encoder:
        return self._current  # type: ignore[no-any-return]

    @property
    def manifest(self) -> ModelManifest:
        return self.current.manifest

    def encode_queries(self, queries: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self.current.encode_queries(queries, timeout_s=timeout_s)

    def encode_documents(self, documents: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        return self.current.encode_documents(documents, timeout_s=timeout_s)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.current.count_tokens(texts)

    def __getattr__(self, name: str) -> Any:
        # healthy, identity, server_states, stats... of the current server set.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._current, name)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        for timer in self._closers:
            timer.cancel()
        with self._lock:
            self._current.close()

    # ----- discovery -----

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.refresh()
            except Exception:  # never let the watcher die silently: log and keep watching
                log.exception("encoder_discovery_error")

    def refresh(self) -> bool:
        """Re-resolve now; True when the server set changed and the new one is in use."""
        try:
            urls = expand_encoder_urls(str(self._settings.encoder_url), self._resolve)
        except (BackendUnavailableError, ValueError) as exc:
            log.warning("encoder_discovery_failed", reason=str(exc), keeping=self.urls)
            return False
        if urls == self.urls:
            return False
        try:
            new = self._build(self._with_urls(urls))
        except SemsearchError as exc:
            log.error("encoder_discovery_rejected", servers=urls, reason=str(exc), keeping=self.urls)
            return False
        if new.manifest.version != self.manifest.version:
            new.close()
            log.error("encoder_discovery_rejected", servers=urls, keeping=self.urls,
                      reason=f"model version {new.manifest.version} != {self.manifest.version}")
            return False
        with self._lock:
            if self._stop.is_set():
                new.close()
                return False
            old, self._current = self._current, new
            before, self.urls = self.urls, urls
        log.info("encoder_servers_changed", added=sorted(set(urls.split(",")) - set(before.split(","))),
                 removed=sorted(set(before.split(",")) - set(urls.split(","))))
        closer = threading.Timer(self._close_delay_s, old.close)
        closer.daemon = True
        closer.start()
        self._closers = [t for t in self._closers if t.is_alive()] + [closer]
        return True
