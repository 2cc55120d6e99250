"""Remote encoder settings: defaults, server URLs, and the options read from `Settings`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx
from pydantic import SecretStr

if TYPE_CHECKING:
    from semsearch.config import Settings

EncodingFormat = Literal["float", "base64"]

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BATCH = 32
DEFAULT_CONCURRENCY = 4
DEFAULT_RETRIES = 3
# Asking for base64 is safe everywhere: sglang <= 0.5.x ignores the field and answers floats (which
# we decode too); newer sglang, vLLM, TEI and infinity answer 4x smaller bodies that decode ~20x faster.
DEFAULT_ENCODING_FORMAT: EncodingFormat = "base64"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# health(): without an answer this recent, a server is probed (its identity endpoint) before
# the client says it is healthy; under traffic, requests are the evidence and nothing is sent.
HEALTH_FRESH_S = 2.0


@dataclass(frozen=True)
class Transport:
    """How a client talks to its model servers: one object for the remote encoder and the remote
    reranker alike (credentials, TLS, time limits, concurrency, retries, circuit breaker)."""

    api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = DEFAULT_RETRIES
    ca_file: str | None = None
    failure_threshold: int = 3
    reset_s: float = 5.0
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    identity_recheck_s: float = 30.0
    health_fresh_s: float = HEALTH_FRESH_S
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.retries < 0 or self.timeout_s <= 0:
            raise ValueError("concurrency must be >= 1, retries >= 0, timeout_s > 0")


def with_transport(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Flat keyword arguments (`retries=1, max_batch=8`) with the transport's own folded into one
    `Transport`: for tests and benchmarks that vary one knob at a time."""
    names = {f.name for f in fields(Transport)}
    rest = {k: v for k, v in kwargs.items() if k not in names}
    return rest | {"transport": Transport(**{k: v for k, v in kwargs.items() if k in names})}


def normalize_base_url(url: str) -> str:
    """`http://host:30000`, `http://host:30000/` and the OpenAI-style `.../v1` all mean one server.

    A path is kept (`http://gateway/embed/bge`: a server behind a path-routing proxy); whether the
    API lives under `/v1` (sglang, vLLM, TEI) or at the root (infinity) is found out by probing."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"encoder URL must be http(s)://host[:port][/path], got {url!r}")
    return url


def parse_encoder_urls(value: str) -> list[str]:
    """`--encoder-url`: comma-separated servers, each named once."""
    urls = [normalize_base_url(part) for part in value.split(",") if part.strip()]
    if not urls:
        raise ValueError("--encoder-url is set but names no server")
    if len(set(urls)) != len(urls):
        raise ValueError(f"--encoder-url names a server twice: {value!r}")
    return urls


def check_limits(*, encoding_format: str, max_batch: int) -> None:
    if encoding_format not in ("float", "base64"):
        raise ValueError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}")
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")


def plain_http_remote_urls(urls: list[str]) -> list[str]:
    """Servers an API key would reach in clear text (plain http beyond loopback)."""
    out = []
    for url in urls:
        parsed = httpx.URL(url)
        if parsed.scheme == "http" and parsed.host not in LOOPBACK_HOSTS:
            out.append(url)
    return out


@dataclass(frozen=True)
class RemoteOptions:
    """What `RemoteEncoder` takes from `Settings`."""

    urls: list[str]
    model_ref: str
    max_batch: int
    encoding_format: EncodingFormat
    transport: Transport


def options_from_settings(settings: Settings) -> RemoteOptions:
    """Settings: encoder_url (comma-separated), encoder_api_key, encoder_timeout_s,
    encoder_max_batch, encoder_concurrency, encoder_encoding_format, encoder_retries,
    encoder_ca_file; read with defaults so that older Settings without them still work."""
    if not settings.encoder_url:
        raise ValueError("RemoteEncoder.from_settings needs settings.encoder_url")

    def setting(name: str, default: Any) -> Any:
        value = getattr(settings, name, None)
        return default if value is None else value

    api_key = setting("encoder_api_key", None)
    if isinstance(api_key, SecretStr):
        api_key = api_key.get_secret_value()
    return RemoteOptions(
        urls=parse_encoder_urls(settings.encoder_url),
        model_ref=settings.model,
        max_batch=int(setting("encoder_max_batch", DEFAULT_MAX_BATCH)),
        encoding_format=cast(EncodingFormat, setting("encoder_encoding_format", DEFAULT_ENCODING_FORMAT)),
        transport=Transport(
            api_key=api_key or None,
            timeout_s=float(setting("encoder_timeout_s", DEFAULT_TIMEOUT_S)),
            concurrency=int(setting("encoder_concurrency", DEFAULT_CONCURRENCY)),
            retries=int(setting("encoder_retries", DEFAULT_RETRIES)),
            ca_file=setting("encoder_ca_file", None),
        ),
    )
