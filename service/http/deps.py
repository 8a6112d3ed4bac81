"""Who may do what, decided before any body is read; and what routers need from a request.

``AuthFirst`` (ASGI middleware) finds the route a request is for, and when the route requires a role
(a ``Viewer``/``Annotator``/``Admin`` parameter) authenticates and authorises the caller from the
headers alone: a refused caller gets its 401/403 without one byte of the body being received,
parsed or decoded. The route's dependency then reads the principal the middleware stored.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.routing import Match

from service.config import LOOPBACK
from service.http.auth import AuthFailure, Principal
from service.http.errors import HttpError, error_response
from service.http.runtime import Runtime

PRINCIPAL = "uga_principal"  # key in the ASGI scope's state
HEADERS_READ = (b"authorization", b"host", b"origin")  # all that is read of a request before it is allowed


def runtime_of(app) -> Runtime:
    rt = getattr(app.state, "uga", None)
    if rt is None:
        raise HttpError(503, "not_ready", "service is starting; retry shortly")
    return rt


def runtime(request: Request) -> Runtime:
    return runtime_of(request.app)


def authorise(rt: Runtime, authorization: str | None, role: str, host: str | None, origin: str | None) -> Principal:
    """The caller's principal if it holds ``role``; HttpError (401 / 403 / 503) otherwise."""
    if rt.auth.disabled:
        check_local_caller(host, origin)
    try:
        principal = rt.auth.authenticate(authorization)
    except AuthFailure as exc:  # a refused JWT (401), no mapped role (403), keys unreachable (503)
        raise HttpError(exc.status, exc.code, exc.message) from None
    if principal is None:
        raise HttpError(401, "unauthenticated", "missing or unknown bearer token (Authorization: Bearer <token>)")
    if not principal.allows(role):
        raise HttpError(403, "forbidden", f"this action needs the {role} role; your token has {principal.role}")
    return principal


def check_local_caller(host: str | None, origin: str | None) -> None:
    """With authentication off every caller is admin, so only this machine may call: a request must
    name a loopback host (no DNS rebinding; HTTP/1.0 without Host is refused too) and, when a browser
    sends an origin, come from this very origin (no request from a page the user happens to visit,
    nor from another local server's page)."""
    if _hostname(host) not in LOOPBACK:
        raise HttpError(403, "not_local", "authentication is off (UGA_AUTH_DISABLED): only 127.0.0.1 may call")
    if origin is not None and urlsplit(origin).netloc.lower() != (host or "").lower():
        raise HttpError(403, "cross_site", "authentication is off (UGA_AUTH_DISABLED): cross-site requests refused")


def _hostname(netloc: str | None) -> str | None:
    try:
        return urlsplit(f"//{netloc}").hostname if netloc else None
    except ValueError:  # an unparsable Host header
        return None


def require(role: str):
    def dependency(request: Request) -> Principal:
        principal = request.scope.get("state", {}).get(PRINCIPAL)
        if principal is not None and principal.allows(role):
            return principal
        h = request.headers
        return authorise(runtime(request), h.get("authorization"), role, h.get("host"), h.get("origin"))

    dependency.uga_role = role
    return dependency


def required_role(route: APIRoute) -> str | None:
    """The role a route's dependencies require (None: the route is open)."""
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        if role := getattr(dependant.call, "uga_role", None):
            return role
        stack.extend(dependant.dependencies)
    return None


class AuthFirst:
    """ASGI middleware: authenticate and authorise for the matched route before the app reads a body."""

    def __init__(self, app, api: FastAPI, routes: list[APIRoute]):
        self.app, self.api = app, api
        self.routes = [(route, required_role(route)) for route in routes]

    def role_for(self, scope) -> str | None:
        """The role of the route that will serve ``scope`` (the routers' own routes, matched in order)."""
        return next((role for route, role in self.routes if route.matches(scope)[0] == Match.FULL), None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (role := self.role_for(scope)) is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        authorization, host, origin = (
            headers[name].decode("latin-1") if name in headers else None for name in HEADERS_READ
        )
        try:  # in a thread: a JWKS fetch or a store lookup must never block the event loop
            principal = await run_in_threadpool(authorise, runtime_of(self.api), authorization, role, host, origin)
        except HttpError as exc:
            return await error_response(exc.status, exc.code, exc.message, exc.details)(scope, receive, send)
        scope.setdefault("state", {})[PRINCIPAL] = principal
        await self.app(scope, receive, send)


def base_url(request: Request) -> str:
    """Where the API is mounted (``/v1``), for links in responses."""
    return request.scope.get("root_path", "") or "/v1"


Rt = Annotated[Runtime, Depends(runtime)]
Base = Annotated[str, Depends(base_url)]
Viewer = Annotated[Principal, Depends(require("viewer"))]
Annotator = Annotated[Principal, Depends(require("annotator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
