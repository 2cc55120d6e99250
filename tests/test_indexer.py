"""The batch indexer on real Milvus Lite and the real Milvus server: formats, bad rows, chunking,
idempotent re-runs, pruning, kill -9 + resume, shards, verify, aliases and the CLI."""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from indexer.checkpoint import JobState, Progress, read_progress
from indexer.cli import register
from indexer.job import IndexOptions, IndexResult, JobError, run_index
from indexer.pipeline import (
    PipelineConfig,
    StrictModeError,
    token_counter,
)
from indexer.sources import (
    FieldMap,
    Limits,
    Position,
    Reject,
    SourceDoc,
    derived_id,
    discover,
    read_all,
    read_file,
    shard_of,
)
from indexer.verify import run_verify
from semsearch.chunking import Chunker, reassemble
from semsearch.encoders import TorchEncoder
from semsearch.registry import ModelRegistry
from semsearch.store import MilvusStore, versioned_name
from tests.tinymodel import build_tiny_bert

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["如何申请退款？", "快递包裹几天没动静了。", "手机开不了机怎么办！", "密码忘记了如何找回；",
             "发票抬头写错能改吗？", "会员积分等级是多少。", "订单地址修改后提交审核…",
             "优惠券支付失败重复扣款！"]


def corpus(n: int, seed: int = 0, max_sentences: int = 40) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"id": f"doc-{i}", "metadata": {"n": i, "tag": rng.choice(["a", "b"])},
         "text": "".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, max_sentences)))}
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def options(tmp_path: Path, inputs: list[Path | str], **overrides: Any) -> IndexOptions:
    pipeline = PipelineConfig(batch_chunks=96, checkpoint_interval_s=0.5, retry_timeout_s=20,
                              **overrides.pop("pipeline", {}))
    return IndexOptions(inputs=[str(p) for p in inputs], state_dir=tmp_path / "state", progress="off",
                        pipeline=pipeline, **overrides)


def stored(store: MilvusStore, collection: str) -> list[dict[str, Any]]:
    return list(store.iter_rows(collection, ["id", "doc_id", "chunk_index", "content_hash", "text"]))


def expected_chunk_count(encoder: TorchEncoder, docs: list[dict[str, Any]]) -> int:
    chunker = Chunker(encoder.count_tokens, encoder.manifest.max_tokens)
    return sum(len(chunker.chunk(doc["text"])) for doc in docs)


@pytest.fixture
def index(tiny_encoder: TorchEncoder) -> Callable[..., IndexResult]:
    def run(store: MilvusStore, collection: str, opts: IndexOptions,
            encoder: TorchEncoder | None = None) -> IndexResult:
        return run_index(opts, encoder=encoder or tiny_encoder, store=store, collection=collection)

    return run


# ---------------------------------------------------------------------------------------- sources
def wait_for_progress(process: subprocess.Popen[Any], state_dir: Path, documents: int,
                      timeout_s: float) -> Progress | None:
    """Until an indexer subprocess has checkpointed `documents` documents (or exited, or time is up)."""
    progress = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        jobs = list(state_dir.glob("*.sqlite"))
        progress = read_progress(state_dir, jobs[0].stem) if jobs else None
        if progress is not None and progress.totals.get("documents", 0) >= documents:
            break
        time.sleep(0.05)
    return progress


