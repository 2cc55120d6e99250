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
from rich.table import Table

from semsearch.cli import (
    CollectionOption,
    ConfigOption,
    DeviceOption,
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


MODE_NAMES = {pb.RETRIEVAL_MODE_DENSE: "dense", pb.RETRIEVAL_MODE_LEXICAL: "lexical",
              pb.RETRIEVAL_MODE_HYBRID: "hybrid"}
MODE_VALUES = {name: value for value, name in MODE_NAMES.items()}


def response_to_json(response: pb.SearchDocumentsResponse) -> dict[str, Any]:
    return {
        "hits": [
            {"id": h.id, "text": h.text, "score": round(h.score, 6),
             "metadata": json_format.MessageToDict(h.metadata),
             "retrievers": {MODE_NAMES.get(r.retriever, str(r.retriever)): {"score": round(r.score, 6), "rank": r.rank}
                            for r in h.retrievers}}
            for h in response.hits
        ],
        "mode": MODE_NAMES.get(response.mode, "dense"),
        "model_version": response.model_version,
        "collection": response.collection,
        "took_ms": round(response.timing.total_ms, 3),
    }


def print_hits(query: str, response: pb.SearchDocumentsResponse) -> None:
    table = Table(title=f"「{query}」", title_justify="left", show_lines=False)
    table.add_column("#", justify="right", no_wrap=True, min_width=2)
    table.add_column("score", justify="right", no_wrap=True, min_width=6)
    table.add_column("id", no_wrap=True, min_width=len(max((h.id for h in response.hits), key=len, default="")))
    hybrid = response.mode == pb.RETRIEVAL_MODE_HYBRID
    if hybrid:  # which retriever ranked it where
        table.add_column("found by", no_wrap=True)
    table.add_column("text", overflow="ellipsis", no_wrap=True, max_width=48)
    for rank, hit in enumerate(response.hits, 1):
        found = [" ".join(f"{MODE_NAMES.get(r.retriever, '?')}#{r.rank}" for r in hit.retrievers)] if hybrid else []
        table.add_row(str(rank), f"{hit.score:.4f}", hit.id, *found, hit.text.replace("\n", " "))
    console.print(table)
    console.print(f"[dim]{MODE_NAMES.get(response.mode, 'dense')} · model {response.model_version} · "
                  f"collection {response.collection} · {response.timing.total_ms:.1f} ms[/dim]")


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: ConfigOption = None, milvus_uri: MilvusUriOption = None, collection: CollectionOption = None,
        model: ModelOption = None, encoder_url: EncoderUrlOption = None, device: DeviceOption = None,
        host: HostOption = None, port: PortOption = None, log_level: LogLevelOption = None,
    ) -> None:
        """Run the gRPC search service until SIGTERM (then drain in-flight calls)."""
        from service.server import serve as run

        settings = settings_from_cli(config, milvus_uri=milvus_uri, collection=collection, model=model,
                                     encoder_url=encoder_url, device=device, host=host, port=port,
                                     log_level=log_level)
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
        mode: Annotated[str | None, typer.Option(
            "--mode", help="dense, lexical (BM25) or hybrid (default: the service's retrieval_mode)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
        timeout: Annotated[float, typer.Option("--timeout", help="Deadline in seconds")] = 30.0,
        config: ConfigOption = None, host: HostOption = None, port: PortOption = None,
    ) -> None:
        """Search a running service over gRPC."""
        settings = settings_from_cli(config, host=host, port=port)
        target = addr or f"{settings.host}:{settings.port}"
        if mode is not None and mode not in MODE_VALUES:
            raise fail(f"--mode {mode!r}: expected dense, lexical or hybrid", code=2)
        request = pb.SearchDocumentsRequest(
            query=query, top_k=top_k, filters=[parse_filter(f) for f in filters or []], return_chunks=chunks,
            mode=MODE_VALUES[mode] if mode else pb.RETRIEVAL_MODE_UNSPECIFIED,
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
    ) -> None:
        """Index the shipped Chinese FAQ, start the service on 127.0.0.1 and run example queries."""
        from service.demo import run_demo

        settings = settings_from_cli(config, milvus_uri=milvus_uri, model=model, encoder_url=encoder_url,
                                     device=device, log_level=log_level or "ERROR")
        try:
            asyncio.run(run_demo(settings, corpus=corpus, milvus_uri_given=milvus_uri is not None))
        except SemsearchError as exc:
            raise fail(str(exc)) from exc
