"""placeholder; full benchmark written below"""
from __future__ import annotations

import os
import socket
import tempfile


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _loopback_server_config_cls():
    from milvus import MilvusServerConfig

    class LoopbackConfig(MilvusServerConfig):
        """Writes an embedded-etcd config so etcd's client AND peer ports are private.

        Stock milvus 2.3.5 passes no etcd config, so embedded etcd always binds
        127.0.0.1:2379 (client) and :2380 (peer) no matter what `etcd_port` says:
        a second server on the host dies with "listen tcp 127.0.0.1:2380: bind:
        address already in use" (or worse, points `etcd.endpoints` at someone
        else's etcd). We give it free loopback ports via `etcd.config.path`.
        """

        def write_config(self):
            super().write_config()
            cfg_dir = os.path.join(self.base_data_dir, "configs")
            client = int(self.configurable_items["etcd_port"][1])
            peer = free_port()
            etcd_yaml = os.path.join(cfg_dir, "embedEtcd.yaml")
            with open(etcd_yaml, "w", encoding="utf-8") as f:
                f.write(
                    "name: default\n"
                    f"listen-client-urls: http://127.0.0.1:{client}\n"
                    f"advertise-client-urls: http://127.0.0.1:{client}\n"
                    f"listen-peer-urls: http://127.0.0.1:{peer}\n"
                    f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
                    f"initial-cluster: default=http://127.0.0.1:{peer}\n"
                )
            path = os.path.join(cfg_dir, "milvus.yaml")
            with open(path, encoding="utf-8") as f:
                text = f.read()
            text = text.replace(f"endpoints: localhost:{client}", f"endpoints: 127.0.0.1:{client}", 1)
            text = text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd_yaml}\n", 1)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)

    return LoopbackConfig


class MilvusServerHandle:
    """Start/stop the real Milvus 2.3.5 standalone binary shipped in the `milvus` PyPI package.

    Notes (from milvus/__init__.py):
      * set_base_dir() must be called before start(); binaries are unpacked to <base>/bin,
        config to <base>/configs/milvus.yaml, data to <base>/data, logs to <base>/logs.
      * listen_port sets the *starting* proxy port; start() probes 127.0.0.1 upward from it
        and takes the first free one, so read listen_port back after start().
      * The Go gRPC servers listen on ":port" (all interfaces) in 2.3.x; there is no listen-ip
        setting. We set every component's advertised `ip` to 127.0.0.1 so internal traffic
        uses loopback; etcd binds 127.0.0.1 only.
    """

    COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord",
                  "indexNode", "dataCoord", "dataNode")

    def __init__(self, base_dir: str | None = None):
        from milvus import MilvusServer
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="milvus_srv_", dir="/tmp")
        self.server = MilvusServer(_loopback_server_config_cls()())
        self.port = None

    def start(self) -> str:
        self.server.set_base_dir(self.base_dir)
        self.server.listen_port = free_port()
        self.server.config.set("etcd_port", free_port())
        for comp in self.COMPONENTS:
            self.server.config.set(f"{comp}.ip", "127.0.0.1")
        try:
            self.server.start()
        except BaseException:
            self.server.stop()
            raise
        self.port = self.server.listen_port
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()
