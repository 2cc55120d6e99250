"""A real Milvus 2.3.5 standalone server on loopback, for tests and benchmarks (pip package `milvus`).

The stock package gives its embedded etcd fixed ports (2379/2380) whatever is configured, so a
second server on the same host never starts; here etcd gets its own loopback ports through an
embed-etcd config file, and every component advertises 127.0.0.1. Ports stay fixed across
stop()/start(), so a test can restart the server on the same data.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Any

COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MilvusTestServer:
    def __init__(self, base_dir: str | Path | None = None) -> None:
        from milvus import MilvusServer, MilvusServerConfig

        peer_port = free_port()

        class LoopbackConfig(MilvusServerConfig):  # type: ignore[misc]
            def try_bind_port(self, port: int) -> socket.socket | None:
                # SO_REUSEADDR as Milvus itself binds: after a kill -9 the port has TIME_WAIT
                # connections, and without it a restart would silently move to the next port.
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                except OSError:
                    sock.close()
                    return None
                return sock

            def write_config(self) -> None:
                super().write_config()
                configs = Path(self.base_data_dir) / "configs"
                client_port = int(self.configurable_items["etcd_port"][1])
                etcd_yaml = configs / "embedEtcd.yaml"
                etcd_yaml.write_text(
                    "name: default\n"
                    f"listen-client-urls: http://127.0.0.1:{client_port}\n"
                    f"advertise-client-urls: http://127.0.0.1:{client_port}\n"
                    f"listen-peer-urls: http://127.0.0.1:{peer_port}\n"
                    f"initial-advertise-peer-urls: http://127.0.0.1:{peer_port}\n"
                    f"initial-cluster: default=http://127.0.0.1:{peer_port}\n",
                    encoding="utf-8",
                )
                milvus_yaml = configs / "milvus.yaml"
                text = milvus_yaml.read_text(encoding="utf-8")
                text = text.replace(f"endpoints: localhost:{client_port}", f"endpoints: 127.0.0.1:{client_port}", 1)
                text = text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd_yaml}\n", 1)
                milvus_yaml.write_text(text, encoding="utf-8")

        self.base_dir = str(base_dir or tempfile.mkdtemp(prefix="milvus-server-"))
        self.server: Any = MilvusServer(LoopbackConfig())
        self.server.set_base_dir(self.base_dir)
        self.server.listen_port = free_port()
        # Every port explicit: the package would otherwise probe upwards from fixed defaults (proxy
        # internal 19529, coordinators, nodes, metrics 9091), and servers starting at the same time
        # on one host race for the same ones. Set once, they stay across stop()/start().
        for key in [k for k in self.server.config.configurable_items if k.endswith("_port")]:
            if key != "proxy_port":
                self.server.config.set(key, free_port())
        self.server.webservice_port = free_port()
        for component in COMPONENTS:
            self.server.config.set(f"{component}.ip", "127.0.0.1")

    @property
    def port(self) -> int:
        return int(self.server.listen_port)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        port = self.port
        try:
            self.server.start()
        except BaseException:
            self.server.stop()
            raise
        if self.port != port:  # a restart must come back where clients expect it
            self.server.stop()
            raise RuntimeError(f"Milvus test server restarted on port {self.port}, not {port}")
        return self.uri

    def kill(self) -> None:
        """kill -9 the server (no graceful shutdown), as a crash or an OOM kill would."""
        proc = self.server.server_proc
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)
            self.server.server_proc = None

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> MilvusTestServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
