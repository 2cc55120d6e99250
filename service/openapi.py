"""The OpenAPI 3 document of the HTTP/JSON gateway, generated from the proto descriptors.

Messages become schemas in the proto3 JSON mapping (lowerCamelCase names; 64-bit integers as
strings; enums as their names; Struct as a free-form object), routes become paths, and the .proto
comments become descriptions. The generated stubs carry no comments, so they are read from the
.proto files with protoc (grpc_tools, a dev dependency) when the document is written:
`python scripts/gen_openapi.py` writes service/openapi.json (package data, served at
`GET /openapi.json`); a test fails while it is stale.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from service.http_api import ROUTES, HttpRoute
from service.openai_api import OPENAPI_PATHS

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"

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
    "description": "Google's JSON error form (AIP-193, https://google.aip.dev/193)",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "integer", "description": "the HTTP status code"},
                "status": {"type": "string", "description": "the gRPC status code's name (google.rpc.Code)"},
                "message": {"type": "string"},
                "details": {
                    "type": "array",
                    "description": "google.rpc.ErrorInfo first (reason: the status name, domain: semsearch), "
                                   "then google.rpc.RetryInfo when the service says how long to wait",
                    "items": {"type": "object", "properties": {"@type": {"type": "string"}},
                              "required": ["@type"], "additionalProperties": True},
                },
            },
            "required": ["code", "status", "message", "details"],
        },
    },
    "required": ["error"],
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _comment(location: descriptor_pb2.SourceCodeInfo.Location) -> str:
    text = location.leading_comments or location.trailing_comments
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _source_names(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Source-info path (field numbers of FileDescriptorProto: 4 messages, 5 enums, 6 services...)
    → full name."""
    names: dict[tuple[int, ...], str] = {}

    def enums(items: Sequence[descriptor_pb2.EnumDescriptorProto], path: tuple[int, ...], scope: str) -> None:
        for i, enum in enumerate(items):
            names[(*path, i)] = f"{scope}.{enum.name}"
            for j, value in enumerate(enum.value):
                names[(*path, i, 2, j)] = f"{scope}.{value.name}"  # enum values live in the enum's scope

    def messages(items: Sequence[descriptor_pb2.DescriptorProto], path: tuple[int, ...], scope: str) -> None:
        for i, message in enumerate(items):
            name, where = f"{scope}.{message.name}", (*path, i)
            names[where] = name
            for j, field in enumerate(message.field):
                names[(*where, 2, j)] = f"{name}.{field.name}"
            messages(message.nested_type, (*where, 3), name)
            enums(message.enum_type, (*where, 4), name)

    messages(file.message_type, (4,), file.package)
    enums(file.enum_type, (5,), file.package)
    for i, service in enumerate(file.service):
        names[(6, i)] = f"{file.package}.{service.name}"
        for j, method in enumerate(service.method):
            names[(6, i, 2, j)] = f"{file.package}.{service.name}.{method.name}"
    return names


def proto_comments(proto_root: Path = PROTO_ROOT) -> dict[str, str]:
    """Full name (`semsearch.v1.Document`, `semsearch.v1.Document.id`, `semsearch.v1.SearchService.
    GetDocument`, enum values too) → the comment above it in the .proto files."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        if protoc.main(["protoc", f"-I{proto_root}", f"-I{well_known}", "--include_source_info",
                        f"--descriptor_set_out={out}", *protos]) != 0:
            raise RuntimeError("protoc failed")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    comments: dict[str, str] = {}
    for file in files:
        names = _source_names(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            if name is not None and _comment(location):
                comments[name] = _comment(location)
    return comments


class SchemaBuilder:
    def __init__(self, comments: Mapping[str, str]) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}
        self.comments = comments

    def describe(self, schema: dict[str, Any], full_name: str, extra: str = "") -> dict[str, Any]:
        text = " ".join(part for part in (self.comments.get(full_name, ""), extra) if part)
        if not text:
            return schema
        if "$ref" in schema:  # OpenAPI 3.0 ignores siblings of $ref
            return {"allOf": [schema], "description": text}
        return {**schema, "description": text}

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        if descriptor.full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[descriptor.full_name])
        if descriptor.full_name not in self.schemas:
            self.schemas[descriptor.full_name] = {}  # placeholder: recursive messages terminate
            properties = {field.json_name: self.describe(self.field(field), field.full_name)
                          for field in descriptor.fields}
            schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
            oneofs = [o for o in descriptor.oneofs if not (len(o.fields) == 1 and o.name.startswith("_"))]
            extra = "; ".join(f"at most one of {', '.join(f.json_name for f in o.fields)} (oneof {o.name})"
                              for o in oneofs)
            self.schemas[descriptor.full_name] = self.describe(schema, descriptor.full_name, extra)
        return _ref(descriptor.full_name)

    def enum(self, descriptor: EnumDescriptor) -> dict[str, Any]:
        if descriptor.full_name not in self.schemas:
            scope = descriptor.full_name.rsplit(".", 1)[0]  # enum values are named in the enum's scope
            values = "; ".join(f"`{value.name}`: {self.comments[f'{scope}.{value.name}']}"
                               for value in descriptor.values if f"{scope}.{value.name}" in self.comments)
            self.schemas[descriptor.full_name] = self.describe(
                {"type": "string", "enum": [value.name for value in descriptor.values]}, descriptor.full_name,
                f"The value's name (its number is accepted too). {values}".strip())
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
        param = {"name": field.json_name, "in": "query", "required": False, "schema": builder.field(field)}
        if field.full_name in builder.comments:
            param["description"] = builder.comments[field.full_name]
        params.append(param)
    return params


def _operation(route: HttpRoute, builder: SchemaBuilder) -> dict[str, Any]:
    errors = {"description": "an error: the HTTP status follows the gRPC code (see the README)",
              "content": {"application/json": {"schema": _ref("Error")}}}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "description": " ".join(part for part in (builder.comments.get(route.rpc.full_name, ""),
                                                  f"(gRPC `{route.rpc.full_name}`)") if part),
        "tags": [route.rpc.containing_service.name],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {
                "schema": builder.message(route.rpc.output_type)}}},
            "default": errors,
        },
    }
    request_name = route.rpc.input_type.full_name
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"},
                   **({"description": builder.comments[f"{request_name}.{name}"]}
                      if f"{request_name}.{name}" in builder.comments else {})}
                  for name in route.path_params]
    if route.has_body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": builder.message(route.rpc.input_type)}}}
    else:
        parameters += _query_parameters(route, builder)
    if parameters:
        operation["parameters"] = parameters
    return operation


def openapi_document(comments: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The document; `comments` (proto_comments()) add the .proto comments as descriptions."""
    from semsearch.cli import package_version

    builder = SchemaBuilder(comments or {})
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(_openapi_path(route.path), {})[route.http_method.lower()] = _operation(route, builder)
    paths.update(OPENAPI_PATHS)
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


def render(comments: Mapping[str, str] | None = None) -> str:
    return json.dumps(openapi_document(comments), ensure_ascii=False, indent=2) + "\n"


def packaged_document() -> str:
    """What `GET /openapi.json` serves: the committed document (with the .proto comments), or one
    generated from the descriptors alone when it is missing."""
    packaged = resources.files("service") / "openapi.json"
    return packaged.read_text(encoding="utf-8") if packaged.is_file() else render()
