"""Remote encoder settings: defaults, server URLs, and the options read from `Settings`."""

from __future__ import annotations

from dataclasses import dataclass
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


def check_limits(*, encoding_format: str, max_batch: int, concurrency: int, retries: int, timeout_s: float) -> None:
    if encoding_format not in ("float", "base64"):
        raise ValueError(f"encoding_format must be 'float' or 'base64', got {encoding_format!r}")
    if max_batch < 1 or concurrency < 1 or retries < 0 or timeout_s <= 0:
        raise ValueError("max_batch and concurrency must be >= 1, retries >= 0, timeout_s > 0")


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
    api_key: str | None
    timeout_s: float
    max_batch: int
    concurrency: int
    encoding_format: EncodingFormat
    retries: int
    ca_file: str | None


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
        api_key=api_key or None,
        timeout_s=float(setting("encoder_timeout_s", DEFAULT_TIMEOUT_S)),
        max_batch=int(setting("encoder_max_batch", DEFAULT_MAX_BATCH)),
        concurrency=int(setting("encoder_concurrency", DEFAULT_CONCURRENCY)),
        encoding_format=cast(EncodingFormat, setting("encoder_encoding_format", DEFAULT_ENCODING_FORMAT)),
        retries=int(setting("encoder_retries", DEFAULT_RETRIES)),
        ca_file=setting("encoder_ca_file", None),
    )
