"""Graceful drain: the calls the application has taken finish; calls that arrive meanwhile are refused.

gRPC's own `server.stop(grace)` cancels any call the transport has received but not yet handed to the
application (the client sees CANCELLED, which clients do not retry). Refusing new calls ourselves with
UNAVAILABLE while the taken ones finish, and stopping the transport only then, leaves it nothing to cancel
but calls sent after that moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service.security import _deny

# Health and reflection keep answering during the drain: health is how the balancer learns we are going.
_ALWAYS_ANSWERED = ("/grpc.health.", "/grpc.reflection.")


class DrainInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_ALWAYS_ANSWERED):
            return handler
        if self.draining:
            return _deny(grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry (another replica answers)")
        if handler.unary_unary is None:  # the service has no streaming calls; leave any as they are
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._counted(handler.unary_unary), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _counted(self, behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.in_flight += 1
            self._idle.clear()
            try:
                return await behavior(request, context)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()

        return counted

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new calls from now on; wait (up to timeout_s) for the taken ones. True when none is left."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
