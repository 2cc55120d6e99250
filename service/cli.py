"""`semsearch serve`, `semsearch search` and `semsearch demo`."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console

from semsearch.cli import (
    EXIT_USAGE,
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
    env_hint,
    fail,
    settings_from_cli,
)
from semsearch.client import SearchClient, TlsFileError
from semsearch.config import Settings
from semsearch.errors import SemsearchError
from semsearch.v1 import search_pb2 as pb
from service.output import MODE_NAMES, print_hits

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


MODE_VALUES = {name: value for value, name in MODE_NAMES.items()}


def response_to_json(response: pb.SearchDocumentsResponse) -> dict[str, Any]:
    return {
        "hits": [
            {"id": h.id, "text": h.text, "score": round(h.score, 6),
             "metadata": json_format.MessageToDict(h.metadata),
             "retrievers": {MODE_NAMES.get(r.retriever, str(r.retriever)): {"score": round(r.score, 6), "rank": r.rank}
                            for r in h.retrievers},
             # [start, end) in code points, as the API's TextSpan; only when --highlight asked.
             **({"highlights": [[s.start, s.end] for s in h.highlights], "snippet": h.snippet}
                if h.snippet or h.highlights else {})}
            for h in response.hits
        ],
        "mode": MODE_NAMES.get(response.mode, "dense"),
        "model_version": response.model_version,
        "collection": response.collection,
        "took_ms": round(response.timing.total_ms, 3),
        **({"next_page_token": response.next_page_token} if response.next_page_token else {}),
        **_rerank_json(response),
    }


def _rerank_json(response: pb.SearchDocumentsResponse) -> dict[str, Any]:
    """With rerank: the reranker version, rerank_ms and, per hit, the retrieval score and rank."""
    if not response.reranker_version:
        return {}
    return {"reranker_version": response.reranker_version, "rerank_ms": round(response.timing.rerank_ms, 3),
            "reranked": [{"id": h.id, "rerank_score": round(h.rerank_score, 6),
                          "retrieval_score": round(h.retrieval_score, 6), "retrieval_rank": h.retrieval_rank}
                         for h in response.hits]}


# `semsearch search` is a client: it calls --addr (SEMSEARCH_ADDR). Its --host/--port are flags
# only: SEMSEARCH_HOST/SEMSEARCH_PORT say where `serve` binds (0.0.0.0 in a pod), not what to call.
AddrOption = Annotated[str | None, typer.Option(
    "--addr", help="Service HOST:PORT (default 127.0.0.1:50051)" + env_hint("addr"), show_default=False)]
ClientHostOption = Annotated[str | None, typer.Option(
    "--host", help="Host of the service to call, with --port; --addr wins (no variable: SEMSEARCH_HOST is "
    "where serve binds)", show_default=False)]
ClientPortOption = Annotated[int | None, typer.Option(
    "--port", help="Port of the service to call (no variable: SEMSEARCH_PORT is where serve binds)",
    show_default=False)]
ApiKeyOption = Annotated[str | None, typer.Option(
    "--api-key", help="API key, sent as `authorization: Bearer <key>`; prefer the variable (a flag shows in ps)"
    + env_hint("api_key"), show_default=False)]
TlsCaOption = Annotated[Path | None, typer.Option(
    "--tls-ca-file", help="CA certificate(s) that signed the service's certificate; turns TLS on"
    + env_hint("tls_ca_file"))]
TlsClientCertOption = Annotated[Path | None, typer.Option(
    "--tls-client-cert-file", help="Client certificate for mutual TLS" + env_hint("tls_client_cert_file"))]
TlsClientKeyOption = Annotated[Path | None, typer.Option(
    "--tls-client-key-file", help="Private key of the client certificate" + env_hint("tls_client_key_file"))]
TlsServerNameOption = Annotated[str | None, typer.Option(
    "--tls-server-name", help="Name to verify in the service's certificate (default: the host you call)"
    + env_hint("tls_server_name"))]

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
LAST_ERROR = re.compile(r"last error: [A-Z_]+: (?:(?:ipv4|ipv6|unix):(?:\[[^\]]*\]|[^:\s]+)(?::\d+)?: )?(.*)$")


def client_target(settings: Settings, addr: str | None, host: str | None, port: int | None) -> str:
    """What `semsearch search` calls: --addr, else --host/--port, else SEMSEARCH_ADDR (or `addr` in the
    file), else the default service on loopback. Flags beat the variable, as for every setting."""
    if addr is None and (host is not None or port is not None):
        return f"{host or LOOPBACK[0]}:{port or Settings.model_fields['port'].default}"
    return settings.addr or f"{LOOPBACK[0]}:{Settings.model_fields['port'].default}"


def uses_tls(settings: Settings) -> bool:
    return bool(settings.tls_ca_file or settings.tls_client_cert_file or settings.tls_client_key_file)


TLS_SETTINGS = ("tls_ca_file", "tls_client_cert_file", "tls_client_key_file")


def open_client(settings: Settings, target: str, *, timeout: float) -> SearchClient:
    """The client `semsearch search` calls through: plaintext, TLS (--tls-ca-file) or mutual TLS.
    gRPC's retry policy retries UNAVAILABLE (a service still loading its model, a refused connection)
    and RESOURCE_EXHAUSTED (waiting what the service's grpc-retry-pushback-ms says) a few times
    within the deadline; what still fails is reported with what to do."""
    if not uses_tls(settings) and settings.api_key is not None and target.rsplit(":", 1)[0] not in LOOPBACK:
        typer.secho(f"warning: the API key goes to {target} in clear text; use TLS (--tls-ca-file)",
                    err=True, fg=typer.colors.YELLOW)
    try:
        return SearchClient.from_settings(settings, target, timeout=timeout)
    except TlsFileError as exc:
        message = str(exc)
        for name in TLS_SETTINGS:  # name the flags, as the user typed them
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise fail(message, EXIT_USAGE) from exc


def _refused(exc: grpc.RpcError) -> bool:
    return (isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE
            and "refused" in (exc.details() or "").lower())


def _search_unless_refused(settings: Settings, target: str, timeout: float,
                           request: pb.SearchDocumentsRequest) -> pb.SearchDocumentsResponse | grpc.RpcError:
    """The response, or the error of a refused connection; any other error is raised."""
    with open_client(settings, target, timeout=timeout) as client:
        try:
            return client.search(request)
        except grpc.RpcError as exc:
            if not _refused(exc):
                raise
            return exc


def search_reporting_the_answering_address(settings: Settings, target: str, timeout: float,
                                           request: pb.SearchDocumentsRequest) -> pb.SearchDocumentsResponse:
    """gRPC reports only the last address's error for a name with several (its resolver gives localhost
    as [::1] and 127.0.0.1). When that one refused the connection, each address the system resolver
    knows is asked on its own (TLS still checks the name), so that one that answered and hung up (a
    TLS mismatch) is what gets reported."""
    outcome = _search_unless_refused(settings, target, timeout, request)
    if not isinstance(outcome, grpc.RpcError):
        return outcome
    host, _, port = target.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        raise outcome from None
    addresses = dict.fromkeys(f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}"
                              for i in infos)
    if list(addresses) == [target]:  # an address already: nothing else to ask
        raise outcome
    by_name = settings.model_copy(update={"tls_server_name": settings.tls_server_name or host.strip("[]")})
    for address in addresses:
        answer = _search_unless_refused(by_name, address, timeout, request)
        if not isinstance(answer, grpc.RpcError):
            return answer
    raise outcome


def _describe_unavailable(details: str, target: str, settings: Settings) -> str:
    tls, client_cert = uses_tls(settings), settings.tls_client_cert_file is not None
    lowered = details.lower()
    # grpc says "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:H:P: <reason>".
    match = LAST_ERROR.search(details)
    reason = match.group(1) if match else details
    if "model is still loading" in lowered:
        return f"the service at {target} is still loading its model: try again shortly"
    if "dns" in lowered or "resolve" in lowered:
        return f"cannot resolve {target} ({reason}): fix --addr (HOST:PORT) or --host"
    # The port answered and hung up: a TLS mismatch (a plaintext call to a TLS port, an unknown CA,
    # a missing client certificate) looks like this from the client's side.
    if any(word in lowered for word in ("socket closed", "ssl", "tls", "handshake", "certificate", "verification")):
        if not tls:
            return (f"the service at {target} closed the connection ({reason}): if it uses TLS, pass "
                    "--tls-ca-file (plus --tls-client-cert-file/--tls-client-key-file for mutual TLS)")
        if "certificate_verify_failed" in lowered:
            return (f"TLS with {target} failed: the service's certificate is not signed by the CA in "
                    "--tls-ca-file: pass the CA that signed it")
        if "hostname verification" in lowered:
            name = settings.tls_server_name or target.rsplit(":", 1)[0]
            return (f"TLS with {target} failed: the service's certificate does not name {name}: call it by a "
                    "name in its certificate or pass that name with --tls-server-name")
        if not client_cert:
            return (f"TLS with {target} failed ({reason}): if the service requires mutual TLS pass "
                    "--tls-client-cert-file and --tls-client-key-file; else check --tls-ca-file (the CA "
                    "that signed the service's certificate) and --tls-server-name")
        return (f"TLS with {target} failed ({reason}): check --tls-ca-file (the CA that signed the "
                "service's certificate), --tls-server-name, and that the service's client CA signed "
                "--tls-client-cert-file")
    if "connect" in lowered or "refused" in lowered:
        return (f"cannot reach the service at {target} ({reason}): is `semsearch serve` running there? "
                "fix --addr, or --host/--port")
    return f"the service at {target} is unavailable ({reason}): check its health and logs"


def describe_rpc_error(exc: grpc.RpcError, target: str, settings: Settings, *, timeout: float) -> str:
    """One line that names what went wrong and what to do about it."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if "missing" in details.lower():
            return f"the service at {target} requires an API key: pass --api-key or set SEMSEARCH_API_KEY"
        return (f"the service at {target} refused the API key ({details}): "
                "check --api-key / SEMSEARCH_API_KEY")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"the service at {target} refused the call ({details}): use a key with the search scope"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {target} within {timeout:g} s: check the service's health or raise --timeout"
    if code == grpc.StatusCode.UNAVAILABLE:
        return _describe_unavailable(details, target, settings)
    return f"{code.name}: {details}"


