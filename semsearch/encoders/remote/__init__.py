"""Remote encoder: OpenAI-compatible embedding servers over HTTP (sglang on GPUs in production;
TEI, vLLM and infinity speak the same protocol).

One concern per module:

| module | concern |
|---|---|
| `config.py` | defaults, `--encoder-url` parsing, the options read from `Settings` |
| `breaker.py` | the per-server circuit breaker |
| `identity.py` | what a server serves, where its embeddings endpoint is, may it serve our manifest |
| `servers.py` | per-server state (slots, pinned identity, quarantine) and server selection |
| `retry.py` | retries with jittered exponential backoff (tenacity) within the caller's deadline |
| `status.py` | what an HTTP status means: retry, fail over, the caller's error, a wrong key |
| `payload.py` | the wire format: request body, answer decoding (float or base64), norms (pure functions) |
| `client.py` | `RemoteEncoder`, which ties them together behind the `Encoder` protocol |
"""

from semsearch.encoders.remote.breaker import BreakerState, CircuitBreaker
from semsearch.encoders.remote.client import RemoteEncoder, RemoteStats, approximate_token_count
from semsearch.encoders.remote.config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_ENCODING_FORMAT,
    DEFAULT_MAX_BATCH,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    EncodingFormat,
    normalize_base_url,
    parse_encoder_urls,
)
from semsearch.encoders.remote.identity import ServerIdentity

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_ENCODING_FORMAT",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "BreakerState",
    "CircuitBreaker",
    "EncodingFormat",
    "RemoteEncoder",
    "RemoteStats",
    "ServerIdentity",
    "approximate_token_count",
    "normalize_base_url",
    "parse_encoder_urls",
]
