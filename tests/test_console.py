"""The search console (GET / of the HTTP gateway) in a real headless browser: Debian's chromium driven
by Playwright against a live service on loopback. One browser for the module; screenshots go to
test-artifacts/console/ (git-ignored)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright
from starlette.testclient import TestClient

from semsearch.config import ApiKey, Settings
from semsearch.encoders import TorchEncoder
from service.console import CONSOLE_FILES, CONTENT_SECURITY_POLICY
from service.http_gateway import HttpServer
from tests.conftest import LiveService, free_port

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "console"
CONSOLE_DIR = REPO / "service" / "console"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READ_KEY = "console-read-key-0123456789"
ADMIN_KEY = "console-admin-key-0123456789"
KEYS = [ApiKey(name="reader", key=READ_KEY, scope="search"),  # type: ignore[arg-type]
        ApiKey(name="admin", key=ADMIN_KEY, scope="admin")]  # type: ignore[arg-type]
HOSTILE = "<img src=x onerror=alert(1)>"
DOCS = [{"id": "refund", "text": "如何申请退款？退款会在三天内原路返回。", "metadata": {"category": "refund"}},
        {"id": "invoice", "text": "发票抬头写错能改吗", "metadata": {"category": "invoice"}},
        {"id": "parcel", "text": "快递包裹几天没动静", "metadata": {"category": "parcel"}},
        {"id": "hostile", "text": HOSTILE, "metadata": {"category": "<script>alert(2)</script>"}}]
RERANKED_ANSWER = {
    "hits": [{"id": "x", "score": 0.9, "text": "𠀀退款要三天", "metadata": {}, "chunkIndex": 0, "retrievalScore": 0.5,
              "rerankScore": 0.9, "retrievalRank": 3, "highlights": [{"start": 1, "end": 3}, {"start": 4, "end": 6}],
              "retrievers": [{"retriever": "RETRIEVAL_MODE_DENSE", "score": 0.5, "rank": 3}]}],
    "modelVersion": "m", "collection": "c", "mode": "RETRIEVAL_MODE_DENSE", "rerankerVersion": "r",
    "timing": {"totalMs": 10, "encodeMs": 2, "storeMs": 3, "rerankMs": 4}, "nextPageToken": ""}


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    if not CHROMIUM.exists():
        pytest.fail("/usr/bin/chromium is missing: run scripts/setup.sh (apt-get install chromium)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS, headless=True, viewport={"width": 1400, "height": 900})
        yield context
        context.close()


class PageLog:
    """What the page said that a user would not see: console errors, uncaught exceptions, dialogs."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def search(page: Page) -> None:
    page.click("#search-button")
    expect(page.locator("#search-button")).to_be_enabled()


