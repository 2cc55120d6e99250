"""The `semsearch` command as a user runs it: real processes, real signals, loopback only."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semsearch.v1 import search_pb2 as pb
from semsearch.v1 import search_pb2_grpc
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
SEMSEARCH = [sys.executable, "-m", "semsearch"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SEMSEARCH, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def wait_serving(address: str, process: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"serve exited early: {process.stderr.read() if process.stderr else ''}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("service never became SERVING")


@pytest.fixture
def serve_process(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    port = free_port()
    lite = tmp_path / "milvus.db"
    process = subprocess.Popen(
        [*SEMSEARCH, "serve", "--model", str(tiny_model_dir), "--milvus-uri", str(lite), "--port", str(port),
         "--collection", "docs"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "SEMSEARCH_SHUTDOWN_GRACE_S": "20"},
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, process)
        yield address, process, lite
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_serve_fails_fast_on_a_missing_model(tmp_path: Path) -> None:
    # Fails instead of retrying or serving without a model (run_cli's timeout catches a hang;
    # how fast is not asserted here: timings belong in bench/).
    result = run_cli("serve", "--model", str(tmp_path / "no-such-model"), "--milvus-uri", str(tmp_path / "m.db"),
                     "--port", str(free_port()))
    assert result.returncode == 1
    assert "model directory not found" in result.stderr
    hub = run_cli("serve", "--model", "BAAI/bge-large-zh-v1.5", "--milvus-uri", str(tmp_path / "m.db"),
                  "--port", str(free_port()), env={"HF_HUB_OFFLINE": "1"})
    assert hub.returncode == 1 and "bge-large-zh-v1.5" in hub.stderr


def test_settings_come_from_flags_env_and_config_file(tmp_path: Path) -> None:
    from semsearch.config import load_settings

    config = tmp_path / "semsearch.yaml"
    config.write_text("collection: from_file\nmax_top_k: 7\nport: 6000\n")
    os.environ["SEMSEARCH_PORT"] = "7000"
    try:
        settings = load_settings(config, collection="from_flag")
    finally:
        del os.environ["SEMSEARCH_PORT"], os.environ["SEMSEARCH_CONFIG"]
    assert (settings.collection, settings.port, settings.max_top_k) == ("from_flag", 7000, 7)
    bad = run_cli("search", "x", "--config", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr


def test_search_command_prints_the_documented_json(serve_process: tuple[str, subprocess.Popen[str], Path]) -> None:
    address, _, _ = serve_process
    with grpc.insecure_channel(address) as channel:
        search_pb2_grpc.SearchServiceStub(channel).UpsertDocuments(pb.UpsertDocumentsRequest(documents=[
            pb.Document(id="refund", text="如何申请退款？"), pb.Document(id="invoice", text="发票抬头写错能改吗"),
        ]), timeout=30)
    result = run_cli("search", "退钱怎么操作？", "--addr", address, "--top-k", "2", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) == {"hits", "mode", "model_version", "collection", "took_ms"}
    assert {h["id"] for h in payload["hits"]} == {"refund", "invoice"}
    assert all(set(h) == {"id", "text", "score", "metadata", "retrievers"} for h in payload["hits"])
    # No --mode: the service's default (retrieval_mode auto: hybrid on an untuned collection with BM25).
    assert payload["mode"] == "hybrid" and set(payload["hits"][0]["retrievers"]) <= {"dense", "lexical"}
    dense = json.loads(run_cli("search", "退钱怎么操作？", "--addr", address, "--mode", "dense", "--json").stdout)
    assert dense["mode"] == "dense" and set(dense["hits"][0]["retrievers"]) == {"dense"}
    lexical = run_cli("search", "发票抬头", "--addr", address, "--mode", "lexical", "--json")
    assert lexical.returncode == 0, lexical.stderr
    found = json.loads(lexical.stdout)
    assert found["mode"] == "lexical" and [h["id"] for h in found["hits"]] == ["invoice"]
    hybrid = run_cli("search", "发票抬头", "--addr", address, "--mode", "hybrid")
    assert hybrid.returncode == 0 and "lexical#1" in hybrid.stdout
    marked = json.loads(run_cli("search", "发票抬头", "--addr", address, "--mode", "lexical", "--highlight",
                                "--json").stdout)["hits"][0]
    assert marked["highlights"] and all(marked["text"][a:b] in "发票抬头" for a, b in marked["highlights"])
    assert "<em>" in marked["snippet"] and "highlights" not in found["hits"][0]  # only when asked
    assert "发票" in run_cli("search", "发票抬头", "--addr", address, "--mode", "lexical", "--highlight").stdout
    wrong = run_cli("search", "x", "--addr", address, "--mode", "bm25")
    assert wrong.returncode == 2 and "--mode" in wrong.stderr
    assert payload["collection"].startswith("docs__") and payload["model_version"].startswith("tiny-zh-bert")
    table = run_cli("search", "退钱怎么操作？", "--addr", address, "--filter", "category=none")
    assert table.returncode == 0 and "refund" not in table.stdout
    bad = run_cli("search", "", "--addr", address)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "query is empty" in bad.stderr


def test_a_second_process_writes_to_the_lite_directory_a_running_service_owns(
    serve_process: tuple[str, subprocess.Popen[str], Path], tiny_model_dir: Path,
) -> None:
    address, _, lite = serve_process
    code = (
        "import sys\n"
        "from semsearch.store import MilvusStore, ChunkRow\n"
        "from semsearch.encoders import TorchEncoder\n"
        "encoder = TorchEncoder.from_ref(sys.argv[2])\n"
        "store = MilvusStore(sys.argv[1])\n"
        "info = store.ensure_collection('docs', encoder.manifest, create=False)\n"
        "vector = encoder.encode_documents(['另一个进程写入的文档'])[0]\n"
        "store.write_documents(info.name, [ChunkRow('from-other-process', 0, '另一个进程写入的文档', vector)])\n"
        "store.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(lite), str(tiny_model_dir)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "milvus_lite_shared" in result.stderr  # it went through the service's Lite server
    with grpc.insecure_channel(address) as channel:
        got = search_pb2_grpc.SearchServiceStub(channel).GetDocument(
            pb.GetDocumentRequest(id="from-other-process"), timeout=30)
    assert got.document.text == "另一个进程写入的文档"


def test_sigterm_drains_in_flight_calls(serve_process: tuple[str, subprocess.Popen[str], Path]) -> None:
    address, process, _ = serve_process
    channel = grpc.insecure_channel(address)
    stub = search_pb2_grpc.SearchServiceStub(channel)
    stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=[pb.Document(id="a", text="如何申请退款？")]), timeout=30)
    in_flight = threading.Event()
    stop_sending = threading.Event()
    outcomes: list[tuple[str, float, float]] = []  # (outcome, started, ended), monotonic seconds

    def client(n: int) -> None:
        # Batches of 64 queries keep calls in flight long enough to overlap the signal.
        request = pb.BatchSearchDocumentsRequest(
            requests=[pb.SearchDocumentsRequest(query=f"退款问题{n}{i}" * 20, top_k=1) for i in range(64)])
        while not stop_sending.is_set():
            started = time.monotonic()
            future = stub.BatchSearchDocuments.future(request, timeout=60)
            in_flight.set()
            try:
                future.result()
                outcomes.append(("ok", started, time.monotonic()))
            except grpc.RpcError as exc:
                # After shutdown begins, new calls are refused (UNAVAILABLE); accepted ones must finish.
                outcome = "refused" if exc.code() == grpc.StatusCode.UNAVAILABLE else f"failed {exc.code()}"
                outcomes.append((outcome, started, time.monotonic()))
                return

    with ThreadPoolExecutor(4) as pool:
        for n in range(4):
            pool.submit(client, n)
        in_flight.wait(30)
        time.sleep(0.5)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        stop_sending.set()
    channel.close()
    # Drained: calls in flight when the signal came finished OK after it (not just calls before it).
    drained = [o for o in outcomes if o[0] == "ok" and o[1] < signalled < o[2]]
    assert drained, outcomes
    # Every call sent before the signal was answered or refused as retriable, never cancelled. A call sent
    # after it may still meet the transport's own shutdown (CANCELLED, never handed to the application).
    assert not [o for o in outcomes if o[0].startswith("failed") and o[1] < signalled], outcomes
    assert not [o for o in outcomes if o[0].startswith("failed") and o[0] != "failed StatusCode.CANCELLED"], outcomes


def test_demo_runs_end_to_end_through_grpc(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = run_cli("demo", "--model", str(tiny_model_dir), "--milvus-uri", str(tmp_path / "demo.db"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "indexed 104 FAQ entries" in result.stdout
    assert "退钱怎么操作？" in result.stdout and "faq-" in result.stdout
    assert "MRR@3 on the demo questions: hybrid" in result.stdout and "→ showing" in result.stdout
    assert "dense: faq-" in result.stdout and "lexical: faq-" in result.stdout
    assert "ms for the batch of 6" in result.stdout  # one batch: its time is not each question's
    assert "WARNING" not in result.stdout


def test_demo_falls_back_to_the_packaged_model_with_a_warning(tmp_path: Path) -> None:
    result = run_cli("demo", "--model", "BAAI/bge-large-zh-v1.5", "--milvus-uri", str(tmp_path / "demo.db"),
                     env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stdout and "use-multilingual-v3" in result.stdout
    assert "indexed 104 FAQ entries" in result.stdout
    # The fallback reads Chinese: the demo's paraphrases find their answers (MiniLM scored dense 0.00).
    line = result.stdout.split("MRR@3 on the demo questions:")[1].split("→")[0]
    scores = dict(re.findall(r"(\w+) (\d\.\d\d)", line))
    assert float(scores["dense"]) >= 0.5, scores
    assert max(float(v) for v in scores.values()) >= 0.6, scores


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), str(tmp_path)], check=True,
                   capture_output=True)
    generated_files = sorted(p.name for p in (tmp_path / "semsearch" / "v1").glob("*_pb2*"))
    assert generated_files == sorted(p.name for p in (REPO / "semsearch" / "v1").glob("*_pb2*"))
    assert {"admin_pb2.py", "search_pb2.py", "search_pb2_grpc.py"} <= set(generated_files)
    for name in generated_files:
        generated = (tmp_path / "semsearch" / "v1" / name).read_text()
        committed = (REPO / "semsearch" / "v1" / name).read_text()
        assert generated == committed, f"semsearch/v1/{name} is stale: run scripts/gen_proto.py"