def test_formats_and_field_mapping_read_the_same_documents(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"key": "a1", "body": "第一段。", "head": "标题", "src": "web", "meta": {"lang": "zh"}},
        {"key": "", "body": "没有编号的文档。", "head": "", "src": "faq", "meta": None},
    ]
    fields = FieldMap(id="key", text="body", title="head", metadata=("src",), metadata_object="meta")
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "a.jsonl", rows)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    for name, delimiter in (("c.csv", ","), ("d.tsv", "\t")):
        with (tmp_path / name).open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter=delimiter)
            writer.writerow(["key", "body", "head", "src", "meta"])
            for row in rows:
                writer.writerow([row["key"], row["body"], row["head"], row["src"],
                                 json.dumps(row["meta"], ensure_ascii=False) if row["meta"] else ""])
    pq.write_table(pa.Table.from_pylist([{**row, "meta": json.dumps(row["meta"]) if row["meta"] else None}
                                         for row in rows]), tmp_path / "e.parquet")
    files = discover([str(tmp_path / "dir"), str(tmp_path / "b.jsonl.gz"), str(tmp_path / "c.csv"),
                      str(tmp_path / "d.tsv"), str(tmp_path / "e.parquet")])
    assert [f.format for f in files] == ["jsonl", "jsonl", "csv", "tsv", "parquet"]
    records = list(read_all(files, fields, Limits()))
    assert all(isinstance(r, SourceDoc) for r in records), [r for r in records if isinstance(r, Reject)]
    by_file: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for record in records:
        assert isinstance(record, SourceDoc)
        by_file.setdefault(record.file, []).append((record.doc_id, record.text, record.metadata))
    first = next(iter(by_file.values()))
    assert first[0] == ("a1", "标题\n第一段。", {"lang": "zh", "src": "web", "title": "标题"})
    assert first[1] == (derived_id("没有编号的文档。"), "没有编号的文档。", {"src": "faq"})
    assert all(docs == first for docs in by_file.values())

    old_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO((tmp_path / "dir" / "a.jsonl").read_bytes()))
    try:
        from_stdin = list(read_all(discover(["-"]), fields, Limits()))
    finally:
        sys.stdin = old_stdin
    assert [(r.doc_id, r.text) for r in from_stdin if isinstance(r, SourceDoc)] == [d[:2] for d in first]


def test_reading_resumes_at_a_checkpointed_position_in_every_format(tmp_path: Path) -> None:
    rows = corpus(30, seed=2, max_sentences=3)
    for i in range(0, 30, 4):
        rows[i]["text"] += "\n第二行，引号\"在内\"。"  # multi-line quoted CSV fields
    write_jsonl(tmp_path / "a.jsonl", rows)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with (tmp_path / "c.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([row["id"], row["text"]] for row in rows)
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "text": r["text"]} for r in rows]), tmp_path / "d.parquet",
                   row_group_size=7)
    for source in discover([str(tmp_path)]):
        full = list(read_file(source, 0, FieldMap(), Limits()))
        assert [r.doc_id for r in full] == [r["id"] for r in rows], source.path
        for done in (1, 8, 15, 29):
            rest = list(read_file(source, 0, FieldMap(), Limits(), start=full[done - 1].position))
            assert [(r.doc_id, r.line) for r in rest] == [(r.doc_id, r.line) for r in full[done:]], (source, done)


def test_each_kind_of_bad_row_is_reported_with_file_and_line(tmp_path: Path) -> None:
    lines = [
        b'{"id": "ok-1", "text": "\xe5\xa5\xbd\xe7\x9a\x84\xe3\x80\x82"}',
        b'{"id": "broken", "text": ',
        b'{"id": "no-text", "title": "x"}',
        b'{"id": "latin1", "text": "caf\xe9"}',
        b'{"id": "big", "text": "t", "metadata": {"blob": "' + b"x" * 300 + b'"}}',
        b'{"id": "meta", "text": "t", "metadata": [1, 2]}',
        b'{"id": " padded ", "text": "t"}',
        b"[1, 2]",
        b"",
        b'{"id": "ok-1", "text": "again"}',
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "bad.csv").write_bytes(b"id,text\nc1,ok\nc2,a,b\nc3,\xff\xfe\n")
    records = list(read_all(discover([str(path), str(tmp_path / "bad.csv")]), FieldMap(),
                            Limits(max_metadata_bytes=200)))
    rejects = {(r.file.rsplit("/", 1)[-1], r.line): r.kind for r in records if isinstance(r, Reject)}
    assert rejects == {
        ("bad.jsonl", 2): "invalid_json", ("bad.jsonl", 3): "missing_text", ("bad.jsonl", 4): "not_utf8",
        ("bad.jsonl", 5): "metadata_too_large", ("bad.jsonl", 6): "bad_metadata", ("bad.jsonl", 7): "bad_id",
        ("bad.jsonl", 8): "invalid_json", ("bad.csv", 3): "bad_row", ("bad.csv", 4): "not_utf8",
    }
    no_text = next(r for r in records if isinstance(r, Reject) and r.kind == "missing_text")
    assert no_text.doc_id == "no-text"  # known ids are kept from --prune


