"""The review page (/review): static files served by the service itself, no build step, no CDN.

The page holds no data: everything it shows comes from /v1 with the caller's bearer token, so it
needs no authentication of its own. A strict Content-Security-Policy keeps the page to its own
scripts (the token lives in the page's sessionStorage).
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static" / "review"
HEADERS = {
    b"content-security-policy": b"default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",  # revalidate: a new release's page is used at once
}


class SecurityHeaders:
    """ASGI middleware: the page's security and caching headers on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in HEADERS.items() if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_review_app() -> Starlette:
    """The page's files (index.html for the folder itself; the host app redirects /review to /review/)."""
    app = Starlette(routes=[Mount("/", StaticFiles(directory=STATIC, html=True, follow_symlink=False))])
    app.add_middleware(SecurityHeaders)
    return app
