"""Page tokens without a service: signatures, expiry, and a secret replicas can share."""

from __future__ import annotations

import pytest

from semsearch.config import Settings
from semsearch.errors import InvalidInputError
from semsearch.fusion import Fusion
from semsearch.v1 import search_pb2 as pb
from service.paging import Cursor, PageTokens, binding, page_secrets


def test_replicas_with_the_same_keys_or_secret_accept_each_others_tokens() -> None:
    keys = [{"name": "web", "key": "k" * 32}]
    one, two = Settings(api_keys=keys), Settings(api_keys=keys)  # type: ignore[arg-type]
    other = Settings(api_keys=[{"name": "web", "key": "z" * 32}])  # type: ignore[list-item]
    bound = binding(pb.SearchDocumentsRequest(query="退款"), "")
    token = PageTokens(page_secrets(one), 60).issue(bound, Cursor(10, "v1", "c1"))
    assert PageTokens(page_secrets(two), 60).open(token, bound) == Cursor(10, "v1", "c1")
    with pytest.raises(InvalidInputError, match="not a page token of this service"):
        PageTokens(page_secrets(other), 60).open(token, bound)
    configured = Settings(page_token_secret="s" * 32)  # type: ignore[arg-type]
    assert page_secrets(configured) == page_secrets(Settings(page_token_secret="s" * 32))  # type: ignore[arg-type]
    # No keys and no secret: random per process, so two "replicas" disagree.
    assert page_secrets(Settings()) != page_secrets(Settings())


def test_tokens_expire_and_bind_paging_fields_out() -> None:
    request = pb.SearchDocumentsRequest(query="退款", page_size=5, page_token="x")
    assert binding(request, "acme") == binding(pb.SearchDocumentsRequest(query="退款", page_size=9), "acme")
    assert binding(request, "acme") != binding(request, "beta")
    assert binding(request, "") != binding(pb.SearchDocumentsRequest(query="退款", min_score=0.5), "")
    expired = PageTokens(b"secret", -1).issue("b", Cursor(1, "v", "c"))
    with pytest.raises(InvalidInputError, match="expired"):
        PageTokens(b"secret", -1).open(expired, "b")


def test_secrets_rotate_without_breaking_tokens_in_flight() -> None:
    """The first of page_token_secrets signs and all verify: add the new secret first (replicas
    still on the old list keep working), then drop the old one once its tokens have expired."""
    bound = binding(pb.SearchDocumentsRequest(query="退款"), "")
    old = Settings(page_token_secret="old" * 11)  # type: ignore[arg-type]
    rotated = Settings(page_token_secrets=["new" * 11, "old" * 11])  # type: ignore[list-item]
    token = PageTokens(page_secrets(old), 60).issue(bound, Cursor(10, "v1", "c1"))
    assert PageTokens(page_secrets(rotated), 60).open(token, bound) == Cursor(10, "v1", "c1")
    # The rotated service signs with the new secret, which the old list does not know yet.
    fresh = PageTokens(page_secrets(rotated), 60).issue(bound, Cursor(20, "v1", "c1"))
    assert PageTokens(page_secrets(Settings(page_token_secrets=["new" * 11])), 60).open(  # type: ignore[list-item]
        fresh, bound) == Cursor(20, "v1", "c1")
    with pytest.raises(InvalidInputError, match="not a page token of this service"):
        PageTokens(page_secrets(old), 60).open(fresh, bound)
    unknown = PageTokens(b"never configured", 60).issue(bound, Cursor(10, "v1", "c1"))
    with pytest.raises(InvalidInputError, match="not a page token of this service"):
        PageTokens(page_secrets(rotated), 60).open(unknown, bound)
    # API keys rotate freely once the secrets are set: the keys no longer feed the HMAC key.
    keys_before = Settings(page_token_secrets=["s" * 32], api_keys=[{"name": "a", "key": "a" * 32}])  # type: ignore
    keys_after = Settings(page_token_secrets=["s" * 32], api_keys=[{"name": "b", "key": "b" * 32}])  # type: ignore
    token = PageTokens(page_secrets(keys_before), 60).issue(bound, Cursor(5, "v1", "c1"))
    assert PageTokens(page_secrets(keys_after), 60).open(token, bound) == Cursor(5, "v1", "c1")


def test_page_token_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMSEARCH_PAGE_TOKEN_SECRETS", '["new-secret", "old-secret"]')
    assert page_secrets(Settings()) == [b"new-secret", b"old-secret"]


def test_a_token_carries_what_ranked_the_first_page() -> None:
    """Later pages rank as the first did: its mode, fusion and hybrid candidate pool travel in the token."""
    bound = binding(pb.SearchDocumentsRequest(query="退款"), "")
    cursor = Cursor(10, "v1", "c1", mode="hybrid", fusion=Fusion(method="weighted", dense_weight=0.2,
                                                                  lexical_weight=0.8), pool_depth=1000)
    tokens = PageTokens(b"secret", 60)
    assert tokens.open(tokens.issue(bound, cursor), bound) == cursor