def test_only_refused_requests_are_permanent_errors() -> None:
    import grpc
    from pymilvus.exceptions import MilvusException, ParamError

    from semsearch.errors import StoreRefusedError, retryable
    from semsearch.store import translate_milvus_error

    for refused in (ParamError(message="bad row"), MilvusException(65535, "length exceeds max length")):
        error = translate_milvus_error(refused)
        assert isinstance(error, StoreRefusedError) and not retryable(error), refused
        assert error.status_code == grpc.StatusCode.INVALID_ARGUMENT
    for recovering in ("connect failed", "node not match[expectedNodeID=1]",
                       "failed to query: collection not loaded", "rate limit exceeded"):
        error = translate_milvus_error(MilvusException(65535, recovering))
        assert retryable(error) and error.status_code == grpc.StatusCode.UNAVAILABLE, recovering
    # Not recognised: retried by the indexer, but never reported to callers as a retryable UNAVAILABLE.
    unknown = translate_milvus_error(MilvusException(65535, "something odd happened"))
    assert retryable(unknown) and unknown.status_code == grpc.StatusCode.INTERNAL


def test_shards_partition_every_id() -> None:
    ids = [f"doc-{i}" for i in range(2000)]
    parts = [{d for d in ids if shard_of(d, 4) == i} for i in range(4)]
    assert set().union(*parts) == set(ids) and sum(map(len, parts)) == len(ids)
    assert min(map(len, parts)) > 400  # roughly balanced
    assert shard_of("doc-1", 4) == shard_of("doc-1", 4) and all(shard_of(d, 1) == 0 for d in ids[:10])


# ---------------------------------------------------------------------------------------- chunking
def test_chunks_end_on_sentence_boundaries_and_overlap(tiny_encoder: TorchEncoder) -> None:
    # That the indexer's rows are the service's: tests/test_ingest.py (both through semsearch/ingest.py).
    docs = corpus(6, seed=3, max_sentences=80)
    overlapping = Chunker(token_counter(tiny_encoder), 64, overlap_tokens=20)
    text = docs[0]["text"] * 2
    chunks = overlapping.chunk(text)
    assert len(chunks) > 2
    for before, after in itertools.pairwise(chunks):
        assert before.text[-1] in "。！？；…"  # every chunk ends on a sentence boundary
        end = before.start + len(before.text)
        assert after.start < end  # overlap: the next chunk starts inside this one
        assert text[after.start : end] == before.text[after.start - before.start :]
    assert reassemble([(c.start, c.text) for c in chunks]) == text


# ---------------------------------------------------------------------------------------- jobs
def test_index_rerun_update_and_prune(milvus_uri: str, store_factory: Callable[[str], MilvusStore],
                                      collection_name: str, tmp_path: Path, index: Callable[..., IndexResult],
                                      tiny_encoder: TorchEncoder) -> None:
    store = store_factory(milvus_uri)
    docs = corpus(60, seed=1)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    first = index(store, collection_name, options(tmp_path, [source]))
    physical = versioned_name(collection_name, tiny_encoder.manifest.version)
    assert first.collection == physical and store.resolve(collection_name) == physical
    assert store.collection_info(collection_name).manifest["version"] == tiny_encoder.manifest.version
    assert first.totals["written"] == 60
    assert first.totals["chunks_written"] == expected_chunk_count(tiny_encoder, docs)
    assert store.count(physical, "chunk_index == 0") == 60

    again = index(store, collection_name, options(tmp_path, [source]))
    assert again.totals.get("written") == 0 and again.totals["skipped"] == 60
    assert again.totals.get("chunks_written") == 0

    long_doc = max(docs, key=lambda d: len(d["text"]))
    long_doc["text"] = "改了。"  # fewer chunks: the old tail must go
    docs[1]["text"] = docs[1]["text"] + "".join(SENTENCES) * 8  # more chunks
    removed = docs.pop(5)
    write_jsonl(source, docs)
    updated = index(store, collection_name, options(tmp_path, [source], prune=True))
    assert updated.totals["written"] == 2 and updated.totals["skipped"] == 57
    assert updated.totals["pruned"] == 1 and updated.totals["stale_chunks_deleted"] >= 1
    rows = stored(store, physical)
    assert len(rows) == expected_chunk_count(tiny_encoder, docs)
    assert len({r["id"] for r in rows}) == len(rows)
    assert removed["id"] not in {r["doc_id"] for r in rows}
    assert [r["text"] for r in rows if r["doc_id"] == long_doc["id"]] == ["改了。"]


