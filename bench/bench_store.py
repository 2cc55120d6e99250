"""placeholder; full benchmark written below"""
from __future__ import annotations

import os
import socket
import tempfile
import time


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class MilvusServerHandle:
    """Start/stop the real Milvus 2.3.5 standalone binary shipped in the `milvus` PyPI package.

    Notes (from milvus/__init__.py):
      * set_base_dir() must be called before start(); binaries are unpacked to <base>/bin,
        config to <base>/configs/milvus.yaml, data to <base>/data, logs to <base>/logs.
      * listen_port sets the *starting* proxy port; start() probes 127.0.0.1 upward from it
        and takes the first free one, so read listen_port back after start().
      * The Go gRPC servers listen on ":port" (all interfaces) in 2.3.x; there is no listen-ip
        setting. We set every component's advertised `ip` to 127.0.0.1 so internal traffic
        uses loopback; etcd (2379/2380) binds 127.0.0.1 only.
    """

    COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord",
                  "indexNode", "dataCoord", "dataNode")

    def __init__(self, base_dir: str | None = None):
        from milvus import MilvusServer, MilvusServerConfig
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="milvus_srv_", dir="/tmp")
        self.server = MilvusServer(MilvusServerConfig())
        self.port = None

    def start(self) -> str:
        self.server.set_base_dir(self.base_dir)
        self.server.listen_port = free_port()
        for comp in self.COMPONENTS:
            self.server.config.set(f"{comp}.ip", "127.0.0.1")
        self.server.start()
        self.port = self.server.listen_port
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()
