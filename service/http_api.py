"""What the HTTP/JSON gateway exposes, as data: the routes (each one gRPC method, its request and
response message types taken from the descriptors) and the HTTP status of every gRPC status code.

Nothing here knows a message's fields: bodies are the proto3 JSON form of the request message, so a
field added to a .proto works over HTTP (and appears in the OpenAPI document) without a change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from semsearch.v1 import admin_pb2, search_pb2

SEARCH_SERVICE: ServiceDescriptor = search_pb2.DESCRIPTOR.services_by_name["SearchService"]
ADMIN_SERVICE: ServiceDescriptor = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
SERVICES = (SEARCH_SERVICE, ADMIN_SERVICE)


@dataclass(frozen=True)
class HttpRoute:
    """`http_method path` calls `rpc`; `{name}` segments of the path fill the request field `name`."""

    http_method: str
    path: str
    rpc: MethodDescriptor
    summary: str = ""

    @property
    def grpc_path(self) -> str:
        return f"/{self.rpc.containing_service.full_name}/{self.rpc.name}"

    @property
    def path_params(self) -> list[str]:
        return [part[1:-1].split(":", 1)[0] for part in self.path.split("/") if part.startswith("{")]

    @property
    def has_body(self) -> bool:
        return self.http_method in ("POST", "PUT", "PATCH")

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.rpc.input_type)

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.rpc.output_type)

    @property
    def operation_id(self) -> str:
        # The REST route and the generic RPC route of one method need distinct ids.
        prefix = "" if not self.path.startswith("/semsearch.") else "rpc_"
        return prefix + self.rpc.name


def _method(service: ServiceDescriptor, name: str) -> MethodDescriptor:
    return service.methods_by_name[name]


# The documented REST routes (the paths). Starlette's `:path` converter lets an id contain '/'.
REST_ROUTES: tuple[HttpRoute, ...] = (
    HttpRoute("POST", "/v1/search", _method(SEARCH_SERVICE, "SearchDocuments"), "Search documents"),
    HttpRoute("POST", "/v1/search:batch", _method(SEARCH_SERVICE, "BatchSearchDocuments"),
              "Many searches, encoded in one forward pass"),
    HttpRoute("POST", "/v1/documents:upsert", _method(SEARCH_SERVICE, "UpsertDocuments"),
              "Insert or replace documents by id"),
    HttpRoute("POST", "/v1/documents:delete", _method(SEARCH_SERVICE, "DeleteDocuments"), "Delete documents"),
    HttpRoute("GET", "/v1/documents/{id:path}", _method(SEARCH_SERVICE, "GetDocument"),
              "Get one document by id (percent-encode the id; other request fields are query parameters)"),
    HttpRoute("GET", "/v1/admin/serving-state", _method(ADMIN_SERVICE, "GetServingState"),
              "The serving (model, collection) pair and the registry's state (admin scope)"),
    HttpRoute("POST", "/v1/admin/serving-state:reload", _method(ADMIN_SERVICE, "ReloadServingState"),
              "Re-read the registry now (admin scope)"),
    HttpRoute("GET", "/v1/admin/collection", _method(ADMIN_SERVICE, "DescribeCollection"),
              "Counts, metadata fields, set-up and registry history of the serving collection (admin scope)"),
)


def rpc_routes() -> tuple[HttpRoute, ...]:
    """Every method of both services at its gRPC path (`POST /semsearch.v1.SearchService/SearchDocuments`,
    body and answer in JSON): a method added to a .proto is reachable over HTTP without a route here."""
    return tuple(HttpRoute("POST", f"/{service.full_name}/{method.name}", method, f"{method.name} (generic RPC route)")
                 for service in SERVICES for method in service.methods)


ROUTES: tuple[HttpRoute, ...] = REST_ROUTES + rpc_routes()

# As grpc-gateway maps them (runtime.HTTPStatusFromCode), with one documented choice:
# FAILED_PRECONDITION is 400, not 412. The service uses it for states the caller must change
# (a collection without BM25 for a lexical query, a page token from before a promotion), not for
# HTTP conditional requests (If-Match), which is what 412 means; the body's `status` keeps the name.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,  # client closed request (nginx's code, as grpc-gateway)
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


ERROR_DOMAIN = "semsearch"


def error_body(code: grpc.StatusCode, message: str, details: list[dict[str, Any]] | None = None,
               http: int | None = None) -> dict[str, Any]:
    """Google's JSON error form (AIP-193): `{"error": {...}}` with the HTTP status in `code`, the gRPC
    code's name in `status`, and details led by the google.rpc.ErrorInfo that AIP-193 requires
    (`reason` is the gRPC code's name: the service has no finer machine-readable reasons)."""
    info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": code.name, "domain": ERROR_DOMAIN,
            "metadata": {}}
    return {"error": {"code": http or http_status(code), "status": code.name, "message": message,
                      "details": [info, *(details or [])]}}