def serve(
    config: ConfigOption = None, milvus_uri: MilvusUriOption = None, collection: CollectionOption = None,
    model: ModelOption = None, encoder_url: EncoderUrlOption = None, device: DeviceOption = None,
    host: HostOption = None, port: PortOption = None, log_level: LogLevelOption = None,
    encoder_backend: EncoderBackendOption = None,
    http_port: Annotated[int | None, typer.Option(
        "--http-port", help="Also serve the API as HTTP/JSON on this port (same host; 0 disables)"
        + env_hint("http_port"))] = None,
    reranker_model: Annotated[str | None, typer.Option(
        "--reranker-model", help="Cross-encoder for rerank requests (directory or hub id)"
        + env_hint("reranker_model"))] = None,
    reranker_url: Annotated[str | None, typer.Option(
        "--reranker-url", help="Rerank servers (TEI, infinity, vLLM, sglang), comma-separated"
        + env_hint("reranker_url"))] = None,
) -> None:
    """Run the gRPC search service (and HTTP/JSON with --http-port) until SIGTERM (then drain in-flight calls)."""
    from service.server import serve as run

    settings = settings_from_cli(config, milvus_uri=milvus_uri, collection=collection, model=model,
                                 encoder_url=encoder_url, device=device, host=host, port=port,
                                 log_level=log_level, encoder_backend=encoder_backend, http_port=http_port,
                                 reranker_model=reranker_model, reranker_url=reranker_url)
    try:
        asyncio.run(run(settings))
    except SemsearchError as exc:  # missing model, model/collection mismatch, Milvus down...
        raise fail(str(exc)) from exc
    except (OSError, ValueError) as exc:  # port taken, unreadable or inconsistent TLS files
        raise fail(f"cannot serve on {settings.host}:{settings.port}: {exc}") from exc

