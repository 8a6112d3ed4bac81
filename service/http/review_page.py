"""The review page (/review): static files served by the service itself, no build step, no CDN.

The page holds no data: everything it shows comes from /v1 with the caller's bearer token, so it
needs no authentication of its own. A strict Content-Security-Policy keeps the page to its own
scripts (the token lives in the page's sessionStorage). With ``UGA_OIDC_CLIENT_ID`` the page also
signs people in with their hospital account (authorization code with PKCE, a public client):
``/review/config.json`` tells it where, and the policy lets it reach that token endpoint alone.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from service.config import Settings

STATIC = Path(__file__).resolve().parent / "static" / "review"
POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; connect-src 'self'{idp}; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)


def page_headers(token_url: str | None = None) -> dict[bytes, bytes]:
    """Security and caching headers; ``token_url``'s origin is the one other place the page may call."""
    idp = ""
    if token_url:
        url = urlsplit(token_url)
        idp = f" {url.scheme}://{url.netloc}"
    return {
        b"content-security-policy": POLICY.format(idp=idp).encode(),
        b"x-content-type-options": b"nosniff",
        b"x-frame-options": b"DENY",  # frame-ancestors 'none' for browsers that ignore CSP (IE mode)
        b"referrer-policy": b"no-referrer",
        b"cache-control": b"no-cache",  # revalidate: a new release's page is used at once
    }


def sign_in_config(settings: Settings) -> dict | None:
    """What the page needs for the hospital sign-in (None: tokens only)."""
    if not settings.oidc_client_id:
        return None
    return {
        "client_id": settings.oidc_client_id,
        "authorize_url": settings.oidc_authorize_url,
        "token_url": settings.oidc_token_url,
        "scope": settings.oidc_scope,
        "token": settings.oidc_page_token,
    }


class SecurityHeaders:
    """ASGI middleware: the page's security and caching headers on every response."""

    def __init__(self, app, headers: dict[bytes, bytes]):
        self.app, self.headers = app, headers

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers.items() if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_review_app(sign_in: dict | None = None) -> Starlette:
    """The page's files (index.html for the folder itself; the host app redirects /review to /review/)
    and ``config.json``: the hospital sign-in, or null."""

    async def config(_: Request) -> JSONResponse:
        return JSONResponse({"oidc": sign_in})

    routes = [Route("/config.json", config), Mount("/", StaticFiles(directory=STATIC, html=True, follow_symlink=False))]
    app = Starlette(routes=routes)
    app.add_middleware(SecurityHeaders, headers=page_headers(sign_in["token_url"] if sign_in else None))
    return app
