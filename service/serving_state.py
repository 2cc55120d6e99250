"""Follow the model registry: load a promotion's pair, dual-write to it, swap it in, retire the old one.

Each service instance polls the registry record of the name it serves (and reloads on the admin
RPC). A pending pair is loaded and warmed, then receives every write (dual-write); when the record's
current pair changes, the instance swaps (encoder, collection) as one reference. In-flight requests
finish on the pair they started with; the old pair closes when none holds it.
"""

from __future__ import annotations

import asyncio
import uuid

import structlog

from semsearch.config import Settings
from semsearch.encoders import Encoder, create_encoder
from semsearch.errors import SemsearchError
from semsearch.metrics import REGISTRY_WATCH_ERRORS, set_model_info, set_reranker_info
from semsearch.registry import ModelRegistry, PairRecord, RegistryRecord, open_pair_encoder, open_record_reranker
from semsearch.rerankers import create_reranker
from semsearch.store import MilvusStore, versioned_name
from service.engine import RerankStage, SearchEngine, ServingPair, build_pair, build_rerank_stage

log = structlog.get_logger(__name__)


class ServingState:
    def __init__(self, settings: Settings, store: MilvusStore) -> None:
        self.settings = settings
        self.store = store
        self.registry = ModelRegistry(store)
        self.name = settings.collection
        self.generation = 0
        self.engine: SearchEngine | None = None
        self._lock = asyncio.Lock()
        # Reported by AdminService.GetServingState: a watch that fails must not fail silently.
        self.watch_error = ""
        self.watch_failures = 0
        # This process in the registry's instance reports (a promotion waits until all dual-write).
        self.instance_id = uuid.uuid4().hex

    async def initial_pair(self, encoder: Encoder | None, *, allow_stand_in: bool = False) -> ServingPair:
        """The registry's current pair if there is one, else the configured model (recorded as current)."""
        record = await asyncio.to_thread(self.registry.get, self.name) if self.settings.use_registry else None
        if record is not None and record.current is not None:
            current = record.current
            if encoder is None or encoder.manifest.version != current.model_version:
                if encoder is not None:
                    log.warning("registry_overrides_model", configured=encoder.manifest.version,
                                registry=current.model_version)
                encoder = await asyncio.to_thread(open_pair_encoder, current, self.settings)
            # A promotion in progress is applied by the first reconcile (it loads the pending pair).
            self.generation = record.generation if record.pending is None else 0
            return await asyncio.to_thread(build_pair, self.settings, encoder, self.store, current.collection)
        if encoder is None:
            encoder = await asyncio.to_thread(create_encoder, self.settings, allow_stand_in=allow_stand_in)
        await asyncio.to_thread(self._create_if_missing, encoder)
        pair = await asyncio.to_thread(build_pair, self.settings, encoder, self.store, self.name)
        if self.settings.use_registry:
            record = await asyncio.to_thread(
                self.registry.bootstrap, self.name, encoder.manifest, pair.collection.name, self.settings.encoder_url
            )
            self.generation = record.generation
        return pair

    async def initial_reranker(self) -> RerankStage | None:
        """The registry's reranker when one was promoted (or rolled back to none), else the configured one."""
        record = await asyncio.to_thread(self.registry.get, self.name) if self.settings.use_registry else None
        if record is not None and record.reranker is not None:
            reranker = await asyncio.to_thread(open_record_reranker, record.reranker, self.settings)
        else:
            reranker = await asyncio.to_thread(create_reranker, self.settings)
        return None if reranker is None else build_rerank_stage(self.settings, reranker)

    def _create_if_missing(self, encoder: Encoder) -> None:
        """A new name gets a versioned collection behind an alias, so a later promotion can move it."""
        if self.store.resolve(self.name):
            return
        physical = versioned_name(self.name, encoder.manifest.version)
        self.store.ensure_collection(physical, encoder.manifest)
        self.store.point_alias(self.name, physical)

    async def reconcile(self) -> bool:
        """Apply the registry record; True when the serving or pending pair changed."""
        engine = self.engine
        if engine is None or not self.settings.use_registry:
            return False
        async with self._lock:
            record = await asyncio.to_thread(self.registry.get, self.name)
            if record is None or record.generation == self.generation:
                return False
            if record.generation < self.generation:
                # Never step back: a read that returns an older version must not undo a swap.
                log.warning("registry_record_older_than_applied", generation=record.generation,
                            applied=self.generation)
                return False
            changed = await self._apply(engine, record)
            self.generation = record.generation
        if changed:  # at once: a promoter is waiting for this instance to dual-write
            await self.report()
        return changed

    async def _apply(self, engine: SearchEngine, record: RegistryRecord) -> bool:
        """Swap to the record's current pair, then dual-write to its pending one (a rollback's
        pending pair is the one being replaced: it becomes the pending pair instead of closing)."""
        changed = await self._apply_reranker(engine, record)
        pending, current = record.pending, record.current
        if current is not None and not _holds(engine.pair, current):
            ready = engine.pending_pair  # a promotion's pair, already loaded for its dual writes
            new = ready if ready is not None and _holds(ready, current) else await self._load(current)
            old = engine.swap(new)
            set_model_info(new.model_version, new.collection.name)
            log.info("pair_swapped", model_version=new.model_version, collection=new.collection.name,
                     previous_model_version=old.model_version, previous_collection=old.collection.name)
            if pending is not None and engine.pending_pair is None and _holds(old, pending):
                engine.pending_pair = old
                log.info("dual_write_started", model_version=old.model_version, collection=old.collection.name)
            else:
                asyncio.get_running_loop().create_task(engine.retire(old))
            changed = True
        if pending is not None and not _holds(engine.pending_pair, pending) and not _holds(engine.pair, pending):
            previous_pending_pair, engine.pending_pair = engine.pending_pair, await self._load(pending)
            log.info("dual_write_started", model_version=pending.model_version, collection=pending.collection)
            if previous_pending_pair is not None:
                asyncio.get_running_loop().create_task(engine.retire(previous_pending_pair))
            changed = True
        if pending is None and engine.pending_pair is not None:
            stopped, engine.pending_pair = engine.pending_pair, None
            log.info("dual_write_stopped", model_version=stopped.model_version, collection=stopped.collection.name)
            asyncio.get_running_loop().create_task(engine.retire(stopped))
            changed = True
        return changed

    async def _apply_reranker(self, engine: SearchEngine, record: RegistryRecord) -> bool:
        """Swap to the record's reranker (loaded and warmed first); none recorded: keep what serves."""
        wanted = record.reranker
        serving = engine.rerank.version if engine.rerank is not None else ""
        if wanted is None or wanted.version == serving:
            return False
        reranker = await asyncio.to_thread(open_record_reranker, wanted, self.settings)
        stage = None if reranker is None else build_rerank_stage(self.settings, reranker)
        if stage is not None:
            stage.batcher.start()
            await stage.batcher.score([("预热", "预热")])  # the first request must not pay for loading
        old = engine.swap_reranker(stage)
        set_reranker_info(wanted.version)
        log.info("reranker_swapped", reranker_version=wanted.version or None, previous_reranker_version=serving or None)
        if old is not None:
            asyncio.get_running_loop().create_task(engine.retire_reranker(old))
        return True

    async def _load(self, record: PairRecord) -> ServingPair:
        encoder = await asyncio.to_thread(open_pair_encoder, record, self.settings)
        pair = await asyncio.to_thread(build_pair, self.settings, encoder, self.store, record.collection)
        pair.batcher.start()
        # Warm before it takes traffic: the first query must not pay lazy initialization.
        await pair.batcher.encode(["预热"])
        return pair

    async def report(self) -> None:
        """Tell the registry what this instance applied (generation, collection it dual-writes to)."""
        engine = self.engine
        if engine is None or not self.settings.use_registry:
            return
        pending_pair = engine.pending_pair
        await asyncio.to_thread(self.registry.report_instance, self.name, self.instance_id, self.generation,
                                pending_pair.collection.name if pending_pair is not None else "")

    async def forget(self) -> None:
        """Leave the instance reports (a clean shutdown: promotions stop waiting for this one)."""
        if self.settings.use_registry:
            await asyncio.to_thread(self.registry.forget_instance, self.name, self.instance_id)

    async def watch(self) -> None:
        """Poll the registry until cancelled. No error ends the loop: a malformed record or an
        unexpected failure is logged, counted and reported (AdminService), and polled again."""
        while True:
            await asyncio.sleep(self.settings.registry_poll_s)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.watch_failures += 1
                self.watch_error = f"{type(exc).__name__}: {exc}"[:1000]
                REGISTRY_WATCH_ERRORS.inc()
                expected = isinstance(exc, SemsearchError | OSError)
                log.warning("registry_reconcile_failed", reason=self.watch_error, failures=self.watch_failures,
                            exc_info=not expected)
            else:
                await self.report()
                if self.watch_failures:
                    log.info("registry_reconcile_recovered", after_failures=self.watch_failures)
                self.watch_failures, self.watch_error = 0, ""


def _holds(pair: ServingPair | None, record: PairRecord) -> bool:
    return pair is not None and pair.same_as(record.model_version, record.collection)