@pytest.fixture
def console_service(make_service: Callable[..., LiveService], tiny_encoder: TorchEncoder) -> LiveService:
    service = make_service(tiny_encoder, http_port=free_port(), api_keys=KEYS)
    with httpx.Client(base_url=f"http://127.0.0.1:{service.running.http_port}", timeout=60) as http:
        upserted = http.post("/v1/documents:upsert", json={"documents": DOCS},
                             headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert upserted.status_code == 200, upserted.text
    return service


def test_console_searches_compares_and_shows_errors(console_service: LiveService,
                                                     browser_context: BrowserContext) -> None:
    page = browser_context.new_page()
    log = PageLog(page)
    page.goto(f"http://127.0.0.1:{console_service.running.http_port}/")
    expect(page.locator("#health")).to_have_text("SERVING")

    # A query: every hit shown, the words it shares with the query marked.
    page.fill("#api-key", READ_KEY)
    page.fill("#query", "如何申请退款")
    page.select_option("#settings-a select[name=mode]", "RETRIEVAL_MODE_DENSE")
    search(page)
    expect(page.locator("#results .hit")).to_have_count(len(DOCS))
    refund = page.locator('#results .hit[data-id="refund"]')
    # The service's highlights where it has them (its OpenAPI document lists `highlight`), else the page's.
    source = "server" if '"highlight"' in (REPO / "service" / "openapi.json").read_text(encoding="utf-8") else "client"
    expect(refund.locator(f"mark.{source}")).to_have_text(["如何申请退款", "退款"])
    expect(refund.locator(".retriever")).to_have_text(re.compile(r"^dense -?\d\.\d{4} \(#\d\)$"))
    expect(page.locator("#results .timing-legend")).to_contain_text("encode")

    # Hostile document text and metadata are shown as text: no element made of them, no dialog.
    hostile = page.locator('#results .hit[data-id="hostile"]')
    expect(hostile.locator(".text")).to_have_text(HOSTILE)
    expect(hostile.locator(".meta")).to_have_text("category=<script>alert(2)</script>")
    assert page.locator("#results img, #results script").count() == 0
    shot(page, "search")

    # Side by side: dense (A) against hybrid (B), each hit marked with how it moved.
    page.check("#compare")
    search(page)
    expect(page.locator("#results .column")).to_have_count(2)
    expect(page.locator('#results .column[data-label="B"] h3')).to_contain_text("hybrid")
    expect(page.locator("#results .hit .moved")).to_have_count(2 * len(DOCS))
    shot(page, "compare")

    # The collection panel needs the admin scope: a search key is refused with the service's words.
    page.click("#refresh-collection")
    expect(page.locator("#collection-note")).to_contain_text("403 PERMISSION_DENIED")
    log.errors = [error for error in log.errors if "403" not in error]  # chromium logs the refused fetch
    page.fill("#api-key", ADMIN_KEY)
    page.click("#refresh-collection")
    expect(page.locator("#collection-facts")).to_contain_text("current.modelVersion")
    facts = page.locator("#collection-facts")
    expect(facts.locator("dt:text-is('documents') + dd")).to_have_text(str(len(DOCS)))
    expect(facts.locator("dt:text-is('metadata fields') + dd")).to_have_text("category")
    expect(page.locator("#collection-history li").first).to_contain_text("bootstrap")  # the registry's history
    expect(page.locator("#collection-note")).to_have_text("")
    assert page.locator("#metadata-fields option[value=category]").count() == 1  # offered in the filter editor
    shot(page, "collection")
    assert log.errors == [] and log.dialogs == []

    # What a service with highlights and a reranker answers: its character offsets (code points: the
    # first character is outside the BMP) are marked, and the rerank movement is shown.
    page.uncheck("#compare")
    page.route("**/v1/search", lambda route: route.fulfill(json=RERANKED_ANSWER))
    search(page)
    expect(page.locator("#results mark.server")).to_have_text(["退款", "三天"])
    expect(page.locator("#results .rerank")).to_have_text(["rerank 0.9000 · retrieval 0.5000 #3 → #1 (↑2)"])
    page.unroute("**/v1/search")

    # Failures say what went wrong: a bad filter before sending, the service's 400, a wrong key's
    # 401, an unreachable service.
    page.click("#add-filter")
    search(page)
    expect(page.locator("#message")).to_have_text("bad input: filter 1: the field is empty")
    page.fill("#filters .field", "no-such-field!")
    page.fill("#filters .value", "x")
    search(page)
    expect(page.locator("#message")).to_contain_text("400 INVALID_ARGUMENT")
    expect(page.locator("#message")).to_contain_text("no-such-field!")
    page.click("#filters .remove")

    page.fill("#api-key", "wrong-key")
    search(page)
    expect(page.locator("#message")).to_have_text("401 UNAUTHENTICATED: invalid API key")
    expect(page.locator("#results .hit")).to_have_count(0)
    shot(page, "wrong-key")

    page.route("**/v1/search", lambda route: route.abort("connectionrefused"))
    search(page)
    expect(page.locator("#message")).to_contain_text("is unreachable")
    shot(page, "unreachable")
    assert log.dialogs == []
    page.close()


def test_console_headers_files_and_off_switch(console_service: LiveService) -> None:
    base = f"http://127.0.0.1:{console_service.running.http_port}"
    with httpx.Client(base_url=base, timeout=30) as http:
        for path, (_, media_type) in CONSOLE_FILES.items():
            answer = http.get(path)  # no key: the page is public, the API it calls is not
            assert answer.status_code == 200, (path, answer.text)
            assert answer.headers["content-type"] == media_type
            assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert answer.headers["x-content-type-options"] == "nosniff"
        assert http.post("/v1/search", json={"query": "退款"}).status_code == 401

    # Nothing the CSP would have to allow: no inline script, style or handler; no HTML sinks in the script.
    html = (CONSOLE_DIR / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="console/app.js" defer>']
    assert not re.search(r"\son\w+\s*=|\sstyle\s*=|<style|https?://", html)
    script = (CONSOLE_DIR / "app.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", script)

    # Switched off (http_console=false): the API answers, the console's paths are 404.
    gateway = HttpServer(Settings(http_port=free_port(), http_console=False), "unix:/nonexistent.sock").gateway
    with TestClient(gateway.app) as client:
        for path in CONSOLE_FILES:
            assert client.get(path).status_code == 404
        assert client.get("/openapi.json").status_code == 200
