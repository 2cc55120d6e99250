"""The search console: a static page at `GET /` of the HTTP gateway (service/console/).

The page is plain HTML/CSS/JS shipped in the package, read once when the gateway is built and served
from memory; it calls the gateway's own JSON routes with the key the user types, so it has exactly
the API's auth and adds nothing to a search that does not come from it. The Content-Security-Policy
allows scripts, styles, images and requests from this origin only (no inline script or style, no
frames, no form posts), and the script writes document text with `textContent` only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # The files change only with the package; revalidating is cheap and never serves a stale script.
    "Cache-Control": "no-cache",
}
# URL path → (file in service/console/, media type).
CONSOLE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/console/style.css": ("style.css", "text/css; charset=utf-8"),
    "/console/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


def static_endpoint(body: bytes, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    # A plain function: starlette treats any other callable as a raw ASGI app.
    async def endpoint(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return endpoint


def console_routes() -> list[Route]:
    """The console's routes, its files read now (a missing file fails at start, not at first view)."""
    folder = resources.files("service") / "console"
    return [Route(path, static_endpoint((folder / name).read_bytes(), media_type), methods=["GET"],
                  name=f"console:{name}")
            for path, (name, media_type) in CONSOLE_FILES.items()]
