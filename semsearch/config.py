"""Settings for every semsearch command: CLI flag > environment (SEMSEARCH_*) > config file > default."""

from __future__ import annotations

import difflib
import os
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from semsearch.filters import TENANT_PATTERN

DEFAULT_MODEL = "BAAI/bge-large-zh-v1.5"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "semsearch"


def default_milvus_uri() -> str:
    # Milvus Lite takes a local directory whose name ends in .db.
    return str(default_data_dir() / "milvus.db")


Scope = Literal["search", "write", "admin"]
# Each scope includes the ones before it.
SCOPE_ORDER: dict[str, int] = {"search": 0, "write": 1, "admin": 2}


class ApiKey(BaseModel):
    """One client credential: send it as `authorization: Bearer <key>` (or `x-api-key`)."""

    name: str
    key: SecretStr
    scope: Scope = "search"
    # Bound to these tenants: every call of the key reads and writes only them, whatever the
    # request says. Empty: any tenant (the key is not bound).
    tenants: list[str] = Field(default_factory=list)
    # Calls per second (a token bucket holding `rate_burst` calls); unset: unlimited.
    rate_limit_per_s: float | None = Field(default=None, gt=0)
    rate_burst: int | None = Field(default=None, ge=1)

    @field_validator("tenants")
    @classmethod
    def _tenants_are_names(cls, tenants: list[str]) -> list[str]:
        for tenant in tenants:
            if not TENANT_PATTERN.match(tenant):
                raise ValueError(f"tenant {tenant!r}: 1 to 63 letters, digits, '_' or '-', not empty")
        return tenants


