"""Milvus Lite shared between processes.

Milvus Lite holds an exclusive lock on its data directory, so only one process may open it. The
first semsearch process to need a directory opens it and serves it over loopback gRPC (Lite's own
Milvus-protocol server), publishing the port in `<dir>.endpoint.json`; every other process
(`semsearch index` beside a running `semsearch serve`) connects to that port instead of failing on
the lock. Lite's engine is single-writer per collection, so the owner serializes mutating calls.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog

from semsearch.errors import BackendUnavailableError

log = structlog.get_logger(__name__)

_MUTATING_METHODS = frozenset({
    "CreateCollection", "DropCollection", "Insert", "Upsert", "Delete", "CreateIndex", "DropIndex",
    "LoadCollection", "ReleaseCollection", "Flush", "CreatePartition", "DropPartition",
    "TruncateCollection", "RenameCollection", "CreateAlias", "AlterAlias", "DropAlias",
    "AlterCollection", "ManualCompaction",
})
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
ATTACH_WAIT_S = 15.0


def is_local_uri(uri: str) -> bool:
    return "://" not in uri


def endpoint_file(data_dir: str | Path) -> Path:
    path = Path(data_dir).resolve()
    return path.with_name(path.name + ".endpoint.json")


class _SerializeWrites(grpc.ServerInterceptor):
    """Run Lite's mutating RPCs one at a time, whichever process sent them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler is None or method not in _MUTATING_METHODS or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        lock = self._lock

        def locked(request: Any, context: Any) -> Any:
            with lock:
                return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            locked, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LiteEndpoint:
    """A process's handle on a Lite directory: either its owner (serving it) or a client."""

    data_dir: Path
    port: int
    owner: bool
    _server: Any = None
    _db: Any = None
    _refs: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def attach(cls, uri: str) -> LiteEndpoint:
        data_dir = Path(uri).expanduser().resolve()
        with _REGISTRY_LOCK:
            existing = _REGISTRY.get(data_dir)
            if existing is not None:
                existing._refs += 1
                return existing
            endpoint = cls._attach_new(data_dir)
            _REGISTRY[data_dir] = endpoint
            return endpoint

    @classmethod
    def _attach_new(cls, data_dir: Path) -> LiteEndpoint:
        from milvus_lite import DataDirLockedError

        deadline = time.monotonic() + ATTACH_WAIT_S
        while True:
            published = cls._read_published(data_dir)
            if published is not None:
                log.info("milvus_lite_shared", data_dir=str(data_dir), port=published)
                return cls(data_dir=data_dir, port=published, owner=False)
            try:
                return cls._serve(data_dir)
            except DataDirLockedError as exc:
                # Another process holds the lock but has not published its port yet.
                if time.monotonic() > deadline:
                    raise BackendUnavailableError(
                        f"Milvus Lite directory {data_dir} is locked by another process that does not "
                        f"publish an endpoint ({endpoint_file(data_dir)} missing)"
                    ) from exc
                time.sleep(0.2)

    @staticmethod
    def _read_published(data_dir: Path) -> int | None:
        path = endpoint_file(data_dir)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        port, pid = int(record["port"]), int(record["pid"])
        if pid != os.getpid() and _pid_alive(pid) and _port_answers(port):
            return port
        return None

    @classmethod
    def _serve(cls, data_dir: Path) -> LiteEndpoint:
        from milvus_lite import MilvusLite
        from milvus_lite.adapter.grpc.servicer import MilvusServicer
        from pymilvus.grpc_gen import milvus_pb2_grpc

        data_dir.parent.mkdir(parents=True, exist_ok=True)
        db = MilvusLite(str(data_dir))
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="milvus-lite"),
            interceptors=[_SerializeWrites()],
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(db), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        path = endpoint_file(data_dir)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "port": port}))
        tmp.replace(path)
        log.info("milvus_lite_opened", data_dir=str(data_dir), port=port)
        return cls(data_dir=data_dir, port=port, owner=True, _server=server, _db=db)

    def release(self) -> None:
        with _REGISTRY_LOCK:
            self._refs -= 1
            if self._refs > 0:
                return
            _REGISTRY.pop(self.data_dir, None)
        if not self.owner:
            return
        path = endpoint_file(self.data_dir)
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
        self._server.stop(grace=2).wait()
        self._db.close()
        log.info("milvus_lite_closed", data_dir=str(self.data_dir))


_REGISTRY: dict[Path, LiteEndpoint] = {}
_REGISTRY_LOCK = threading.Lock()
