"""`semsearch serve`, `semsearch search` and `semsearch demo`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console

from semsearch.cli import (
    CollectionOption,
    ConfigOption,
    DeviceOption,
    EncoderBackendOption,
    EncoderUrlOption,
    HostOption,
    LogLevelOption,
    MilvusUriOption,
    ModelOption,
    PortOption,
    fail,
    settings_from_cli,
)
from semsearch.errors import ModelMismatchError, ModelNotFoundError, SemsearchError
from semsearch.v1 import search_pb2 as pb
from semsearch.v1 import search_pb2_grpc
from service.output import print_hits

console = Console(stderr=False)


def parse_filter(spec: str) -> pb.MetadataFilter:
    """`field=value`, `field!=value`, `field>=3`...; values parse as JSON numbers/booleans, else strings."""
    tokens = ((">=", pb.FILTER_OPERATOR_GTE), ("<=", pb.FILTER_OPERATOR_LTE), ("!=", pb.FILTER_OPERATOR_NE),
              ("=", pb.FILTER_OPERATOR_EQ), (">", pb.FILTER_OPERATOR_GT), ("<", pb.FILTER_OPERATOR_LT))
    found = next(((token, operator) for token, operator in tokens if token in spec), None)
    if found is None:
        raise typer.BadParameter(f"filter {spec!r} must look like field=value or field>=number")
    token, operator = found
    field, raw = spec.split(token, 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    typed = pb.FilterValue()
    if isinstance(value, bool):
        typed.bool_value = value
    elif isinstance(value, int):
        typed.int_value = value
    elif isinstance(value, float):
        typed.double_value = value
    else:
        typed.string_value = value if isinstance(value, str) else raw
    return pb.MetadataFilter(field=field.strip(), operator=operator, value=typed)


def response_to_json(response: pb.SearchDocumentsResponse) -> dict[str, Any]:
    return {
        "hits": [
            {"id": h.id, "text": h.text, "score": round(h.score, 6),
             "metadata": json_format.MessageToDict(h.metadata)}
            for h in response.hits
        ],
        "model_version": response.model_version,
        "collection": response.collection,
        "took_ms": round(response.timing.total_ms, 3),
    }


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: ConfigOption = None, milvus_uri: MilvusUriOption = None, collection: CollectionOption = None,
        model: ModelOption = None, encoder_url: EncoderUrlOption = None, device: DeviceOption = None,
        host: HostOption = None, port: PortOption = None, log_level: LogLevelOption = None,
        encoder_backend: EncoderBackendOption = None,
    ) -> None:
        """Run the gRPC search service until SIGTERM (then drain in-flight calls)."""
        from service.server import serve as run

        settings = settings_from_cli(config, milvus_uri=milvus_uri, collection=collection, model=model,
                                     encoder_url=encoder_url, device=device, host=host, port=port,
                                     log_level=log_level, encoder_backend=encoder_backend)
        try:
            asyncio.run(run(settings))
        except (ModelNotFoundError, ModelMismatchError) as exc:
            raise fail(str(exc)) from exc
        except SemsearchError as exc:
            raise fail(str(exc)) from exc

    @app.command()
    def search(
        query: Annotated[str, typer.Argument(help="The query text (no instruction: the service adds it)")],
        addr: Annotated[str | None, typer.Option(
            "--addr", help="Service HOST:PORT (default from --host/--port)")] = None,
        top_k: Annotated[int, typer.Option("--top-k", help="How many hits")] = 10,
        filters: Annotated[list[str] | None, typer.Option("--filter", help="field=value, field>=3 ... (ANDed)")] = None,
        chunks: Annotated[bool, typer.Option("--chunks", help="Return matching chunks, not documents")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
        timeout: Annotated[float, typer.Option("--timeout", help="Deadline in seconds")] = 30.0,
        config: ConfigOption = None, host: HostOption = None, port: PortOption = None,
    ) -> None:
        """Search a running service over gRPC."""
        settings = settings_from_cli(config, host=host, port=port)
        target = addr or f"{settings.host}:{settings.port}"
        request = pb.SearchDocumentsRequest(
            query=query, top_k=top_k, filters=[parse_filter(f) for f in filters or []], return_chunks=chunks,
        )
        with grpc.insecure_channel(target) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            try:
                response = stub.SearchDocuments(request, timeout=timeout)
            except grpc.RpcError as exc:
                raise fail(f"{exc.code().name}: {exc.details()}") from exc
        if as_json:
            typer.echo(json.dumps(response_to_json(response), ensure_ascii=False))
        else:
            print_hits(query, response)

    @app.command()
    def demo(
        config: ConfigOption = None, milvus_uri: MilvusUriOption = None, model: ModelOption = None,
        encoder_url: EncoderUrlOption = None, device: DeviceOption = None, log_level: LogLevelOption = None,
        corpus: Annotated[Path | None, typer.Option("--corpus", help="JSONL corpus (default: the shipped FAQ)")] = None,
        encoder_backend: EncoderBackendOption = None,
    ) -> None:
        """Index the shipped Chinese FAQ, start the service on 127.0.0.1 and run example queries."""
        from service.demo import run_demo

        settings = settings_from_cli(config, milvus_uri=milvus_uri, model=model, encoder_url=encoder_url,
                                     device=device, log_level=log_level or "ERROR", encoder_backend=encoder_backend)
        try:
            asyncio.run(run_demo(settings, corpus=corpus, milvus_uri_given=milvus_uri is not None))
        except SemsearchError as exc:
            raise fail(str(exc)) from exc