class Settings(BaseSettings):
    """One flat namespace: the same name is the same setting in every command."""

    model_config = SettingsConfigDict(env_prefix="SEMSEARCH_", extra="ignore", protected_namespaces=())

    # Storage
    milvus_uri: str = Field(default_factory=default_milvus_uri)
    milvus_token: SecretStr | None = None
    collection: str = "semsearch"
    milvus_timeout_s: float = 10.0
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    search_ef: int = 128
    # Milvus Lite searches unflushed rows one by one: flush a collection once writes pause this
    # long (seconds; 0: only every 4096 rows and on close).
    lite_idle_flush_s: float = Field(default=2.0, ge=0.0)
    # Lexical (BM25) retrieval: Milvus tokenizes chunk text with this analyzer into a sparse field
    # of every new collection (Milvus Lite, Milvus >= 2.5). "jieba": Chinese words (search mode);
    # "jieba_exact": jieba's exact mode; "standard": Milvus' standard tokenizer; "none": no field.
    lexical_analyzer: Literal["jieba", "jieba_exact", "standard", "none"] = "jieba"
    lexical_user_dict: list[str] = Field(default_factory=list)  # extra words for jieba
    # Retrieval when a request leaves the mode unspecified (dense when the collection has no BM25).
    # "auto": the mode `semsearch train tune-fusion` chose for the collection, else hybrid with the
    # fusion below (dense where the collection has no BM25 field). A request's own mode always wins.
    retrieval_mode: Literal["auto", "dense", "lexical", "hybrid"] = "auto"
    # Hybrid's fusion where neither the request nor the collection's tuning names one. The default is
    # the safest measured without labels for a Chinese-capable model (semsearch/fusion.py SAFE_FUSION,
    # trainer/RESULTS.md): min-max, equal weights. rrf: weights relative; weighted / minmax / dbsf:
    # weighted sums of normalised scores.
    fusion: Literal["rrf", "weighted", "minmax", "dbsf"] = "minmax"
    rrf_k: int = Field(default=60, ge=1, le=10000)
    dense_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    lexical_weight: float = Field(default=0.5, ge=0.0, le=1.0)

    # Model and encoding
    model: str = DEFAULT_MODEL
    device: str = "auto"
    encoder_url: str | None = None  # comma-separated embedding servers (sglang/OpenAI-compatible)
    encoder_api_key: SecretStr | None = None  # bearer token (sglang --api-key)
    encoder_timeout_s: float = 10.0  # per HTTP request; a gRPC deadline bounds the whole call
    encoder_max_batch: int = 32  # texts per HTTP request
    encoder_concurrency: int = 4  # concurrent requests per server
    encoder_encoding_format: Literal["float", "base64"] = "base64"
    encoder_retries: int = 3  # on connection errors, timeouts, 408/429/5xx
    encoder_ca_file: str | None = None  # CA bundle for https encoder URLs
    encode_batch_size: int = 32
    torch_threads: int | None = None
    # In-process backend: torch; onnx (ONNX Runtime fp32 on CPU, same vectors and model version);
    # onnx-int8 (quantized: a model version of its own); auto (onnx on CPU when installed, else torch).
    # ONNX Runtime uses torch_threads threads per forward pass too.
    encoder_backend: Literal["torch", "onnx", "onnx-int8", "auto"] = "torch"
    onnx_cache_dir: Path | None = None  # exported graphs; default $XDG_CACHE_HOME/semsearch/onnx

    # Reranking: a cross-encoder re-orders the retrieved candidates of requests that ask for it.
    reranker_model: str | None = None  # local directory or hub id; unset: no reranker (rerank = FAILED_PRECONDITION)
    reranker_url: str | None = None  # rerank servers (TEI, infinity, vLLM, sglang), comma-separated; unset: in-process
    reranker_api_key: SecretStr | None = None
    # What scores vLLM/sglang answer with ("auto": sigmoid; TEI and infinity are asked for raw logits).
    reranker_server_activation: Literal["auto", "none", "sigmoid"] = "auto"
    reranker_batch_size: int = Field(default=32, ge=1)  # pairs per forward pass / passages per HTTP request
    rerank_candidates: int = Field(default=50, ge=1)  # candidates retrieved when a request leaves it 0
    max_rerank_candidates: int = Field(default=200, ge=1)  # a request asking for more: INVALID_ARGUMENT
    rerank_microbatch_max_pairs: int = Field(default=64, ge=1)  # pairs of concurrent requests scored together
    rerank_microbatch_max_wait_ms: float = 2.0

    # Service
    host: str = "127.0.0.1"
    port: int = 50051
    # HTTP/JSON gateway on the same host, in the same process (service/http_gateway.py); 0 or unset disables.
    http_port: int | None = None
    # Origins whose browser pages may call the HTTP API (CORS), e.g. ["https://app.example.com"];
    # empty: no CORS headers, so browsers refuse cross-origin calls. "*" allows any origin.
    http_cors_origins: list[str] = Field(default_factory=list)
    # Hostile or broken HTTP clients: a connection must send a request's head within
    # http_header_timeout_s (also while idle between keep-alive requests) and its whole body within
    # http_body_timeout_s (408 and closed otherwise); past http_max_connections open connections, a
    # new one is answered 503 and closed.
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    http_body_timeout_s: float = Field(default=60.0, gt=0)
    http_max_connections: int = Field(default=1000, ge=1)
    # The search console (a static page at GET / of the HTTP port, service/console.py); false for
    # locked-down deployments: then only the API routes answer.
    http_console: bool = True
    default_top_k: int = 10
    max_top_k: int = 100
    max_query_chars: int = 2048
    max_batch_queries: int = 64
    # Texts per Embed call (POST /v1/embeddings); more is INVALID_ARGUMENT naming `input`.
    max_embed_inputs: int = Field(default=256, ge=1)
    max_upsert_documents: int = 1000
    max_document_chars: int = 20000
    max_metadata_bytes: int = 16384
    max_filters: int = 16
    # Paging (page_size / page_token): how deep a client may page (offset + page size), at most
    # 16383 (Milvus' largest search limit is 16384); tokens are HMAC-signed and expire after
    # page_token_ttl_s. page_token_secrets: the first signs, every one verifies, so a secret rotates
    # without breaking tokens in flight (add the new one first, drop the old after the TTL);
    # page_token_secret is a list of one. Every replica needs the same list: unset, the key is derived
    # from the API keys (rotating a key then ends every token), or random per process when there are none.
    max_page_depth: int = Field(default=1000, ge=1, le=16383)
    page_token_secret: SecretStr | None = None
    page_token_secrets: list[SecretStr] = Field(default_factory=list)
    page_token_ttl_s: float = Field(default=3600.0, gt=0)
    microbatch_max_size: int = 32
    microbatch_max_wait_ms: float = 2.0
    microbatch_queue_size: int = 1024
    shutdown_grace_s: float = 10.0
    max_message_bytes: int = 16 * 1024 * 1024

    # Security: no keys configured means no authentication (loopback development only).
    api_keys: list[ApiKey] = Field(default_factory=list)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # set: clients must present a certificate (mutual TLS)

    # Client side (`semsearch search`): which service to call (HOST:PORT; unset: 127.0.0.1:50051;
    # never host/port, which are where `serve` binds), and how to reach one that requires a key or TLS.
    addr: str | None = None
    api_key: SecretStr | None = None  # sent as `authorization: Bearer <key>`
    tls_ca_file: Path | None = None  # CA bundle that signed the service's certificate; set: use TLS
    tls_client_cert_file: Path | None = None  # client certificate for mutual TLS
    tls_client_key_file: Path | None = None
    tls_server_name: str | None = None  # the name to check in the service's certificate (default: the host)

    # Model registry: the durable record of which (model, collection) pair serves `collection`
    use_registry: bool = True
    registry_poll_s: float = 5.0

    # Observability and health
    metrics_port: int | None = 9090  # Prometheus /metrics on host:metrics_port; 0 or unset disables
    health_probe_interval_s: float = 5.0
    log_level: str = "INFO"
    log_json: bool = False
    log_document_text: bool = False  # queries and document text stay out of logs unless enabled

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("SEMSEARCH_CONFIG")
        if config_file:
            sources.append(StrictYamlSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


class SettingsError(ValueError):
    """A settings file or value that cannot be used; the one-line message names the file (and line) or
    the setting, and where its value may come from."""


def read_config_file(path: Path | Traversable, fields: set[str]) -> dict[str, Any]:
    """The YAML settings file as a mapping, refusing what a typo produces: invalid YAML, a non-mapping,
    or a key that is no setting (pydantic would silently ignore it and the default would win)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SettingsError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path}: cannot read it ({exc})") from exc
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SettingsError(f"{where}: not valid YAML ({problem})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: must be a mapping of `setting: value` lines, not a {type(data).__name__}")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    for key in data:
        if key in fields:
            continue
        close = difflib.get_close_matches(str(key), sorted(fields), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "the settings are the fields of semsearch/config.py"
        where = f"{path}:{lines[key]}" if key in lines else str(path)
        raise SettingsError(f"{where}: unknown setting {key!r} ({hint})")
    return data


class StrictYamlSource(YamlConfigSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], yaml_file: str) -> None:
        self._fields = set(settings_cls.model_fields)  # _read_file runs inside the base __init__
        super().__init__(settings_cls, yaml_file=yaml_file)

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        return read_config_file(file_path, self._fields)


def describe_validation_error(exc: ValidationError, config_file: str | None) -> str:
    """One line per bad setting, naming where such a value can come from."""
    problems = []
    for error in exc.errors(include_url=False):
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        field = str(error["loc"][0]) if error["loc"] else ""
        sources = f"a flag or SEMSEARCH_{field.upper()}"
        if config_file:
            sources = f"a flag, SEMSEARCH_{field.upper()} or {config_file}"
        got = error.get("input")
        shown = "" if isinstance(got, dict) or error["type"] == "missing" else f", got {str(got)[:60]!r}"
        problems.append(f"setting {name}: {error['msg']}{shown} (set by {sources})")
    return "; ".join(problems)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; `overrides` are CLI flags, and None means 'not given on the command line'.
    Raises SettingsError (a ValueError) with a one-line message for a bad file or value."""
    if config_file is not None:
        if not config_file.exists():
            raise SettingsError(f"config file not found: {config_file}")
        os.environ["SEMSEARCH_CONFIG"] = str(config_file)
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, os.environ.get("SEMSEARCH_CONFIG"))) from exc
