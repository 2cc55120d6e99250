"""The model registry's compare-and-swap, on Milvus Lite and the real server: two writers never both win."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from semsearch.errors import ConflictError
from semsearch.registry import ModelRegistry, RegistryRecord
from semsearch.store import MilvusStore


def test_a_write_with_a_stale_generation_fails(milvus_uri: str, store_factory: Callable[[str], MilvusStore],
                                               collection_name: str) -> None:
    name = collection_name
    registry = ModelRegistry(store_factory(milvus_uri))
    assert registry.put(RegistryRecord(name=name)).generation == 1
    first, second = registry.get(name), registry.get(name)
    assert first is not None and second is not None and first.generation == second.generation == 1
    first.event("first")
    assert registry.put(first).generation == 2
    second.event("second")
    with pytest.raises(ConflictError, match="at generation 2, not 1"):
        registry.put(second)
    assert second.generation == 1  # the caller's copy is left as it was
    stored = registry.get(name)
    assert stored is not None and stored.generation == 2 and [e["event"] for e in stored.history] == ["first"]
    with pytest.raises(ConflictError):  # a "new" record where one exists is stale too
        registry.put(RegistryRecord(name=name))
    # Write claims never show up as names (the server is shared: other tests' names are there too).
    assert name in registry.names() and not any("/" in other for other in registry.names())


def test_concurrent_writers_lose_no_update(milvus_uri: str, store_factory: Callable[[str], MilvusStore],
                                           collection_name: str) -> None:
    """Each writer re-reads and retries on conflict. Had two writers ever both won the same
    generation, one's event would be missing and the generation would fall short."""
    name, writers, rounds = collection_name, 3, 2
    registries = [ModelRegistry(store_factory(milvus_uri)) for _ in range(writers)]  # a client each
    registries[0].put(RegistryRecord(name=name))
    start = threading.Barrier(writers)
    conflicts: list[str] = []
    errors: list[BaseException] = []

    def write(n: int) -> None:
        registry, rng = registries[n], random.Random(n)
        try:
            start.wait(60)
            for i in range(rounds):
                attempt = 0
                while True:
                    record = registry.get(name)
                    assert record is not None
                    record.event(f"w{n}-{i}")
                    try:
                        registry.put(record)
                        break
                    except ConflictError as exc:
                        conflicts.append(str(exc))
                        # Exponential backoff with full jitter: racing writers that both lost (claims
                        # seen on both sides) must not retry in step, or they livelock.
                        attempt += 1
                        time.sleep(rng.uniform(0, min(2.0, 0.1 * 2 ** attempt)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    final = registries[0].get(name)
    assert final is not None
    assert sorted(e["event"] for e in final.history) == sorted(f"w{n}-{i}" for n in range(writers)
                                                               for i in range(rounds))
    assert final.generation == 1 + writers * rounds
    assert conflicts  # they did race (each writer re-read and retried)


def test_instance_reports_are_fresh_or_ignored_and_never_names(tmp_path: Path,
                                                               store_factory: Callable[[str], MilvusStore]) -> None:
    registry = ModelRegistry(store_factory(str(tmp_path / "milvus.db")))
    registry.put(RegistryRecord(name="faq"))
    registry.report_instance("faq", "a", 1, "")
    registry.report_instance("faq", "b", 1, "faq__v2")
    registry.report_instance("other", "c", 3, "")
    live = registry.live_instances("faq", fresh_within_s=60)
    assert set(live) == {"a", "b"} and live["b"]["dual_writing"] == "faq__v2"
    time.sleep(0.3)
    assert registry.live_instances("faq", fresh_within_s=0.2) == {}  # stale reports are not waited for
    registry.forget_instance("faq", "a")
    assert set(registry.live_instances("faq", fresh_within_s=60)) == {"b"}
    assert registry.names() == ["faq"]  # instance reports never show up as names


def test_a_promotion_waits_for_every_live_instance_to_dual_write(
    tmp_path: Path, store_factory: Callable[[str], MilvusStore], tiny_model_dir: Path,
) -> None:
    """An instance that reports but never dual-writes stops the promotion by name, before any copy;
    the pending pair stays for a re-run."""
    from semsearch.config import Settings
    from semsearch.encoders import TorchEncoder
    from semsearch.promotion import Promoter, PromotionError
    from tests.tinymodel import build_tiny_bert

    uri = str(tmp_path / "milvus.db")
    store = store_factory(uri)
    settings = Settings(milvus_uri=uri, collection="faq", registry_poll_s=0.2)
    base = TorchEncoder.from_ref(str(tiny_model_dir), device="cpu")
    candidate = TorchEncoder.from_ref(str(build_tiny_bert(tmp_path / "candidate", seed=1)), device="cpu")
    store.ensure_collection("faq__base", base.manifest)
    store.point_alias("faq", "faq__base")
    promoter = Promoter(settings, store, ack_timeout_s=1.0)
    promoter.registry.bootstrap("faq", base.manifest, "faq__base")
    promoter.registry.report_instance("faq", "slow-replica", 1, "")
    with pytest.raises(PromotionError, match="slow-replica"):
        promoter.promote("faq", candidate, gate=lambda current: {})
    record = promoter.registry.get("faq")
    assert record is not None and record.pending is not None  # kept: a re-run waits again
    assert store.count(record.pending.collection) == 0  # nothing was copied before the acks
    pending = record.pending.collection
    promoter.registry.report_instance("faq", "slow-replica", record.generation, pending)
    report = promoter.promote("faq", candidate, gate=lambda current: {})
    assert report.to_pair.collection == pending


def test_an_instance_follows_a_rollback_it_saw_only_in_part(
    make_service: Callable[..., Any], tiny_encoder: Any, tmp_path: Path, store_factory: Callable[[str], MilvusStore],
) -> None:
    """A slow-polling instance that skipped the swap's generation (it saw the promotion's pending
    pair, then the rollback's) must serve the new pair and dual-write to the old one; a read that
    returns an older version of the record must change nothing."""
    from semsearch.encoders import TorchEncoder
    from semsearch.promotion import Promoter
    from semsearch.registry import REGISTRY_COLLECTION
    from semsearch.v1 import admin_pb2, admin_pb2_grpc
    from tests.tinymodel import build_tiny_bert

    uri = str(tmp_path / "milvus.db")
    service = make_service(tiny_encoder, milvus_uri=uri, collection="faq", registry_poll_s=3600)
    admin = admin_pb2_grpc.AdminServiceStub(service.channel)
    store = store_factory(uri)
    promoter = Promoter(service.settings, store)
    candidate = TorchEncoder.from_ref(str(build_tiny_bert(tmp_path / "candidate", seed=1)), device="cpu")
    registry = promoter.registry

    def reload() -> tuple[tuple[str, str], tuple[str, str], int]:
        state = admin.ReloadServingState(admin_pb2.ReloadServingStateRequest(), timeout=60).state
        return ((state.current.model_version, state.current.collection),
                (state.pending.model_version, state.pending.collection), state.registry_generation)

    record = registry.get("faq")
    assert record is not None and record.current is not None
    old = record.current
    new = promoter.candidate_pair("faq", candidate, None, {})
    store.ensure_collection(new.collection, candidate.manifest)
    record.pending = new
    record = registry.put(record)  # the promotion starts
    promotion_started = record.model_dump_json()
    assert reload() == ((old.model_version, old.collection), (new.model_version, new.collection), 2)
    record.previous, record.current, record.pending = old, new, None
    record = registry.put(record)  # swapped ... (this instance does not poll now)
    record.pending = old.model_copy()
    record = registry.put(record)  # ... and rolled back at once
    assert reload() == ((new.model_version, new.collection), (old.model_version, old.collection), 4)

    # Never backwards: the registry reads the highest generation it holds, and an instance ignores
    # a record older than the one it applied (a read served at an older version).
    store.write_record(REGISTRY_COLLECTION, "faq", promotion_started)  # the plain row, overwritten
    stored = registry.get("faq")
    assert stored is not None and stored.generation == 4
    store.delete_records(REGISTRY_COLLECTION, [key for key in store.scan_records(REGISTRY_COLLECTION, "faq/record/")])
    stored = registry.get("faq")
    assert stored is not None and stored.generation == 2  # what a stale read would give
    assert reload() == ((new.model_version, new.collection), (old.model_version, old.collection), 4)
