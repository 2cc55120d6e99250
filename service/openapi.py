"""The OpenAPI 3 document of the HTTP/JSON gateway, generated from the proto descriptors.

Messages become schemas in the proto3 JSON mapping (lowerCamelCase names; 64-bit integers as
strings; enums as their names; Struct as a free-form object), routes become paths. Served at
`GET /openapi.json` and committed as proto/openapi.json (`python scripts/gen_openapi.py`; a test
fails while it is stale).
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from service.http_api import ROUTES, HttpRoute

WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "any JSON value"},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "description": "seconds with an `s` suffix, e.g. `1.5s`"},
    "google.protobuf.FieldMask": {"type": "string", "description": "comma-separated lowerCamelCase paths"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}},
                            "additionalProperties": True},
    "google.protobuf.DoubleValue": {"type": "number", "nullable": True},
    "google.protobuf.FloatValue": {"type": "number", "nullable": True},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64", "nullable": True},
    "google.protobuf.UInt64Value": {"type": "string", "format": "uint64", "nullable": True},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32", "nullable": True},
    "google.protobuf.UInt32Value": {"type": "integer", "format": "uint32", "nullable": True},
    "google.protobuf.BoolValue": {"type": "boolean", "nullable": True},
    "google.protobuf.StringValue": {"type": "string", "nullable": True},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte", "nullable": True},
}

T = FieldDescriptor
SCALARS: dict[int, dict[str, Any]] = {
    T.TYPE_DOUBLE: {"type": "number", "format": "double"},
    T.TYPE_FLOAT: {"type": "number", "format": "float"},
    # proto3 JSON writes 64-bit integers as strings (JavaScript numbers lose precision); it reads both.
    T.TYPE_INT64: {"type": "string", "format": "int64"},
    T.TYPE_UINT64: {"type": "string", "format": "uint64"},
    T.TYPE_SINT64: {"type": "string", "format": "int64"},
    T.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    T.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    T.TYPE_INT32: {"type": "integer", "format": "int32"},
    T.TYPE_SINT32: {"type": "integer", "format": "int32"},
    T.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    T.TYPE_UINT32: {"type": "integer", "format": "uint32"},
    T.TYPE_FIXED32: {"type": "integer", "format": "uint32"},
    T.TYPE_BOOL: {"type": "boolean"},
    T.TYPE_STRING: {"type": "string"},
    T.TYPE_BYTES: {"type": "string", "format": "byte"},
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "google.rpc.Status in JSON, plus the gRPC code's name",
    "properties": {
        "code": {"type": "integer", "description": "the gRPC status code (3 = INVALID_ARGUMENT, ...)"},
        "status": {"type": "string", "description": "the gRPC status code's name"},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object", "additionalProperties": True}},
    },
    "required": ["code", "status", "message", "details"],
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


class SchemaBuilder:
    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        if descriptor.full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[descriptor.full_name])
        if descriptor.full_name not in self.schemas:
            self.schemas[descriptor.full_name] = {}  # placeholder: recursive messages terminate
            properties = {field.json_name: self.field(field) for field in descriptor.fields}
            schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
            oneofs = [o for o in descriptor.oneofs if not (len(o.fields) == 1 and o.name.startswith("_"))]
            if oneofs:
                schema["description"] = "; ".join(
                    f"at most one of {', '.join(f.json_name for f in o.fields)} (oneof {o.name})" for o in oneofs)
            self.schemas[descriptor.full_name] = schema
        return _ref(descriptor.full_name)

    def enum(self, descriptor: EnumDescriptor) -> dict[str, Any]:
        if descriptor.full_name not in self.schemas:
            self.schemas[descriptor.full_name] = {
                "type": "string", "enum": [value.name for value in descriptor.values],
                "description": "the value's name (its number is accepted too)",
            }
        return _ref(descriptor.full_name)

    def single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        return dict(SCALARS[field.type])

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        if field.is_repeated:
            return {"type": "array", "items": self.single(field)}
        return self.single(field)


def _openapi_path(path: str) -> str:
    # Starlette's `{id:path}` converter is `{id}` in OpenAPI.
    return "/".join(part.split(":", 1)[0] + "}" if part.startswith("{") else part for part in path.split("/"))


def _query_parameters(route: HttpRoute, builder: SchemaBuilder) -> list[dict[str, Any]]:
    params = []
    path_params = set(route.path_params)
    for field in route.rpc.input_type.fields:
        if field.name in path_params or field.json_name in path_params or field.type == T.TYPE_MESSAGE:
            continue
        params.append({"name": field.json_name, "in": "query", "required": False, "schema": builder.field(field)})
    return params


def _operation(route: HttpRoute, builder: SchemaBuilder) -> dict[str, Any]:
    errors = {"description": "an error: the HTTP status follows the gRPC code (see the README)",
              "content": {"application/json": {"schema": _ref("Error")}}}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "description": f"gRPC `{route.rpc.full_name}`",
        "tags": [route.rpc.containing_service.name],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {
                "schema": builder.message(route.rpc.output_type)}}},
            "default": errors,
        },
    }
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in route.path_params]
    if route.has_body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": builder.message(route.rpc.input_type)}}}
    else:
        parameters += _query_parameters(route, builder)
    if parameters:
        operation["parameters"] = parameters
    return operation


def openapi_document() -> dict[str, Any]:
    from semsearch.cli import package_version

    builder = SchemaBuilder()
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(_openapi_path(route.path), {})[route.http_method.lower()] = _operation(route, builder)
    paths["/healthz"] = {"get": {"operationId": "Healthz", "summary": "SERVING (200) or NOT_SERVING (503)",
                                 "security": [], "responses": {
                                     "200": {"description": "serving"}, "503": {"description": "not serving"}}}}
    schemas = dict(sorted(builder.schemas.items()))
    schemas["Error"] = ERROR_SCHEMA
    return {
        "openapi": "3.0.3",
        "info": {"title": "semsearch", "version": package_version(),
                 "description": "HTTP/JSON gateway of semsearch.v1 (bodies in the proto3 JSON mapping)"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


def render() -> str:
    return json.dumps(openapi_document(), ensure_ascii=False, indent=2) + "\n"
