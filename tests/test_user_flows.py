"""The README's commands as a user runs them: separate processes, in a user's order.

index → serve → search → index more while serving → index verify → restart serve → search →
promote → rollback → gc, on the embedded default (Milvus Lite) and on the real Milvus server.
Every earlier test upserted through a service it started itself, so none of them opened a
collection that another process had written: that is how `serve` after `index` shipped broken.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semsearch.v1 import admin_pb2, admin_pb2_grpc, search_pb2_grpc
from semsearch.v1 import search_pb2 as pb
from tests.conftest import free_port
from tests.tinymodel import build_tiny_bert

REPO = Path(__file__).resolve().parent.parent
SEMSEARCH = [sys.executable, "-m", "semsearch"]
FAQ = REPO / "service" / "data" / "faq.jsonl"
NEW_DOCS = [
    {"id": "new-invoice", "text": "发票抬头开错了可以修改吗？可以，在订单详情页申请重开发票。"},
    {"id": "new-points", "text": "积分什么时候过期？每年12月31日清零上一年度获得的积分。"},
]


@pytest.fixture(scope="module")
def candidate_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model version (other weights): what a fine-tune would hand to `promote`."""
    return build_tiny_bert(tmp_path_factory.mktemp("candidate-bert"), seed=1)


class UserFlow:
    """One user's shell: the same flags on every command, a service started and stopped by hand."""

    def __init__(self, tmp_path: Path, milvus_uri: str, collection: str, model: Path) -> None:
        self.tmp = tmp_path
        self.milvus_uri = milvus_uri
        self.collection = collection
        self.model = model
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "SEMSEARCH_METRICS_PORT": "0", "SEMSEARCH_REGISTRY_POLL_S": "0.5",
                    "SEMSEARCH_SHUTDOWN_GRACE_S": "5", "HF_HUB_OFFLINE": "1"}
        self.serve_process: subprocess.Popen[bytes] | None = None
        self.serve_log = tmp_path / "serve.log"
        self.state_dir = tmp_path / "index-state"

    def common(self) -> list[str]:
        return ["--milvus-uri", self.milvus_uri, "--collection", self.collection]

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*SEMSEARCH, *args], capture_output=True, text=True, timeout=timeout,
                                env=self.env, cwd=self.tmp)
        assert result.returncode == 0, (
            f"`semsearch {' '.join(args)}` exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
            f"stderr:\n{result.stderr[-3000:]}"
        )
        return result

    def index(self, *inputs: Path) -> None:
        self.run("index", *map(str, inputs), *self.common(), "--model", str(self.model),
                 "--state-dir", str(self.state_dir))

    def serve(self) -> None:
        assert self.serve_process is None
        log = self.serve_log.open("ab")
        self.serve_process = subprocess.Popen(
            [*SEMSEARCH, "serve", *self.common(), "--model", str(self.model), "--port", str(self.port)],
            stdout=log, stderr=log, env=self.env, cwd=self.tmp,
        )
        self.wait_serving()

    def wait_serving(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.serve_process is not None
                if self.serve_process.poll() is not None:
                    raise AssertionError(f"serve exited {self.serve_process.returncode}:\n{self.log_tail()}")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"serve never became SERVING:\n{self.log_tail()}")

    def stop_serving(self) -> None:
        assert self.serve_process is not None
        self.serve_process.send_signal(signal.SIGTERM)
        assert self.serve_process.wait(60) == 0, self.log_tail()
        self.serve_process = None

    def kill(self) -> None:
        if self.serve_process is not None and self.serve_process.poll() is None:
            self.serve_process.kill()
            self.serve_process.wait(30)
        self.serve_process = None

    def log_tail(self) -> str:
        return self.serve_log.read_text(errors="replace")[-4000:] if self.serve_log.exists() else ""

    def search(self, query: str) -> dict[str, Any]:
        result = self.run("search", query, "--addr", self.address, "--top-k", "5", "--json", timeout=120)
        return dict(json.loads(result.stdout))

    def get(self, doc_id: str) -> pb.GetDocumentResponse | None:
        with grpc.insecure_channel(self.address) as channel:
            try:
                return search_pb2_grpc.SearchServiceStub(channel).GetDocument(
                    pb.GetDocumentRequest(id=doc_id), timeout=30)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise

    def serving_state(self) -> admin_pb2.GetServingStateResponse:
        with grpc.insecure_channel(self.address) as channel:
            return admin_pb2_grpc.AdminServiceStub(channel).GetServingState(
                admin_pb2.GetServingStateRequest(), timeout=30)

    def wait_model(self, version: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serving_state().current.model_version == version:
                return
            time.sleep(0.3)
        raise AssertionError(f"the service never switched to {version}: {self.serving_state()}\n{self.log_tail()}")


def write_inputs(tmp_path: Path) -> tuple[Path, Path, int]:
    faq_rows = FAQ.read_text(encoding="utf-8").splitlines()[:30]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(faq_rows) + "\n", encoding="utf-8")
    more = tmp_path / "more.jsonl"
    more.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in NEW_DOCS) + "\n", encoding="utf-8")
    return docs, more, len(faq_rows)