def test_bad_rows_go_to_the_reject_file_and_strict_stops(
    tmp_path: Path, store_factory: Callable[[str], MilvusStore], index: Callable[..., IndexResult],
) -> None:
    store = store_factory(str(tmp_path / "milvus.db"))
    good = corpus(5)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(json.dumps(row, ensure_ascii=False).encode() + b"\n" for row in good)
                     + b'{"id": "x", "text": "\xff"}\nnot json\n{"id": "y"}\n'
                     + json.dumps(good[0], ensure_ascii=False).encode() + b"\n"
                     # One 70,000-character "word" is a single [UNK] token: a chunk over Milvus' VARCHAR limit.
                     + b'{"id": "huge", "text": "' + b"x" * 70000 + b'"}\n')
    result = index(store, "mixed", options(tmp_path, [path]))
    assert result.totals["written"] == 5 and result.totals["rejected"] == 5
    assert result.reasons == {"not_utf8": 1, "invalid_json": 1, "missing_text": 1, "duplicate_id": 1,
                              "chunk_too_long": 1}
    rejects = [json.loads(line) for line in Path(result.reject_file).read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rejects] == [
        (6, "not_utf8"), (7, "invalid_json"), (8, "missing_text"), (9, "duplicate_id"), (10, "chunk_too_long")]
    assert all(r["file"] == str(path) for r in rejects)
    with pytest.raises(StrictModeError, match=r"mixed.jsonl:6"):
        index(store, "mixed", options(tmp_path, [path], restart=True, pipeline={"strict": True}))


def test_ack_before_checkpoint_then_resume_is_exact(
    tmp_path: Path, store_factory: Callable[[str], MilvusStore], index: Callable[..., IndexResult],
    tiny_encoder: TorchEncoder,
) -> None:
    """Killed after Milvus acknowledged batches but before the checkpoint recorded them: the resumed
    job re-sends them as idempotent upserts (or finds them stored) and ends exact."""
    store = store_factory(str(tmp_path / "milvus.db"))
    docs = corpus(80, seed=7)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    done = index(store, "acked", options(tmp_path, [source]))
    state = JobState(tmp_path / "state", done.job_id)
    try:  # rewind the checkpoint to "a quarter done", as if the later commits never happened
        state.reset(state.get("config"))
        offset = sum(len((json.dumps(d, ensure_ascii=False) + "\n").encode()) for d in docs[:20])
        state.commit([(d["id"], 0, i + 1, 1) for i, d in enumerate(docs[:20])],
                     Progress(Position(0, 20, offset, 20), {"read": 20, "documents": 20, "written": 20},
                              {}, 0, "index"))
    finally:
        state.close()
    resumed = index(store, "acked", options(tmp_path, [source], resume=True))
    assert resumed.totals["documents"] == 80 and resumed.totals["written"] + resumed.totals["skipped"] == 80
    rows = stored(store, done.collection)
    assert len(rows) == len({r["id"] for r in rows}) == expected_chunk_count(tiny_encoder, docs)


