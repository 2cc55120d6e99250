"""The store's connection to Milvus and the states a restart leaves.

Every Milvus call goes through `StoreConnection._call`: errors typed (semsearch/store/errors.py),
latency recorded, and the two states a restarted Milvus (or a new Lite process) leaves healed once
per call: a dead connection (`reconnect`, which also re-attaches a Lite directory whose owner
exited) and a released collection (`load_if_released`; the load state lives here for that).
Also what the server can do (`capabilities`) and whether it answers at all (`ping`).
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from pymilvus import MilvusClient, MilvusException

from semsearch.errors import BackendUnavailableError, CollectionNotLoadedError
from semsearch.lite import LiteEndpoint
from semsearch.metrics import STORE_LATENCY
from semsearch.store.errors import MilvusTimeoutError, is_connection_failure, translate_milvus_error

log = structlog.get_logger(__name__)

# Creating and loading a collection may take far longer than a request's timeout.
ADMIN_TIMEOUT_S = 120.0
RECONNECT_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Capabilities:
    """What the connected Milvus can do beyond dense search."""

    server_version: str  # as Milvus reports it: "milvus_lite-3.2.2", "v2.3.5", "v2.5.4"
    bm25: bool  # BM25 Functions and sparse inverted indexes: Milvus Lite, Milvus >= 2.5
    grouping: bool  # native search(group_by_field=...): Milvus >= 2.4
    # Partition keys that upsert honours: Milvus 2.3.5 routes upserted rows to the wrong partition
    # (a search for `tenant == "acme"` then misses them), so there the tenant field is a plain one.
    partition_key: bool = True


def capabilities_of(server_version: str) -> Capabilities:
    if server_version.startswith("milvus_lite"):
        # Lite "groups" by over-fetching 10x top_k in Python and projecting every fetched row: on the
        # 104-entry FAQ 45-66 ms against 6-8 ms for a plain search that semsearch dedupes itself.
        return Capabilities(server_version, bm25=True, grouping=False, partition_key=True)
    match = re.match(r"v?(\d+)\.(\d+)", server_version.strip())
    if match is None:  # a managed service that does not say: assume a current Milvus
        return Capabilities(server_version, bm25=True, grouping=True)
    version = (int(match.group(1)), int(match.group(2)))
    return Capabilities(server_version, bm25=version >= (2, 5), grouping=version >= (2, 4),
                        partition_key=version >= (2, 4))


def _rpc_details(exc: grpc.RpcError) -> str:
    details = exc.details() if callable(getattr(exc, "details", None)) else ""
    return str(details or "")[:300]


class StoreConnection:
    """The connection layer of MilvusStore (semsearch/store/milvus.py sets its state)."""

    uri: str
    timeout_s: float
    is_lite: bool
    client: MilvusClient
    _lite: LiteEndpoint | None
    _token: str
    _client_lock: threading.Lock
    _last_reconnect: float
    _capabilities: Capabilities | None
    _loading: threading.Lock  # one load at a time; other callers do not wait for it
    # Milvus Lite's engine is single-writer per collection: every layer serializes its writes on it.
    _write_lock: threading.Lock

    def _connect(self, connect_uri: str) -> MilvusClient:
        # Dedicated: pymilvus otherwise shares one handler per URI in the process, and after a
        # server restart that handler never recovers ("Fail connecting to server" for good).
        # A channel argument unique to this connection: gRPC shares subchannels between channels
        # with equal arguments, and a new client would inherit the dead one's reconnect backoff.
        options = {"grpc.primary_user_agent": f"semsearch/{uuid.uuid4().hex}"}
        try:
            return MilvusClient(uri=connect_uri, token=self._token, timeout=self.timeout_s, dedicated=True,
                                grpc_options=options)
        except MilvusException as exc:
            raise BackendUnavailableError(f"cannot connect to Milvus at {self.uri}: {exc.message}") from exc

    def reconnect(self) -> bool:
        """Replace the client with a fresh connection (at most every RECONNECT_INTERVAL_S).

        A Milvus server killed and restarted on the same address is reachable again, but the old
        client's channel is not; a Lite directory whose owner process exited is re-attached (this
        process may become its owner). True when a new client is in place.
        """
        with self._client_lock:
            now = time.monotonic()
            if now - self._last_reconnect < RECONNECT_INTERVAL_S:
                return False
            self._last_reconnect = now
            old = self.client
            try:
                if self._lite is not None and not self._lite.owner:
                    self._lite.release()
                    self._lite = LiteEndpoint.attach(self.uri)
                    url = self._lite.url
                else:
                    url = self._lite.url if self._lite is not None else self.uri
                self.client = self._connect(url)
            except Exception as exc:
                log.warning("milvus_reconnect_failed", uri=self.uri, reason=str(exc)[:300])
                return False
        try:
            old.close()
        except Exception as exc:  # the old channel may be half-dead: closing it must not fail us
            log.debug("milvus_old_client_close_failed", reason=str(exc))
        log.info("milvus_reconnected", uri=self.uri)
        return True

    # ------------------------------------------------------------------ errors
    def _call(self, method: Any, /, **kwargs: Any) -> Any:
        """Call a MilvusClient method, translating errors; heal the two states a restart leaves.

        A collection found not loaded (a new Lite process, a restarted server) is loaded and the
        call repeated once; a dead connection is replaced and the call repeated once (on the client
        another thread put in place meanwhile, if one did: closing the old one failed this call).
        A timeout is a slow server, not a dead connection: it is not retried.
        """
        kwargs.setdefault("timeout", self.timeout_s)
        name = method.__name__
        try:
            return self._call_once(method, kwargs)
        except CollectionNotLoadedError:
            collection = kwargs.get("collection_name")
            if not collection or name in ("load_collection", "get_load_state"):
                raise
            log.info("collection_not_loaded", collection=collection, operation=name)
            if not self.load_if_released(str(collection)):
                raise  # Milvus (or another thread) is loading it: UNAVAILABLE now, not a wait past the deadline
        except BackendUnavailableError as exc:
            replaced = getattr(method, "__self__", self.client) is not self.client
            if not is_connection_failure(exc) or not (replaced or self.reconnect()):
                raise
        return self._call_once(getattr(self.client, name), kwargs)

    def _call_once(self, method: Any, kwargs: dict[str, Any]) -> Any:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = method(**kwargs)
            outcome = "ok"
            return result
        except MilvusException as exc:
            raise translate_milvus_error(exc) from exc
        except grpc.RpcError as exc:  # pymilvus passes a deadline (and other final codes) through raw
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise MilvusTimeoutError(f"Milvus did not answer {method.__name__} within "
                                         f"{kwargs.get('timeout')} s") from exc
            raise BackendUnavailableError(f"Milvus unavailable: {getattr(code, 'name', type(exc).__name__)}: "
                                          f"{_rpc_details(exc)}") from exc
        except Exception as exc:  # grpc connection errors surface as many types in pymilvus
            if "grpc" in type(exc).__module__ or isinstance(exc, ConnectionError | TimeoutError):
                raise BackendUnavailableError(f"Milvus unavailable: {type(exc).__name__}") from exc
            raise
        finally:
            STORE_LATENCY.labels(operation=method.__name__, outcome=outcome).observe(time.perf_counter() - started)

    def capabilities(self) -> Capabilities:
        """What this Milvus supports, from the version it reports (asked once)."""
        if self._capabilities is None:
            self._capabilities = capabilities_of(str(self._call(self.client.get_server_version)))
        return self._capabilities

    def ping(self) -> bool:
        """Whether Milvus answers at all (tells an outage from a request it refuses)."""
        try:
            self._call(self.client.list_collections)
        except Exception:
            return False
        return True

    # ------------------------------------------------------------------ names and load state
    def resolve(self, name: str) -> str:
        """The physical collection behind a name that may be an alias ('' when neither exists)."""
        if not self._call(self.client.has_collection, collection_name=name):
            return ""
        return str(self._call(self.client.describe_collection, collection_name=name)["collection_name"])

    def has_collection(self, name: str) -> bool:
        return bool(self._call(self.client.has_collection, collection_name=name))

    def load(self, name: str) -> None:
        """Load a collection for queries (a collection reopened by a new Lite process is 'released')."""
        self._call(self.client.load_collection, collection_name=self.resolve(name) or name,
                   timeout=ADMIN_TIMEOUT_S)

    def load_state(self, name: str) -> str:
        """Milvus' load state of the collection `name` (not an alias): Loaded, Loading, NotLoad or NotExist."""
        state = self._call(self.client.get_load_state, collection_name=name)
        return str(state.get("state", ""))  # pymilvus' LoadState prints its bare name

    def load_if_released(self, name: str) -> bool:
        """Load `name` when it is released (a new Lite process, a release); True when it is loaded.

        False at once when it is still loading (a restarted server reloads what was loaded by
        itself) or another thread of this process is loading it: callers answer UNAVAILABLE then,
        rather than hold a request (and a thread) for the whole load."""
        if not self._loading.acquire(blocking=False):
            return False
        try:
            state = self.load_state(name)
            if state == "NotLoad":
                self.load(name)
                state = self.load_state(name)
            return state == "Loaded"
        finally:
            self._loading.release()

    def require_loaded(self, name: str) -> None:
        """Raise CollectionNotLoadedError (UNAVAILABLE) unless every row of `name` is searchable: an
        answer with fewer hits than asked must not come from a collection that is still loading."""
        state = self.load_state(name)
        if state != "Loaded":
            raise CollectionNotLoadedError(f"Milvus unavailable: collection {name!r} is {state or 'not loaded'}, "
                                           "its answers would be incomplete; retry shortly")

    def ensure_loaded(self, name: str) -> None:
        """Load `name` unless it is loaded: whoever opens an existing collection can serve it.

        Milvus Lite reopens every collection 'released' in a new process; a Milvus server may
        still be loading after a restart, or someone released it."""
        physical = self.resolve(name) or name
        state = self._call(self.client.get_load_state, collection_name=physical)
        if str(state.get("state", "")).endswith("Loaded") and "NotLoad" not in str(state.get("state", "")):
            return
        log.info("collection_loading", collection=physical, state=str(state.get("state", "")))
        self.load(physical)