def model_version(model_dir: Path) -> str:
    return str(json.loads((model_dir / "semsearch_manifest.json").read_text())["version"])


def run_readme_flow(flow: UserFlow, candidate: Path) -> None:
    docs, more, faq_count = write_inputs(flow.tmp)
    first_id = json.loads(docs.read_text(encoding="utf-8").splitlines()[0])["id"]
    base_version = model_version(flow.model)

    flow.index(docs)  # 1. index, and the process exits
    flow.serve()  # 2. another process opens what the indexer wrote
    found = flow.search("退钱怎么操作？")  # 3. the client command
    assert found["hits"], found
    assert found["model_version"] == base_version
    assert flow.get(first_id) is not None

    flow.index(more)  # 4. index more while the service runs (Lite: through the service's endpoint)
    added = flow.get("new-invoice")
    assert added is not None and "发票" in added.document.text
    verify = flow.run("index", "verify", str(docs), str(more), *flow.common(), "--model", str(flow.model),
                      "--state-dir", str(flow.state_dir), "--json")  # 5.
    summary = json.loads(verify.stdout)
    assert summary.get("ok", summary.get("passed", True)) is not False, summary

    flow.stop_serving()  # 6. restart on the same data
    flow.serve()
    assert flow.search("发票抬头开错了")["hits"]
    assert flow.get("new-points") is not None and flow.get(first_id) is not None

    candidate_version = model_version(candidate)
    flow.run("promote", str(candidate), *flow.common(), "--force")  # 7. while serving
    flow.wait_model(candidate_version)
    after = flow.search("退钱怎么操作？")
    assert after["model_version"] == candidate_version and after["hits"]
    assert flow.get("new-invoice") is not None  # the re-embedded copy holds every document

    flow.run("rollback", *flow.common())  # 8.
    flow.wait_model(base_version)
    assert flow.search("积分什么时候过期")["model_version"] == base_version

    flow.run("gc", "--yes", "--milvus-uri", flow.milvus_uri)  # 9. keeps what the registry references
    assert flow.search("退钱怎么操作？")["hits"]
    assert flow.get(first_id) is not None

    flow.kill()  # 10. a crash, then a cold start on the same data
    flow.serve()
    state = flow.serving_state()
    assert state.current.model_version == base_version
    assert len({hit["id"] for hit in flow.search("如何申请退款？")["hits"]}) >= 1
    assert faq_count + len(NEW_DOCS) >= 3


def test_readme_flow_on_milvus_lite(tmp_path: Path, tiny_model_dir: Path, candidate_model_dir: Path) -> None:
    flow = UserFlow(tmp_path, str(tmp_path / "milvus.db"), "faq", tiny_model_dir)
    try:
        run_readme_flow(flow, candidate_model_dir)
    finally:
        flow.kill()


@pytest.mark.milvus_server
def test_readme_flow_on_the_milvus_server(tmp_path: Path, tiny_model_dir: Path, candidate_model_dir: Path,
                                          milvus_server_uri: str) -> None:
    flow = UserFlow(tmp_path, milvus_server_uri, f"faq_{free_port()}", tiny_model_dir)
    try:
        run_readme_flow(flow, candidate_model_dir)
    finally:
        flow.kill()
