"""The gRPC server: health (NOT_SERVING until warm), reflection, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from semsearch.config import Settings
from semsearch.encoders import Encoder
from semsearch.errors import SemsearchError
from semsearch.metrics import SERVING, set_model_info, set_reranker_info
from semsearch.store import MilvusStore
from semsearch.v1 import admin_pb2, admin_pb2_grpc, search_pb2
from service.admin import AdminServicer
from service.drain import DrainInterceptor
from service.engine import SearchEngine
from service.http_gateway import HttpServer
from service.security import ApiKeyInterceptor, server_credentials
from service.servicer import SearchServicer, add_search_service
from service.serving_state import ServingState

log = structlog.get_logger(__name__)

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# The health name for liveness: SERVING whenever the process answers, whatever its backends do. "" and
# SERVICE_NAME follow Milvus and the encoder (readiness); a liveness probe on them would restart every
# replica during a Milvus outage and make each reload its model once Milvus is back.
LIVENESS_NAME = "semsearch.v1.Liveness"


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    servicer: SearchServicer
    health: Any  # grpc_health's health.aio.HealthServicer (untyped re-export)
    store: MilvusStore
    settings: Settings
    state: ServingState
    stopping: bool = False
    drain: DrainInterceptor | None = None
    http: HttpServer | None = None  # the HTTP/JSON gateway, when http_port is set
    _loopback_dir: str | None = None
    _watcher: asyncio.Task[None] | None = None
    _registry_watcher: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        SERVING.set(1 if serving else 0)

    async def probe_backends(self) -> bool:
        """Would a search succeed now: is the serving collection fully loaded (a released one is loaded
        here: a restarted Lite process reopens collections released; one still loading answers a
        one-hit search, incompletely) and does it answer a search? And, for remote encoders, is one
        server up? A restarted Milvus server reports the collection loaded long before its searches
        answer, and searches meanwhile fail or come back incomplete."""
        engine = self.servicer.engine
        if engine is None:
            return False
        bound = max(2.0, self.settings.health_probe_interval_s)
        collection = engine.pair.collection
        try:
            if not await asyncio.wait_for(asyncio.to_thread(self.store.load_if_released, collection.name), bound):
                return False
            await asyncio.wait_for(asyncio.to_thread(
                self.store.probe_search, collection.name, collection.dimension, bound), bound + 1.0)
        except (TimeoutError, SemsearchError) as exc:
            log.debug("health_probe_failed", reason=str(exc)[:300])
            return False
        except Exception as exc:  # unexpected: NOT_SERVING and said, never a dead health watch
            log.warning("health_probe_error", error=type(exc).__name__, reason=str(exc)[:300])
            return False
        try:  # a remote encoder may probe its servers: off the event loop, bounded
            return await asyncio.wait_for(asyncio.to_thread(engine.pair.encoder.healthy), bound)
        except TimeoutError:
            return False

    async def watch_health(self) -> None:
        """Health follows the backends: NOT_SERVING while Milvus (or every encoder server) is down."""
        serving = True
        while True:
            await asyncio.sleep(self.settings.health_probe_interval_s)
            healthy = await self.probe_backends()
            if healthy != serving and not self.stopping:
                serving = healthy
                log.warning("backend_health_changed", serving=healthy)
                await self.set_serving(healthy)

    async def load(self, encoder: Encoder | None = None, *, allow_stand_in: bool = False) -> SearchEngine:
        """Load the model (the registry's current pair, else the configured or given one), open its
        collection, warm up, then report SERVING and start following the registry."""
        pair = await self.state.initial_pair(encoder, allow_stand_in=allow_stand_in)
        engine = SearchEngine(self.settings, self.store, pair, await self.state.initial_reranker())
        await engine.start()
        await engine.warm_up()
        self.servicer.engine = engine
        self.state.engine = engine
        set_model_info(pair.model_version, pair.collection.name)
        set_reranker_info(engine.rerank.version if engine.rerank is not None else "")
        await self.set_serving(True)
        self._watcher = asyncio.create_task(self.watch_health(), name="health-watch")
        if self.settings.use_registry:
            await self.state.report()
            self._registry_watcher = asyncio.create_task(self.state.watch(), name="registry-watch")
        log.info("serving", address=self.address, model_version=pair.model_version,
                 collection=pair.collection.name,
                 reranker_version=engine.rerank.version if engine.rerank is not None else None)
        return engine

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, let in-flight ones finish (up to the grace period), release resources."""
        self.stopping = True
        for task in (self._watcher, self._registry_watcher):
            if task is not None:
                task.cancel()
        await self.set_serving(False)
        with contextlib.suppress(Exception):  # best effort: a stale report expires by itself
            await self.state.forget()
        if self.http is not None:  # first: the HTTP requests it drains still reach the gRPC server
            await self.http.stop()
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        started = asyncio.get_running_loop().time()
        if self.drain is not None and not await self.drain.drain(grace_s):
            log.warning("drain_timeout", grace_s=grace_s, in_flight=self.drain.in_flight)
        await self.server.stop(max(0.0, grace_s - (asyncio.get_running_loop().time() - started)))
        if self.servicer.engine is not None:
            await self.servicer.engine.close()
            self.servicer.engine.pair.encoder.close()
        await asyncio.to_thread(self.store.close)
        if self._loopback_dir is not None:
            shutil.rmtree(self._loopback_dir, ignore_errors=True)
        log.info("stopped", address=self.address)


async def start_server(settings: Settings, store: MilvusStore | None = None) -> RunningServer:
    """Bind and start answering (health NOT_SERVING) before the model is loaded."""
    own_store = store is None
    if store is None:
        store = await asyncio.to_thread(MilvusStore.from_settings, settings)
    drain = DrainInterceptor()
    interceptors: list[grpc.aio.ServerInterceptor] = [drain]
    if settings.api_keys:
        interceptors.append(ApiKeyInterceptor(settings.api_keys))
    if not settings.api_keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no_authentication", host=settings.host,
                    note="no api_keys configured: anyone who reaches this port can read and write")
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    servicer = SearchServicer(settings)
    add_search_service(servicer, server)
    state = ServingState(settings, store)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(state), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health_name, reflection.SERVICE_NAME), server
    )
    credentials = server_credentials(settings)
    address = f"{settings.host}:{settings.port}"
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    loopback_dir = None
    if settings.http_port:
        # The HTTP gateway's hop to this server: a Unix socket in a directory only this user can enter,
        # so it needs no TLS (and no client certificate under mutual TLS); keys are checked as on the port.
        loopback_dir = tempfile.mkdtemp(prefix="semsearch-")
        server.add_insecure_port(f"unix:{loopback_dir}/grpc.sock")
    await server.start()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
        log.info("metrics", address=f"http://{settings.host}:{settings.metrics_port}/metrics")
    running = RunningServer(server=server, port=port, servicer=servicer, health=health_servicer, store=store,
                            settings=settings, state=state, drain=drain, _loopback_dir=loopback_dir)
    await running.set_serving(False)
    await health_servicer.set(LIVENESS_NAME, health_pb2.HealthCheckResponse.SERVING)
    if loopback_dir is not None:
        running.http = HttpServer(settings, f"unix:{loopback_dir}/grpc.sock")
        try:
            await running.http.start()
        except BaseException:
            await running.http.stop()
            await running.server.stop(None)
            shutil.rmtree(loopback_dir, ignore_errors=True)
            if own_store:
                await asyncio.to_thread(store.close)
            raise
    log.info("listening", address=running.address)
    return running


async def serve(settings: Settings) -> None:
    """`semsearch serve`: run until SIGTERM/SIGINT, then drain."""
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        load = asyncio.create_task(running.load())
        done, _ = await asyncio.wait({load, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if load in done:
            load.result()  # a missing model raises here: fail fast
            await stop.wait()
        else:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await load
        log.info("draining", grace_s=settings.shutdown_grace_s)
    finally:
        await running.stop()
