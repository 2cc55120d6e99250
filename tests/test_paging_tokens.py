"""Page tokens without a service: signatures, expiry, and a secret replicas can share."""

from __future__ import annotations

import pytest

from semsearch.config import Settings
from semsearch.errors import InvalidInputError
from semsearch.v1 import search_pb2 as pb
from service.paging import Cursor, PageTokens, binding, page_secret


def test_replicas_with_the_same_keys_or_secret_accept_each_others_tokens() -> None:
    keys = [{"name": "web", "key": "k" * 32}]
    one, two = Settings(api_keys=keys), Settings(api_keys=keys)  # type: ignore[arg-type]
    other = Settings(api_keys=[{"name": "web", "key": "z" * 32}])  # type: ignore[list-item]
    bound = binding(pb.SearchDocumentsRequest(query="退款"), "")
    token = PageTokens(page_secret(one), 60).issue(bound, Cursor(10, "v1", "c1"))
    assert PageTokens(page_secret(two), 60).open(token, bound) == Cursor(10, "v1", "c1")
    with pytest.raises(InvalidInputError, match="not a page token of this service"):
        PageTokens(page_secret(other), 60).open(token, bound)
    configured = Settings(page_token_secret="s" * 32)  # type: ignore[arg-type]
    assert page_secret(configured) == page_secret(Settings(page_token_secret="s" * 32))  # type: ignore[arg-type]
    # No keys and no secret: random per process, so two "replicas" disagree.
    assert page_secret(Settings()) != page_secret(Settings())


def test_tokens_expire_and_bind_paging_fields_out() -> None:
    request = pb.SearchDocumentsRequest(query="退款", page_size=5, page_token="x")
    assert binding(request, "acme") == binding(pb.SearchDocumentsRequest(query="退款", page_size=9), "acme")
    assert binding(request, "acme") != binding(request, "beta")
    assert binding(request, "") != binding(pb.SearchDocumentsRequest(query="退款", min_score=0.5), "")
    expired = PageTokens(b"secret", -1).issue("b", Cursor(1, "v", "c"))
    with pytest.raises(InvalidInputError, match="expired"):
        PageTokens(b"secret", -1).open(expired, "b")
