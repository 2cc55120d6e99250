"""Promotion and rollback end to end: real Milvus server (aliases), two real local models, live load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from semsearch import promotion
from semsearch.chunking import content_hash
from semsearch.config import Settings
from semsearch.encoders import TorchEncoder
from semsearch.promotion import Promoter, PromotionError
from semsearch.reembed import Validation, copy_rows, validate
from semsearch.registry import ModelRegistry
from semsearch.store import ChunkRow, MilvusStore, versioned_name
from semsearch.v1 import admin_pb2, admin_pb2_grpc
from semsearch.v1 import search_pb2 as pb
from tests.conftest import LiveService
from tests.tinymodel import build_tiny_bert

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.milvus_server  # aliases and the registry on the real server


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-v2"), seed=1)


@pytest.fixture(scope="module")
def second_encoder(second_model_dir: Path) -> TorchEncoder:
    return TorchEncoder.from_ref(str(second_model_dir), device="cpu")


def seed_documents(service: LiveService, count: int) -> None:
    docs = [pb.Document(id=f"seed-{n}", text=f"第{n}个问题：如何申请退款？订单{n}的发票抬头写错能改吗")
            for n in range(count)]
    service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(documents=docs), timeout=60)


class Load:
    """Continuous searches and upserts; records every outcome."""

    def __init__(self, service: LiveService) -> None:
        self.service = service
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.served: list[tuple[str, str]] = []
        self.acknowledged: list[str] = []
        self.latencies: list[tuple[float, float]] = []  # (time, ms)
        self.threads = [threading.Thread(target=self._search, daemon=True),
                        threading.Thread(target=self._search, daemon=True),
                        threading.Thread(target=self._upsert, daemon=True)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _search(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            started = time.perf_counter()
            try:
                response = self.service.stub.SearchDocuments(pb.SearchDocumentsRequest(query=f"退款{n}", top_k=3),
                                                             timeout=30)
                self.served.append((response.model_version, response.collection))
                self.latencies.append((time.monotonic(), (time.perf_counter() - started) * 1e3))
            except grpc.RpcError as exc:
                self.failures.append(f"search: {exc.code().name} {exc.details()}")

    def _upsert(self) -> None:
        n = 0
        while not self.stop.is_set():
            doc_id = f"live-{n}"
            try:
                self.service.stub.UpsertDocuments(pb.UpsertDocumentsRequest(
                    documents=[pb.Document(id=doc_id, text=f"运行中写入的第{n}个文档")]), timeout=30)
                self.acknowledged.append(doc_id)
            except grpc.RpcError as exc:
                self.failures.append(f"upsert: {exc.code().name} {exc.details()}")
            n += 1
            time.sleep(0.02)


def serving(service: LiveService) -> tuple[str, str]:
    state = admin_pb2_grpc.AdminServiceStub(service.channel).GetServingState(admin_pb2.GetServingStateRequest(),
                                                                             timeout=10)
    return state.current.model_version, state.current.collection


def wait_serving(service: LiveService, pair: tuple[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serving(service) == pair:
            return
        time.sleep(0.1)
    raise AssertionError(f"service still serves {serving(service)}, not {pair}")


def doc_ids(store: MilvusStore, collection: str) -> set[str]:
    return {str(row["doc_id"]) for row in store.iter_rows(collection, ["doc_id"])}


def test_promote_and_rollback_under_load_lose_nothing(
    make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder, second_encoder: TorchEncoder,
    milvus_server_uri: str, collection_name: str,
) -> None:
    name = collection_name
    service = make_service(tiny_encoder, milvus_uri=milvus_server_uri, collection=name, registry_poll_s=0.3)
    seed_documents(service, 40)
    v1, v2 = tiny_encoder.manifest.version, second_encoder.manifest.version
    c1, c2 = versioned_name(name, v1), versioned_name(name, v2)
    assert serving(service) == (v1, c1)
    store = MilvusStore(milvus_server_uri, timeout_s=60)
    promoter = Promoter(service.settings, store, propagation_s=1.0)
    try:
        with Load(service) as load:
            time.sleep(1.0)
            target = promoter.candidate_pair(name, second_encoder, None, {})
            report = promoter.move(name, target, second_encoder, replay_since_ms=None, event="promote")
            wait_serving(service, (v2, c2))
            assert store.resolve(name) == c2
            time.sleep(1.0)
            acknowledged_before_rollback = list(load.acknowledged)
            in_new = doc_ids(store, c2)
            rolled = promoter.rollback(name)
            wait_serving(service, (v1, c1))
            time.sleep(1.0)
        assert not load.failures, load.failures[:5]
        assert set(load.served) <= {(v1, c1), (v2, c2)}  # no response mixed a model with another's vectors
        assert (v2, c2) in load.served and (v1, c1) in load.served
        assert len(load.acknowledged) > 20
        # No acknowledged upsert lost: all in the pair serving now, and all written before the rollback
        # in the candidate collection too.
        assert set(load.acknowledged) <= doc_ids(store, c1)
        assert set(acknowledged_before_rollback) <= in_new
        assert store.count(c1) == 40 + len(set(load.acknowledged))
        assert report.copy is not None and report.copy.written >= 40
        assert rolled.copy is None  # rollback only replays what changed
        record = ModelRegistry(store).get(name)
        assert record is not None and record.current is not None and record.previous is not None
        assert (record.current.collection, record.previous.collection, record.pending) == (c1, c2, None)
        assert store.resolve(name) == c1
        # What an operator reads back (DescribeCollection, the console's collection panel): the history.
        described = admin_pb2_grpc.AdminServiceStub(service.channel).DescribeCollection(
            admin_pb2.DescribeCollectionRequest(), timeout=30)
        events = [event.event for event in described.history]
        assert events[-4:] == ["promote_started", "promote_swapped", "rollback_started", "rollback_swapped"], events
        assert described.history[-1].details["collection"] == c1 == described.collection
        assert described.documents == store.count(c1)
        # Both collections stay until gc; gc keeps what the registry references.
        assert promoter.gc(dry_run=True) == []
    finally:
        store.close()


def _promote_cli(*args: str, crash_after: str | None = None) -> subprocess.CompletedProcess[str]:
    # A crash is a real process kill at that step, injected from outside by a test-only wrapper.
    module = "semsearch" if crash_after is None else "tests.promote_crash"
    env = {**os.environ, "SEMSEARCH_REGISTRY_POLL_S": "0.2"}
    if crash_after is not None:
        env["SEMSEARCH_TEST_CRASH_AFTER"] = crash_after
    return subprocess.run([sys.executable, "-m", module, "promote", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)


def _eval_rows(path: Path) -> Path:
    rows = [{"query": "如何申请退款", "pos": ["退款怎么申请"], "neg": ["发票抬头写错能改吗"]},
            {"query": "快递几天没动静", "pos": ["包裹物流一直在运输中"], "neg": ["手机开不了机"]},
            {"query": "密码忘记了", "pos": ["如何找回账号登录"], "neg": ["会员积分等级"]}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def _bootstrapped(uri: str, name: str, encoder: TorchEncoder) -> MilvusStore:
    store = MilvusStore(uri, timeout_s=60)
    physical = versioned_name(name, encoder.manifest.version)
    store.ensure_collection(physical, encoder.manifest)
    store.point_alias(name, physical)
    from semsearch.store import ChunkRow

    texts = [f"第{n}条：如何申请退款？" for n in range(12)]
    store.write_documents(physical, [ChunkRow(f"d{n}", 0, t, v) for n, (t, v) in
                                     enumerate(zip(texts, encoder.encode_documents(texts), strict=True))])
    return store


def test_a_failed_gate_changes_nothing(tiny_model_dir: Path, tiny_encoder: TorchEncoder, second_model_dir: Path,
                                       milvus_server_uri: str, collection_name: str, tmp_path: Path) -> None:
    store = _bootstrapped(milvus_server_uri, collection_name, tiny_encoder)
    try:
        collections_before = set(store.client.list_collections())
        result = _promote_cli(str(second_model_dir), "--collection", collection_name, "--milvus-uri",
                              milvus_server_uri, "--eval-data", str(_eval_rows(tmp_path / "eval.jsonl")),
                              "--min-improvement", "1.5")
        assert result.returncode == 3, result.stderr  # refused, not failed
        assert "gate failed" in result.stderr and "recall@1" in result.stderr
        assert set(store.client.list_collections()) == collections_before
        assert ModelRegistry(store).get(collection_name) is None  # not even a bootstrap record
        assert store.resolve(collection_name) == versioned_name(collection_name, tiny_encoder.manifest.version)
        missing = _promote_cli(str(second_model_dir), "--collection", collection_name, "--milvus-uri",
                               milvus_server_uri)
        assert missing.returncode == 2 and "--eval-data" in missing.stderr
    finally:
        store.close()


@pytest.mark.parametrize("step", ["pending", "copy", "replay", "validate", "registry", "swap"])
def test_a_crash_at_any_step_leaves_a_state_a_rerun_completes(
    step: str, tiny_encoder: TorchEncoder, second_model_dir: Path, second_encoder: TorchEncoder,
    milvus_server_uri: str, collection_name: str,
) -> None:
    name = collection_name
    store = _bootstrapped(milvus_server_uri, name, tiny_encoder)
    c1, c2 = (versioned_name(name, e.manifest.version) for e in (tiny_encoder, second_encoder))
    try:
        args = (str(second_model_dir), "--collection", name, "--milvus-uri", milvus_server_uri, "--force")
        crashed = _promote_cli(*args, crash_after=step)
        assert crashed.returncode == 137 and f"crash injected after {step}" in crashed.stderr, crashed.stderr
        record = ModelRegistry(store).get(name)
        assert record is not None and record.current is not None
        if step == "swap":  # everything done but the report
            assert record.current.collection == c2 and store.resolve(name) == c2 and record.pending is None
        elif step == "registry":  # the record moved, the alias not yet: readers through the registry are right
            assert record.current.collection == c2 and store.resolve(name) == c1
        else:  # nothing moved; the pending pair tells services to dual-write
            assert record.current.collection == c1 and store.resolve(name) == c1
            assert record.pending is not None and record.pending.collection == c2
        if step == "copy":  # the command a user re-runs
            rerun = _promote_cli(*args)
            assert rerun.returncode == 0, rerun.stderr
        else:  # the same library call in this process: one model load less per step
            settings = Settings(milvus_uri=milvus_server_uri, collection=name)
            report = Promoter(settings, store, propagation_s=0.5).promote(
                name, second_encoder, lambda current: pytest.fail("a resumed promotion re-ran the gate"))
            assert report.to_pair.collection == c2
        record = ModelRegistry(store).get(name)
        assert record is not None and record.current is not None and record.pending is None
        assert record.current.collection == c2 and store.resolve(name) == c2
        assert store.count(c2) == store.count(c1) == 12
    finally:
        store.close()


# ---------------------------------------------------------------- validation: exact, not counts
def _row(doc_id: str, text: str, encoder: TorchEncoder, hash_of: str | None = None) -> ChunkRow:
    return ChunkRow(doc_id, 0, text, encoder.encode_documents([text])[0],
                    content_hash=content_hash(text if hash_of is None else hash_of))


def _copied_pair(uri: str, name: str, live: TorchEncoder, candidate: TorchEncoder) -> tuple[MilvusStore, str, str]:
    """A live collection of 12 rows and its candidate copy, as the re-embed step leaves them."""
    store = MilvusStore(uri, timeout_s=60)
    source, target = f"{name}_live", f"{name}_cand"
    store.ensure_collection(source, live.manifest)
    store.ensure_collection(target, candidate.manifest)
    store.write_documents(source, [_row(f"d{n}", f"第{n}条：如何申请退款？", live) for n in range(12)])
    copy_rows(store, source, target, candidate)
    return store, source, target


def test_validation_refuses_divergence_with_equal_counts(
    tiny_encoder: TorchEncoder, second_encoder: TorchEncoder, milvus_server_uri: str, collection_name: str,
) -> None:
    store, source, target = _copied_pair(milvus_server_uri, collection_name, tiny_encoder, second_encoder)
    try:
        assert validate(store, source, target, second_encoder, settle_s=0.5).ok
        # Written before validation, straight into the candidate: one row lost, one that the live
        # collection never had, one with other content. Vectors all match their texts, counts stay 12.
        store.delete_rows(target, ["d3#0"])
        store.upsert(target, [_row("ghost", "不存在的文档", second_encoder),
                              _row("d5", "第5条：如何申请退款？", second_encoder, hash_of="旧的内容")])
        check = validate(store, source, target, second_encoder, settle_s=0.5)
        assert not check.ok
        assert (check.source_count, check.target_count) == (12, 12)
        assert (check.missing, check.extra, check.changed, check.in_flight) == (["d3#0"], ["ghost#0"], ["d5#0"], 0)
        assert check.mismatched == [] and check.sampled == 12
    finally:
        store.close()


def test_a_promotion_refuses_divergence_naming_rows(
    tiny_encoder: TorchEncoder, second_encoder: TorchEncoder, milvus_server_uri: str, collection_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = collection_name
    store = _bootstrapped(milvus_server_uri, name, tiny_encoder)
    c2 = versioned_name(name, second_encoder.manifest.version)

    def corrupt_then_validate(store: MilvusStore, source: str, target: str, encoder: TorchEncoder,
                              **kwargs: object) -> Validation:
        # After the copy: d3 lost and an extra row (the counts still agree), before validation starts.
        store.delete_rows(target, ["d3#0"])
        store.upsert(target, [_row("ghost", "不存在的文档", encoder)])
        return validate(store, source, target, encoder, settle_s=0.5)

    monkeypatch.setattr(promotion, "validate", corrupt_then_validate)
    try:
        settings = Settings(milvus_uri=milvus_server_uri, collection=name)
        with pytest.raises(PromotionError) as refused:
            Promoter(settings, store).promote(name, second_encoder, lambda current: {})
        message = str(refused.value)
        assert "12 rows live vs 12 in " + c2 in message, message
        assert "1 live rows missing there, 1 there whose live row is gone" in message, message
        assert "d3#0" in message and "ghost#0" in message, message
        record = ModelRegistry(store).get(name)
        assert record is not None and record.pending is not None and record.pending.collection == c2
        assert store.resolve(name) == versioned_name(name, tiny_encoder.manifest.version)  # nothing swapped
    finally:
        store.close()


def test_validation_waits_for_a_dual_write_in_flight(
    tiny_encoder: TorchEncoder, second_encoder: TorchEncoder, milvus_server_uri: str, collection_name: str,
) -> None:
    """A write acknowledged by the live collection reaches the candidate seconds later (a slow
    dual-write): validation waits for it instead of refusing."""
    store, source, target = _copied_pair(milvus_server_uri, collection_name, tiny_encoder, second_encoder)
    writer = MilvusStore(milvus_server_uri, timeout_s=60)
    late = _row("late", "运行中写入的文档", second_encoder)
    landed = threading.Timer(8.0, lambda: writer.write_documents(target, [late]))
    try:
        store.write_documents(source, [_row("late", "运行中写入的文档", tiny_encoder)])
        landed.start()
        check = validate(store, source, target, second_encoder, settle_s=15.0)
        assert check.ok, check
        assert check.in_flight == 0  # it landed within the window
        assert check.source_count == 13
    finally:
        landed.join(30)
        writer.close()
        store.close()


def test_validation_counts_a_row_rewritten_meanwhile_as_in_flight(
    tiny_encoder: TorchEncoder, second_encoder: TorchEncoder, milvus_server_uri: str, collection_name: str,
) -> None:
    """A row whose candidate copy is behind and that is rewritten during validation, its dual writes
    not landed within the window: in flight, not divergence (the dual write brings it up to date)."""
    store, source, target = _copied_pair(milvus_server_uri, collection_name, tiny_encoder, second_encoder)
    store.write_documents(target, [_row("d1", "第1条：旧版本", second_encoder)])
    writer = MilvusStore(milvus_server_uri, timeout_s=60)

    def rewrite() -> None:
        for n in range(20):  # a second or more: validation's first read lands among them
            writer.write_documents(source, [_row("d1", f"第1条：第{n}次修改", tiny_encoder)])
            time.sleep(0.05)

    thread = threading.Thread(target=rewrite, daemon=True)
    try:
        thread.start()
        check = validate(store, source, target, second_encoder, settle_s=5.0)
        assert check.ok, check
        assert (check.source_count, check.target_count, check.in_flight) == (12, 12, 1)
    finally:
        thread.join(30)
        writer.close()
        store.close()
