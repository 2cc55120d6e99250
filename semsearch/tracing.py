"""Optional OpenTelemetry spans: real spans when opentelemetry-api is installed (and an SDK is
configured by the deployment), no-ops otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

try:
    from opentelemetry import trace as _trace

    _tracer: Any = _trace.get_tracer("semsearch")
except ImportError:  # tracing is optional
    _tracer = None


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield
