"""The model registry: which (model, collection) pair serves each name, durably, in Milvus itself.

One row per serving name (the alias clients use) holds the current pair, the previous one (for
rollback), the pending one (a promotion in progress: services dual-write to it) and a short
history. Writing that row is the atomic pointer change; the Milvus alias follows it. Keeping the
record in Milvus means every replica of the service, on any machine, sees the same record.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from typing import Any

import structlog
from pydantic import BaseModel, Field

from semsearch.config import Settings
from semsearch.encoders import Encoder, create_encoder
from semsearch.errors import ConflictError, ModelMismatchError, SemsearchError
from semsearch.manifest import ModelManifest
from semsearch.rerankers import Reranker
from semsearch.store import MilvusStore, RecordTable

log = structlog.get_logger(__name__)

REGISTRY_COLLECTION = "semsearch_registry"
HISTORY_LIMIT = 50
INSTANCE_SEPARATOR = "/instance/"  # where service instances report what they applied
CLAIM_SEPARATOR = "/claim/"  # collection names cannot hold "/": claim keys never shadow a name
VERSION_SEPARATOR = "/record/"  # each generation of a record is its own, never-overwritten row
VERSIONS_KEPT = 3
CLAIM_TTL_S = 60.0


def _version_key(name: str, generation: int) -> str:
    return f"{name}{VERSION_SEPARATOR}{generation:012d}"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class PairRecord(BaseModel):
    """The record of a model and the collection its vectors fill: always swapped together."""

    model_version: str
    manifest: dict[str, Any]
    collection: str
    encoder_url: str | None = None  # remote encoder servers for this model (blue/green), else in-process
    metrics: dict[str, Any] = Field(default_factory=dict)
    since: str = Field(default_factory=now_iso)
    # The collection's tuned default retrieval (semsearch.tuning.TunedRetrieval as JSON; `semsearch train
    # tune-fusion`). A promoted pair starts without one (its collection is another): tune it again, or keep
    # the replaced pair's with `tune-fusion --keep-previous`.
    retrieval: dict[str, Any] | None = None

    @property
    def model_ref(self) -> str:
        return str(self.manifest.get("model_path") or self.manifest.get("name") or self.model_version)

    def model_manifest(self) -> ModelManifest:
        return ModelManifest.model_validate(self.manifest)

    def same_pair(self, other: PairRecord | None) -> bool:
        return other is not None and (self.model_version, self.collection) == (other.model_version, other.collection)


class RerankerRecord(BaseModel):
    """The reranker a name serves. Swapped on its own (no re-embedding): `version` "" records
    "no reranker" (a rollback to none); a record without a reranker field follows each instance's
    reranker settings."""

    version: str
    manifest: dict[str, Any] = Field(default_factory=dict)
    url: str | None = None  # rerank servers for this reranker, else in-process
    metrics: dict[str, Any] = Field(default_factory=dict)
    since: str = Field(default_factory=now_iso)

    @property
    def model_ref(self) -> str:
        return str(self.manifest.get("model_path") or self.manifest.get("name") or self.version)


NO_RERANKER = RerankerRecord(version="")


class RegistryRecord(BaseModel):
    name: str
    generation: int = 0
    current: PairRecord | None = None
    previous: PairRecord | None = None
    pending: PairRecord | None = None
    # The reranker (None: never promoted, instances use their settings) and the one it replaced.
    reranker: RerankerRecord | None = None
    previous_reranker: RerankerRecord | None = None
    pending_since_ms: int | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)

    def event(self, kind: str, **details: Any) -> None:
        self.history.append({"at": now_iso(), "event": kind, **details})
        del self.history[:-HISTORY_LIMIT]

    def referenced_collections(self) -> set[str]:
        return {pair.collection for pair in (self.current, self.previous, self.pending) if pair is not None}


class ModelRegistry:
    """Registry records in Milvus, written with a compare-and-swap on their generation.

    Milvus has no transactions or conditional writes, so a write goes through a claim: the writer
    of generation g+1 inserts a claim row `{name}/claim/{g+1}/{token}` (a key no collection name can
    have), reads every claim of g+1 back with Strong consistency, and goes on only if its own is the
    only live one and the record still has generation g; then it writes the record and drops its
    claim. Milvus orders writes by timestamp and a Strong read sees every write acknowledged before
    it, so of two writers racing for g+1 the later one always sees the earlier claim: at most one
    wins (both may lose; each gets a ConflictError, re-reads and retries).
    Limits: a claim left by a crashed writer blocks generation g+1 for CLAIM_TTL_S, and a claim
    older than that is ignored — a writer stalled between its claim and its write for longer (and
    clocks of writers more than that apart) void the guarantee; the writer gives up past TTL/2.
    """

    def __init__(self, store: MilvusStore) -> None:
        self.store = store
        self.records = RecordTable(store, REGISTRY_COLLECTION)
        self._ready = False
        self._lock = threading.Lock()  # threads sharing this registry queue instead of failing each other

    def _ensure(self) -> None:
        if not self._ready:
            self.records.ensure()
            self._ready = True

    def _exists(self) -> bool:
        if not self._ready:
            self._ready = self.store.has_collection(REGISTRY_COLLECTION)
        return self._ready

    def get(self, name: str) -> RegistryRecord | None:
        """Read-only: a missing registry reads as no record (nothing is created)."""
        if not self._exists():
            return None
        # Each generation is written under its own key and the highest one wins: a key overwritten
        # in place (upsert) has been read back at an older version on Milvus 2.3, which would move
        # services backwards. The plain `name` row (a copy, and what older releases wrote) counts too.
        payloads = list(self.records.scan(f"{name}{VERSION_SEPARATOR}").values())
        payloads += self.records.read([name]).values()
        if not payloads:
            return None
        return max((RegistryRecord.model_validate_json(payload) for payload in payloads),
                   key=lambda record: record.generation)

    def put(self, record: RegistryRecord) -> RegistryRecord:
        """Write `record` if the stored one still has `record.generation` (none stored: 0); returns it
        with the generation services watch bumped. Raises ConflictError when someone else wrote first."""
        self._ensure()
        expected = record.generation
        written = record.model_copy(deep=True, update={"generation": expected + 1})
        payload = written.model_dump_json()
        if len(payload.encode("utf-8")) > 65535:
            written.history = written.history[-5:]
            payload = written.model_dump_json()
        prefix = f"{record.name}{CLAIM_SEPARATOR}{written.generation}/"
        claim = prefix + uuid.uuid4().hex
        with self._lock:
            started = time.monotonic()
            self.records.write(claim, json.dumps({"at_ms": _now_ms()}))
            try:
                rivals = [key for key, value in self.records.scan(prefix).items()
                          if key != claim and _live_claim(value)]
                if rivals:
                    raise ConflictError(
                        f"registry record {record.name!r}: another writer is writing generation "
                        f"{written.generation} at the same time; re-read and retry (a claim left by a killed "
                        f"writer expires {CLAIM_TTL_S:.0f} s after it was made)"
                    )
                stored = self.get(record.name)
                stored_generation = stored.generation if stored is not None else 0
                if stored_generation != expected:
                    raise ConflictError(
                        f"registry record {record.name!r} is at generation {stored_generation}, not {expected} "
                        "as read: another writer changed it; re-read and retry"
                    )
                if time.monotonic() - started > CLAIM_TTL_S / 2:
                    raise ConflictError(f"registry record {record.name!r}: the write claim took too long; retry")
                self.records.write(_version_key(record.name, written.generation), payload)
                self.records.write(record.name, payload)  # names() lists these
                self._drop_old_versions(record.name, written.generation)
            finally:
                try:
                    self.records.delete([claim])
                except SemsearchError as exc:  # it expires by itself
                    log.warning("registry_claim_not_dropped", claim=claim, reason=str(exc))
        record.generation, record.history = written.generation, written.history
        return record

    def _drop_old_versions(self, name: str, generation: int) -> None:
        old = [key for key in self.records.scan(f"{name}{VERSION_SEPARATOR}")
               if int(key.rsplit("/", 1)[1]) <= generation - VERSIONS_KEPT]
        try:
            self.records.delete(old)
        except SemsearchError as exc:  # harmless: reads take the highest generation
            log.warning("registry_versions_not_dropped", name=name, reason=str(exc))

    def names(self) -> list[str]:
        if not self._exists():
            return []
        # Claims and instance reports hold a "/", which no collection name (hence no name) can.
        return sorted(key for key in self.records.scan() if "/" not in key)

    # ------------------------------------------------------------------ instances following a name
    def report_instance(self, name: str, instance_id: str, generation: int, dual_writing: str) -> None:
        """What one service instance has applied: the record generation, and the collection it
        dual-writes to ('' when none). The promoter waits for these before it copies."""
        self._ensure()
        self.records.write(f"{name}{INSTANCE_SEPARATOR}{instance_id}", json.dumps(
            {"generation": generation, "dual_writing": dual_writing, "at_ms": _now_ms()}))

    def forget_instance(self, name: str, instance_id: str) -> None:
        if self._exists():
            self.records.delete([f"{name}{INSTANCE_SEPARATOR}{instance_id}"])

    def live_instances(self, name: str, fresh_within_s: float) -> dict[str, dict[str, Any]]:
        """Instances of `name` that reported within `fresh_within_s` (older ones are gone or stuck)."""
        if not self._exists():
            return {}
        prefix = f"{name}{INSTANCE_SEPARATOR}"
        live: dict[str, dict[str, Any]] = {}
        for key, value in self.records.scan(prefix).items():
            try:
                report = dict(json.loads(value))
                age_ms = _now_ms() - int(report["at_ms"])
            except (ValueError, KeyError, TypeError):
                continue
            if age_ms < fresh_within_s * 1000:
                live[key[len(prefix):]] = report
        return live

    def all_referenced_collections(self) -> set[str]:
        referenced: set[str] = set()
        for name in self.names():
            record = self.get(name)
            if record is not None:
                referenced |= record.referenced_collections()
        return referenced

    # ------------------------------------------------------------------ the reranker of a name
    def set_reranker(self, name: str, reranker: RerankerRecord, *, event: str = "promote_reranker") -> RegistryRecord:
        """Serve `reranker` for `name` (one compare-and-swap write; instances follow at their next
        poll, no re-embedding); the one it replaces becomes `previous_reranker` (none: NO_RERANKER)."""
        record = self.get(name)
        if record is None or record.current is None:
            raise SemsearchError(f"no registry record for {name!r}: start the service (or promote a model) first")
        old = record.reranker or NO_RERANKER
        record.previous_reranker, record.reranker = old, reranker
        record.event(event, reranker_version=reranker.version or None, previous_reranker_version=old.version or None)
        return self.put(record)

    def rollback_reranker(self, name: str) -> RegistryRecord:
        """Back to the reranker the last promotion replaced (possibly none)."""
        record = self.get(name)
        if record is None or record.previous_reranker is None:
            raise SemsearchError(f"{name!r} has no previous reranker to roll back to")
        return self.set_reranker(name, record.previous_reranker, event="rollback_reranker")

    def bootstrap(self, name: str, manifest: ModelManifest, collection: str,
                  encoder_url: str | None = None, *, persist: bool = True) -> RegistryRecord:
        """The first record for a name: what is serving now becomes `current`."""
        record = self.get(name)
        if record is not None and record.current is not None:
            return record
        record = record or RegistryRecord(name=name)
        record.current = pair_for(manifest, collection, encoder_url)
        record.event("bootstrap", model_version=manifest.version, collection=collection)
        if not persist:
            return record
        try:
            return self.put(record)
        except ConflictError:
            # Two instances starting at once: the one that won wrote the record everyone uses.
            winner = self.get(name)
            if winner is None or winner.current is None:
                raise
            return winner


def _now_ms() -> int:
    return int(time.time() * 1000)


def _live_claim(value: str) -> bool:
    try:
        at_ms = int(json.loads(value)["at_ms"])
    except (ValueError, KeyError, TypeError):
        return True  # unreadable: assume live until it is dropped
    return _now_ms() - at_ms < CLAIM_TTL_S * 1000


def pair_for(manifest: ModelManifest, collection: str, encoder_url: str | None = None,
             metrics: dict[str, Any] | None = None) -> PairRecord:
    return PairRecord(model_version=manifest.version, manifest=json.loads(manifest.model_dump_json()),
                       collection=collection, encoder_url=encoder_url, metrics=metrics or {})


def open_pair_encoder(pair: PairRecord, settings: Settings) -> Encoder:
    """The encoder a registry pair names (its servers, else the configured ones), verified to be that version."""
    encoder_url = pair.encoder_url or settings.encoder_url
    encoder = create_encoder(settings.model_copy(update={"model": pair.model_ref, "encoder_url": encoder_url}))
    if encoder.manifest.version != pair.model_version:
        encoder.close()
        raise ModelMismatchError(
            f"registry pair wants model {pair.model_version} but {pair.model_ref} is {encoder.manifest.version}"
        )
    return encoder


def open_record_reranker(record: RerankerRecord, settings: Settings) -> Reranker | None:
    """The reranker a registry record names (None for "no reranker"), verified to be that version."""
    from semsearch.rerankers import create_reranker

    if not record.version:
        return None
    reranker = create_reranker(settings, record.model_ref, record.url or settings.reranker_url)
    if reranker is None or reranker.manifest.version != record.version:
        found = reranker.manifest.version if reranker is not None else "nothing"
        if reranker is not None:
            reranker.close()
        raise ModelMismatchError(
            f"registry wants reranker {record.version} but {record.model_ref} is {found}")
    return reranker
