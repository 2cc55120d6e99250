"""What an HTTP answer from an embedding server means for the client: retry, fail over, or give up."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any


class Verdict(Enum):
    OK = "ok"
    # Alive but busy (429): retry, maybe elsewhere, without counting against its circuit.
    BUSY = "busy"
    # The server failed (408, 5xx): retry elsewhere and count it against its circuit.
    FAILING = "failing"
    # 401/403: our key is wrong; retrying will not help.
    UNAUTHORIZED = "unauthorized"
    # 404/405: no such endpoint (another layout, not an embeddings server, unknown model name).
    NOT_FOUND = "not_found"
    # Any other 4xx: the input is what the server refused (over-long text...): the caller's error.
    REJECTED = "rejected"


def classify_status(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.OK
    if status == 429:
        return Verdict.BUSY
    if status == 408 or status >= 500:
        return Verdict.FAILING
    if status in (401, 403):
        return Verdict.UNAUTHORIZED
    if status in (404, 405):
        return Verdict.NOT_FOUND
    return Verdict.REJECTED


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from model servers, and our backoff covers it


def error_message(body: Any, text: str, reason: str, limit: int = 300) -> str:
    """The server's reason: OpenAI-style {"message"} / {"error": {"message"}} / {"error": "..."}, or
    FastAPI's {"detail": "..." | [{"msg"}...]} (infinity); else the raw text. `body` is the parsed
    JSON, or None when the body is not JSON."""
    if body is None:
        return text[:limit] or reason
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:limit]
        if body.get("message"):
            return str(body["message"])[:limit]
        if isinstance(error, str):
            return error[:limit]
        detail = body.get("detail")
        if isinstance(detail, str):
            return detail[:limit]
        if isinstance(detail, list) and detail:
            messages = [str(item.get("msg")) for item in detail if isinstance(item, dict) and item.get("msg")]
            if messages:
                return "; ".join(messages)[:limit]
    return str(body)[:limit]