def search(
    query: Annotated[str, typer.Argument(help="The query text (no instruction: the service adds it)")],
    addr: AddrOption = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", help="How many hits (default: the service's default_top_k)", show_default=False)] = None,
    filters: Annotated[list[str] | None, typer.Option("--filter", help="field=value, field>=3 ... (ANDed)")] = None,
    chunks: Annotated[bool, typer.Option("--chunks", help="Return matching chunks, not documents")] = False,
    mode: Annotated[str | None, typer.Option(
        "--mode", help="dense, lexical (BM25) or hybrid (default: the service's retrieval_mode)")] = None,
    rerank: Annotated[bool, typer.Option("--rerank", help="Re-order the candidates with the service's reranker")]
    = False,
    rerank_candidates: Annotated[int, typer.Option(
        "--rerank-candidates", help="Candidates to rerank (0: the service's rerank_candidates)")] = 0,
    min_score: Annotated[float | None, typer.Option(
        "--min-score", help="Leave out hits scoring below this (the final score of the mode)",
        show_default=False)] = None,
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant to search (default: the default tenant)")]
    = "",
    page_size: Annotated[int, typer.Option(
        "--page-size", help="Page through the results this many at a time (prints next_page_token)")] = 0,
    page_token: Annotated[str, typer.Option(
        "--page-token", help="next_page_token of the previous page (same query and options)")] = "",
    highlight: Annotated[bool, typer.Option(
        "--highlight", help="Mark the query's words in each hit (--json: highlights and snippet)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Deadline in seconds")] = 30.0,
    config: ConfigOption = None, host: ClientHostOption = None, port: ClientPortOption = None,
    api_key: ApiKeyOption = None, tls_ca_file: TlsCaOption = None,
    tls_client_cert_file: TlsClientCertOption = None, tls_client_key_file: TlsClientKeyOption = None,
    tls_server_name: TlsServerNameOption = None,
) -> None:
    """Search a running service over gRPC (with an API key and TLS when the service requires them)."""
    settings = settings_from_cli(
        config, addr=addr, api_key=api_key, tls_ca_file=tls_ca_file,
        tls_client_cert_file=tls_client_cert_file, tls_client_key_file=tls_client_key_file,
        tls_server_name=tls_server_name,
    )
    target = client_target(settings, addr, host, port)
    if mode is not None and mode not in MODE_VALUES:
        raise fail(f"--mode {mode!r}: expected dense, lexical or hybrid", EXIT_USAGE)
    # top_k 0 asks for the service's default_top_k.
    request = pb.SearchDocumentsRequest(
        query=query, top_k=top_k or 0, filters=[parse_filter(f) for f in filters or []], return_chunks=chunks,
        mode=MODE_VALUES[mode] if mode else pb.RETRIEVAL_MODE_UNSPECIFIED, rerank=rerank,
        rerank_candidates=rerank_candidates, tenant=tenant, page_size=page_size, page_token=page_token,
        highlight=highlight,
    )
    if min_score is not None:
        request.min_score = min_score
    try:
        response = search_reporting_the_answering_address(settings, target, timeout, request)
    except grpc.RpcError as exc:
        raise fail(describe_rpc_error(exc, target, settings, timeout=timeout)) from exc
    if as_json:
        typer.echo(json.dumps(response_to_json(response), ensure_ascii=False))
    else:
        print_hits(query, response)

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


def register(app: typer.Typer) -> None:
    for command in (serve, search, demo):
        app.command()(command)