def test_kill_9_mid_run_then_resume_is_exact(
    milvus_uri: str, collection_name: str, tmp_path: Path, tiny_model_dir: Path,
    store_factory: Callable[[str], MilvusStore], index: Callable[..., IndexResult], tiny_encoder: TorchEncoder,
) -> None:
    """`python -m indexer` killed with SIGKILL once its checkpoint shows progress; then --resume.
    On Lite the killed process owned the database: its acknowledged writes come back from Lite's WAL."""
    docs = corpus(400, seed=11, max_sentences=30)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    state_dir = tmp_path / "state"
    command = [sys.executable, "-m", "indexer", str(source), "--milvus-uri", milvus_uri,
               "--model", str(tiny_model_dir), "--collection", collection_name, "--state-dir", str(state_dir),
               "--device", "cpu", "--checkpoint-interval", "0.2", "--batch-chunks", "16", "--max-rate", "120",
               "--progress", "off"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = None
    try:
        progress = wait_for_progress(process, state_dir, 40, timeout_s=120)
        assert process.poll() is None, process.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()  # type: ignore[union-attr]
    assert progress is not None and 40 <= progress.totals["documents"] < len(docs)

    store = store_factory(milvus_uri)  # (only now: on Lite the subprocess owned the directory)
    resumed = index(store, collection_name, options(tmp_path, [source], resume=True))
    physical = versioned_name(collection_name, tiny_encoder.manifest.version)
    assert resumed.totals["documents"] == len(docs)
    assert resumed.totals.get("written", 0) + resumed.totals.get("skipped", 0) == len(docs)
    rows = stored(store, physical)
    assert [i for i, n in Counter(r["id"] for r in rows).items() if n > 1] == []
    assert len(rows) == expected_chunk_count(tiny_encoder, docs)
    assert store.count(physical, "chunk_index == 0") == len(docs)
    assert store.resolve(collection_name) == physical


def test_shard_union_equals_the_whole(tmp_path: Path, store_factory: Callable[[str], MilvusStore],
                                      index: Callable[..., IndexResult], tiny_encoder: TorchEncoder) -> None:
    store = store_factory(str(tmp_path / "milvus.db"))
    docs = corpus(90, seed=5)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    results = [index(store, "sharded", options(tmp_path, [source], shard=(i, 3), pipeline={"shard": (i, 3)}))
               for i in range(3)]
    whole = index(store, "whole", options(tmp_path, [source]))
    assert sum(r.totals["documents"] for r in results) == 90
    assert all(r.totals["read"] == 90 for r in results)
    assert results[-1].notes == [] and store.resolve("sharded") == results[0].collection  # the last one

    def key(collection: str) -> set[tuple[str, int, str]]:
        return {(r["doc_id"], r["chunk_index"], r["content_hash"]) for r in stored(store, collection)}

    assert key(results[0].collection) == key(whole.collection)
    assert results[0].notes and "waits for shards" in results[0].notes[0]


def test_verify_passes_then_catches_missing_documents_and_model_change(
    tmp_path: Path, store_factory: Callable[[str], MilvusStore], index: Callable[..., IndexResult],
    tiny_encoder: TorchEncoder,
) -> None:
    store = store_factory(str(tmp_path / "milvus.db"))
    docs = corpus(40, seed=9)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    done = index(store, "checked", options(tmp_path, [source]))
    files = discover([str(source)])
    report = run_verify(files=files, fields=FieldMap(), limits=Limits(), encoder=tiny_encoder, store=store,
                        collection="checked", sample=10)
    assert report.ok, report.problems
    assert report.source_documents == report.stored_documents == 40 and report.sampled == 10
    assert report.max_vector_deviation < 1e-4

    store.delete_documents(done.collection, ["doc-3"])
    report = run_verify(files=files, fields=FieldMap(), limits=Limits(), encoder=tiny_encoder, store=store,
                        collection="checked", sample=10)
    assert not report.ok and report.missing == 1 and report.missing_examples == ["doc-3"]

    # Same version string, other weights: the stored vectors must not match the re-encoded ones.
    impostor = build_tiny_bert(tmp_path / "other", seed=1, version=tiny_encoder.manifest.version)
    other = TorchEncoder.from_ref(str(impostor), device="cpu")
    index(store, "checked", options(tmp_path, [source]))
    report = run_verify(files=files, fields=FieldMap(), limits=Limits(), encoder=other, store=store,
                        collection="checked", sample=5)
    assert not report.ok and any("vectors differ" in p for p in report.problems)


def test_alias_of_another_model_is_not_moved_without_a_flag(
    tmp_path: Path, store_factory: Callable[[str], MilvusStore], index: Callable[..., IndexResult],
    tiny_encoder: TorchEncoder,
) -> None:
    store = store_factory(str(tmp_path / "milvus.db"))
    source = write_jsonl(tmp_path / "docs.jsonl", corpus(10))
    other = TorchEncoder.from_ref(str(build_tiny_bert(tmp_path / "other", seed=2)), device="cpu")
    old = index(store, "live", options(tmp_path, [source]), encoder=other)
    assert store.resolve("live") == old.collection
    with pytest.raises(JobError, match="--no-alias"):
        index(store, "live", options(tmp_path, [source]))
    built = index(store, "live", options(tmp_path, [source], alias_policy="none"))
    assert store.resolve("live") == old.collection != built.collection
    moved = index(store, "live", options(tmp_path, [source], alias_policy="move"))
    assert store.resolve("live") == moved.collection == built.collection and moved.totals["written"] == 0

    # A name the model registry serves: the registry decides, promotion (not the indexer) swaps.
    ModelRegistry(store).bootstrap("live", other.manifest, old.collection)
    for policy in ("auto", "move"):
        with pytest.raises(JobError, match="semsearch promote"):
            index(store, "live", options(tmp_path, [source], alias_policy=policy))
    beside = index(store, "live", options(tmp_path, [source], alias_policy="none"))
    assert beside.collection == built.collection and store.resolve("live") == built.collection
    served = index(store, "live", options(tmp_path, [source]), encoder=other)  # the registry's own model
    assert served.collection == old.collection and served.totals["skipped"] == 10


def test_chunking_change_needs_force_and_interrupted_job_needs_resume(
    tmp_path: Path, store_factory: Callable[[str], MilvusStore], index: Callable[..., IndexResult],
) -> None:
    store = store_factory(str(tmp_path / "milvus.db"))
    docs = corpus(20, seed=4, max_sentences=60)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    index(store, "chunky", options(tmp_path, [source]))
    with pytest.raises(JobError, match="--force"):
        index(store, "chunky", options(tmp_path, [source], overlap_tokens=16))
    forced = index(store, "chunky", options(tmp_path, [source], overlap_tokens=16, pipeline={"force": True}))
    assert forced.totals["written"] == 20

    job = JobState(tmp_path / "state", forced.job_id)
    try:  # make it look interrupted
        job.put("status", "running")
    finally:
        job.close()
    with pytest.raises(JobError, match="--resume"):
        index(store, "chunky", options(tmp_path, [source], overlap_tokens=16))
    resumed = index(store, "chunky", options(tmp_path, [], resume=True))  # no INPUT: finds the job
    assert resumed.job_id == forced.job_id


def test_cli_index_and_verify(tmp_path: Path, tiny_model_dir: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    assert "Usage: semsearch index [OPTIONS] [INPUT]..." in runner.invoke(app, ["index", "--help"],
                                                                          prog_name="semsearch").output
    assert "verify" in runner.invoke(app, ["index", "--help"], prog_name="semsearch").output
    source = write_jsonl(tmp_path / "docs.jsonl", corpus(15))
    common = ["--milvus-uri", str(tmp_path / "milvus.db"), "--model", str(tiny_model_dir),
              "--collection", "cli", "--device", "cpu", "--state-dir", str(tmp_path / "state")]
    result = runner.invoke(app, ["index", str(source), *common, "--json", "--progress", "log",
                                 "--progress-every", "0", "--max-rate", "20"])
    assert result.exit_code == 0, result.output
    assert '"index_progress"' in result.output and '"docs_per_s"' in result.output  # plain log lines
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["totals"]["written"] == 15 and summary["alias"] == "cli"
    rerun = runner.invoke(app, ["index", str(source), *common])
    assert rerun.exit_code == 0 and "unchanged (skipped)" in rerun.output and "documents written" in rerun.output
    # No INPUT: verify reads the source of the collection's last job.
    result = runner.invoke(app, ["index", "verify", *common, "--json", "--sample", "5"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["ok"] is True
    assert runner.invoke(app, ["index", str(tmp_path / "missing.jsonl"), *common]).exit_code == 2


@pytest.mark.milvus_server
def test_milvus_server_restart_mid_run_loses_nothing(tmp_path: Path, tiny_model_dir: Path,
                                                     tiny_encoder: TorchEncoder) -> None:
    """The server is stopped (SIGTERM, then SIGKILL) and restarted under a running indexer: the
    indexer retries through the outage, and the collection ends exact."""
    from semsearch.testing import MilvusTestServer

    server = MilvusTestServer(tmp_path / "milvus")  # free loopback ports, kept across restarts
    server.start()
    uri = server.uri
    docs = corpus(150, seed=13, max_sentences=30)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    state_dir = tmp_path / "state"
    command = [sys.executable, "-m", "indexer", str(source), "--milvus-uri", uri, "--model", str(tiny_model_dir),
               "--collection", "restarted", "--state-dir", str(state_dir), "--device", "cpu",
               "--checkpoint-interval", "1", "--batch-chunks", "16", "--max-rate", "20", "--retry-timeout", "300",
               "--progress", "off"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_progress(process, state_dir, 30, timeout_s=180)
        assert process.poll() is None
        server.stop()
        time.sleep(3)
        # Still running 3 s into the outage with work left (--max-rate 20: 120 documents take 6 s):
        # it meets the outage (pymilvus may absorb it without a retry log line of ours).
        assert process.poll() is None, "the indexer ended during the outage"
        server.start()
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        store = MilvusStore(uri, timeout_s=60)
        try:
            physical = versioned_name("restarted", tiny_encoder.manifest.version)
            rows = stored(store, physical)
            assert [i for i, n in Counter(r["id"] for r in rows).items() if n > 1] == []
            assert len(rows) == expected_chunk_count(tiny_encoder, docs)
            assert store.count(physical, "chunk_index == 0") == len(docs)
        finally:
            store.close()
    finally:
        if process.poll() is None:
            process.kill()
        server.stop()
