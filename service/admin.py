"""gRPC transport for semsearch.v1.AdminService (admin scope when API keys are configured)."""

from __future__ import annotations

import asyncio
import json
from itertools import islice

import grpc
from google.protobuf import json_format, struct_pb2

from semsearch.v1 import admin_pb2 as pb
from semsearch.v1 import admin_pb2_grpc
from service.engine import SearchEngine, ServingPair
from service.servicer import rpc
from service.serving_state import ServingState

METADATA_SAMPLE_ROWS = 1000  # metadata field names are read from this many chunks, not all


def _pair_state(pair: ServingPair | None) -> pb.ServingPairState | None:
    if pair is None:
        return None
    return pb.ServingPairState(model_version=pair.model_version, collection=pair.collection.name,
                               in_flight=pair.in_flight)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    @property
    def engine(self) -> SearchEngine | None:
        """What `rpc` checks: UNAVAILABLE while the model is still loading."""
        return self.state.engine

    def _state(self) -> pb.GetServingStateResponse:
        engine = self.state.engine
        return pb.GetServingStateResponse(
            current=_pair_state(engine.pair if engine else None),
            pending=_pair_state(engine.pending_pair if engine else None),
            registry_generation=self.state.generation, name=self.state.name,
            registry_watch_error=self.state.watch_error, registry_watch_failures=self.state.watch_failures,
            reranker_version=engine.rerank.version if engine is not None and engine.rerank is not None else "",
        )

    # `rpc`: request id, metrics per method and status, domain errors to status codes.
    @rpc
    async def GetServingState(
        self, request: pb.GetServingStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServingStateResponse:
        return self._state()

    @rpc
    async def ReloadServingState(
        self, request: pb.ReloadServingStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadServingStateResponse:
        changed = await self.state.reconcile()
        return pb.ReloadServingStateResponse(state=self._state(), changed=changed)

    @rpc
    async def DescribeCollection(
        self, request: pb.DescribeCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeCollectionResponse:
        assert self.state.engine is not None  # `rpc` answers UNAVAILABLE while loading
        return await asyncio.to_thread(self._describe, self.state.engine.pair)

    def _describe(self, pair: ServingPair) -> pb.DescribeCollectionResponse:
        store, collection = self.state.store, pair.collection.name
        fields: set[str] = set()
        for row in islice(store.iter_rows(collection, ["metadata"], batch_size=METADATA_SAMPLE_ROWS),
                          METADATA_SAMPLE_ROWS):
            fields.update(row.get("metadata") or {})
        record = self.state.registry.get(self.state.name) if self.state.settings.use_registry else None
        history = [pb.HistoryEvent(at=str(event.get("at", "")), event=str(event.get("event", "")),
                                   details=_struct({k: v for k, v in event.items() if k not in ("at", "event")}))
                   for event in (record.history if record is not None else [])]
        return pb.DescribeCollectionResponse(
            name=self.state.name, collection=collection, model_version=pair.model_version,
            documents=store.count_documents(collection, []), chunks=store.count(collection),
            lexical=pair.collection.lexical, tenants=pair.collection.tenants, metadata_fields=sorted(fields),
            tuned_retrieval=pair.retrieval.describe() if pair.retrieval is not None else "", history=history)


def _struct(values: dict[str, object]) -> struct_pb2.Struct:
    # Round-trip through JSON: whatever the record holds (dates, numbers) becomes a JSON value.
    return json_format.ParseDict(json.loads(json.dumps(values, default=str)), struct_pb2.Struct())
