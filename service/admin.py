"""gRPC transport for semsearch.v1.AdminService (admin scope when API keys are configured)."""

from __future__ import annotations

import grpc

from semsearch.v1 import admin_pb2 as pb
from semsearch.v1 import admin_pb2_grpc
from service.engine import SearchEngine, ServingPair
from service.servicer import rpc
from service.serving_state import ServingState


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
