"""Promotion: a gated, zero-downtime move of a serving name to a new (model, collection) pair.

The producer half of the protocol that service/serving_state.py consumes (through the registry).

1. gate      injected by the caller (the trainer evaluates current and candidate on held-out rows);
             it returns the metrics recorded with the pair, or raises to stop with nothing written
2. pending   record the candidate pair as `pending`: every service instance loads it and writes
             each upsert/delete to both collections from then on (dual-write)
3. re-embed  copy the live collection's stored chunks into the candidate collection with the
             candidate model, then replay rows written since the pending record, drop orphans
4. validate  every row id and content hash compared (rows in flight read again until their dual
             write lands), and a sample of stored vectors re-encoded and compared
5. swap      one registry write: current <- candidate, previous <- old current; then the alias.
             Instances swap (encoder, collection) as one reference; in-flight calls finish on the old.

Each step is idempotent: a run killed anywhere leaves a consistent record that a re-run completes.
Rollback is the same flow towards `previous`, replaying only what changed since it was retired.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from semsearch.config import Settings
from semsearch.encoders import Encoder
from semsearch.errors import ModelMismatchError, NotFoundError, SemsearchError
from semsearch.manifest import ModelManifest
from semsearch.reembed import CopyStats, copy_rows, remove_orphans, validate
from semsearch.registry import ModelRegistry, PairRecord, RegistryRecord, now_iso, open_pair_encoder, pair_for
from semsearch.store import TEXT_RULES_PROPERTY, MilvusStore, versioned_name

log = structlog.get_logger(__name__)

# Rows written this long before the pending record are replayed too: clocks of writers differ.
CLOCK_SKEW_MS = 10_000


class PromotionError(SemsearchError):
    """A gate, validation or state check stopped the promotion; the registry is consistent."""


# The evaluation gate: given the current pair, the metrics to record with the candidate (e.g.
# {"gate": {...}}); it raises (or exits) to stop the promotion before anything is written.
Gate = Callable[[PairRecord], dict[str, Any]]


@dataclass
class PromotionReport:
    name: str
    from_pair: PairRecord
    to_pair: PairRecord
    copy: CopyStats | None = None
    replay: CopyStats | None = None
    orphans_removed: int = 0
    validation: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)


class Promoter:
    def __init__(
        self,
        settings: Settings,
        store: MilvusStore,
        *,
        progress: Callable[[str, CopyStats], None] | None = None,
        propagation_s: float | None = None,
        ack_timeout_s: float = 300.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = ModelRegistry(store)
        self.progress = progress
        # Instances report when they dual-write (the promoter waits for those acks); propagation_s
        # is a minimum wait on top, for instances too new to have reported yet.
        self.propagation_s = 0.0 if propagation_s is None else propagation_s
        self.ack_timeout_s = ack_timeout_s

    # ------------------------------------------------------------------ state
    def record(self, name: str, *, persist: bool = True) -> RegistryRecord:
        """The registry record of `name`; without one, what its alias serves now (written if `persist`)."""
        record = self.registry.get(name)
        if record is not None and record.current is not None:
            return record
        # No record yet: what the alias serves now becomes `current`.
        physical = self.store.resolve(name)
        if not physical:
            raise NotFoundError(f"nothing serves {name!r}: no registry record and no such collection or alias")
        info = self.store.collection_info(name)
        return self.registry.bootstrap(
            name, ModelManifest.model_validate(info.manifest), physical, self.settings.encoder_url, persist=persist
        )

    def candidate_pair(
        self, name: str, encoder: Encoder, encoder_url: str | None, metrics: dict[str, Any]
    ) -> PairRecord:
        return pair_for(encoder.manifest, self.target_collection(name, encoder), encoder_url, metrics)

    def target_collection(self, name: str, encoder: Encoder) -> str:
        """`{name}__{version}`, or a fresh name when that collection predates the current schema.

        Promoting the same model is how a collection made before lexical retrieval gets its BM25
        field: the copy goes into a new collection (created with the BM25 function; Milvus
        tokenizes the copied texts) instead of being a no-op.
        """
        base = versioned_name(name, encoder.manifest.version)
        lexical_wanted = self.settings.lexical_analyzer != "none" and self.store.capabilities().bm25
        # Each schema upgrade (BM25 field, then tenant field) has its own name, so promoting the same
        # model copies into a collection of the current schema instead of being a no-op.
        candidates = (base, f"{base}__bm25", f"{base}__tenants")
        for candidate in candidates:
            if not self.store.resolve(candidate):
                return candidate
            info = self.store.collection_info(candidate)
            if (info.lexical or not lexical_wanted) and info.tenants:
                return candidate
        raise PromotionError(f"{candidates[-1]} exists without the current schema: drop it (semsearch gc) and re-run")

    # ------------------------------------------------------------------ flow
    def promote(self, name: str, encoder: Encoder, gate: Gate, *, encoder_url: str | None = None) -> PromotionReport:
        """Gate `encoder`'s model against what serves `name`, then move to it (steps 1-5).

        Re-running after a crash resumes the pending promotion of the same candidate without
        re-running the gate (it passed before the pending pair was recorded)."""
        record = self.record(name, persist=False)  # a failed gate must leave no trace
        assert record.current is not None
        target = self.candidate_pair(name, encoder, encoder_url, {})
        if record.pending is not None and not record.pending.same_pair(target):
            raise PromotionError(
                f"another promotion is in progress ({record.pending.model_version}); finish it or run with --abort"
            )
        if record.pending is not None:
            target = record.pending
        elif not record.current.same_pair(target):
            target.metrics = gate(record.current)
        return self.move(name, target, encoder, replay_since_ms=None, event="promote")

    def move(
        self, name: str, target: PairRecord, encoder: Encoder, *, replay_since_ms: int | None, event: str
    ) -> PromotionReport:
        """Steps 2-5 towards `target` (pending, re-embed, validate, swap). Resumes a killed run."""
        record = self.record(name)
        assert record.current is not None
        source = record.current
        if source.same_pair(target):
            # Already current (e.g. a run killed after the registry write): make the alias agree.
            self._swap(name, target, event)
            log.info("already_current", name=name, model_version=target.model_version)
            return PromotionReport(name=name, from_pair=source, to_pair=target)
        if record.pending is not None and not record.pending.same_pair(target):
            raise PromotionError(
                f"another promotion is in progress ({record.pending.model_version}); finish it or run with --abort"
            )
        report = PromotionReport(name=name, from_pair=source, to_pair=target)
        started = time.perf_counter()
        self.store.ensure_collection(target.collection, encoder.manifest)
        # The copy re-embeds the stored chunks as they are: the target keeps the text rules they were
        # made with, so later writes (dual-write, upserts after the swap) follow the same rules.
        source_rules = self.store.collection_info(source.collection).text_rules
        if self.store.collection_info(target.collection).text_rules != source_rules:
            self.store.set_collection_properties(target.collection, {TEXT_RULES_PROPERTY: source_rules})
        if record.pending is None:
            record.pending = target
            record.pending_since_ms = int(time.time() * 1000)
            record.event(f"{event}_started", model_version=target.model_version, collection=target.collection)
            record = self.registry.put(record)
            log.info("pending_recorded", name=name, model_version=target.model_version)
        else:
            log.info("resuming", name=name, model_version=target.model_version)
        self._wait_for_dual_writes(name, record.generation, target)
        pending_since = int(record.pending_since_ms or 0)

        phase = time.perf_counter()
        if replay_since_ms is None:
            report.copy = copy_rows(
                self.store, source.collection, target.collection, encoder, on_batch=self._progress("re-embed")
            )
                # Rows written while the copy ran, before every instance dual-wrote, are replayed.
            replay_from = pending_since - CLOCK_SKEW_MS
        else:
            replay_from = min(replay_since_ms, pending_since) - CLOCK_SKEW_MS
        report.replay = copy_rows(
            self.store,
            source.collection,
            target.collection,
            encoder,
            since_ms=replay_from,
            on_batch=self._progress("replay"),
        )
        report.orphans_removed = remove_orphans(self.store, source.collection, target.collection)
        report.timings_s["re-embed"] = round(time.perf_counter() - phase, 2)

        phase = time.perf_counter()
        check = validate(self.store, source.collection, target.collection, encoder)
        report.validation = check.report()
        report.timings_s["validate"] = round(time.perf_counter() - phase, 2)
        if not check.ok:
            raise PromotionError(
                f"validation failed: {check.source_count} rows live vs {check.target_count} in "
                f"{target.collection}: {check.summary()}; {len(check.mismatched)} sampled vectors differ. "
                "The pending pair stays "
                "(instances keep dual-writing): re-run to retry, or --abort"
            )

        self._swap(name, target, event)
        report.timings_s["total"] = round(time.perf_counter() - started, 2)
        return report

    def _wait_for_dual_writes(self, name: str, generation: int, target: PairRecord) -> None:
        """Wait until every live service instance dual-writes to `target` (each reports what it
        applied to the registry); a write acknowledged before then may be missing from the copy.

        Live: reported within `instance_stale_s`. An instance that never reports (down, or another
        name) is not waited for; one that reports but does not dual-write stops the promotion with
        its id after `instance_ack_timeout_s` (the pending pair stays: re-run to go on)."""
        stale_s = max(3 * self.settings.registry_poll_s, 15.0)
        deadline = time.monotonic() + max(self.ack_timeout_s, self.propagation_s)
        floor = time.monotonic() + self.propagation_s  # instances polling slower than reports show
        while True:
            lagging = sorted(
                instance for instance, report in self.registry.live_instances(name, stale_s).items()
                if int(report.get("generation", 0)) < generation or report.get("dual_writing") != target.collection
            )
            if not lagging and time.monotonic() >= floor:
                log.info("instances_dual_writing", name=name, collection=target.collection)
                return
            if time.monotonic() > deadline:
                raise PromotionError(
                    f"{len(lagging)} service instance(s) did not start dual-writing to {target.collection} within "
                    f"{self.ack_timeout_s:.0f} s ({', '.join(lagging[:5])}); the pending pair stays: re-run to wait "
                    "again, or --abort"
                )
            time.sleep(min(0.2, max(0.0, floor - time.monotonic())) or 0.2)

    def _swap(self, name: str, target: PairRecord, event: str) -> None:
        record = self.record(name)
        if record.current is not None and record.current.same_pair(target):
            self.store.point_alias(name, target.collection)  # a killed run wrote the record, not the alias
            return
        record.previous = record.current
        target.since = now_iso()
        record.current = target
        record.pending = None
        record.pending_since_ms = None
        record.event(f"{event}_swapped", model_version=target.model_version, collection=target.collection)
        self.registry.put(record)  # the atomic pointer change (a compare-and-swap on its generation)
        self.store.point_alias(name, target.collection)
        log.info("swapped", name=name, model_version=target.model_version, collection=target.collection)

    def abort(self, name: str) -> RegistryRecord:
        """Forget a pending pair (instances stop dual-writing); its collection stays until gc."""
        record = self.record(name)
        if record.pending is not None:
            record.event("aborted", model_version=record.pending.model_version)
            record.pending = None
            record.pending_since_ms = None
            record = self.registry.put(record)
        return record

    def rollback(self, name: str) -> PromotionReport:
        record = self.record(name)
        if record.previous is None:
            raise PromotionError(f"{name!r} has no previous pair to roll back to")
        target = record.previous.model_copy()
        if not self.store.resolve(target.collection):
            raise PromotionError(f"the previous collection {target.collection} is gone (gc?)")
        encoder = open_pair_encoder(target, self.settings)
        try:
            # Only rows written since the previous pair was retired need its model's vectors.
            retired_ms = int(_iso_ms(record.current.since)) if record.current else 0
            return self.move(name, target, encoder, replay_since_ms=retired_ms, event="rollback")
        finally:
            encoder.close()

    def gc(self, *, dry_run: bool = True) -> list[str]:
        """Collections made by semsearch that no registry record and no alias points at."""
        referenced = self.registry.all_referenced_collections()
        aliased = {self.store.resolve(alias) for alias in self.store.list_aliases()}
        garbage = []
        for name in self.store.list_collections():
            if name in referenced or name in aliased or "__" not in name:
                continue
            try:
                self.store.collection_info(name)
            except (ModelMismatchError, NotFoundError):
                continue  # not ours
            garbage.append(name)
        if not dry_run:
            for name in garbage:
                self.store.drop_collection(name)
                log.info("collection_dropped", collection=name)
        return sorted(garbage)

    def _progress(self, phase: str) -> Callable[[CopyStats], None] | None:
        if self.progress is None:
            return None
        progress = self.progress
        return lambda stats: progress(phase, stats)


def _iso_ms(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp() * 1000
