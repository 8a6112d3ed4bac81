"""Request metrics labelled by route template, never by the raw path a caller sends.

Ours (``uga_http_requests_total{route,method,status_class}``) come from ``RequestMetrics``, the
outermost middleware of the API, so refusals (401, 413, 429) count too.

BentoML's request metrics (``bentoml_service_request_total`` and friends) label each request with
``scope["path"]``: every job id, item id or invented path becomes a new series, unauthenticated. Its
middleware reads the path once, for labels, and passes the scope on; ``install`` wraps it so the path
it sees is the route's template (``/v1/jobs/{job_id}``; ``/v1/{unknown}`` for no route), and the
application below it gets the real path back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from fastapi.routing import APIRoute
from starlette.routing import Match

from service.http.metrics import observe_request

REAL_PATH = "uga.real_path"
REVIEW, OPENAPI = "/review", "/openapi.json"  # served beside the API's routes
SYSTEM_PATHS = frozenset({"/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json"})


def route_templates(routes: Sequence[APIRoute], prefix: str) -> Callable[[str], str]:
    """path -> the template of the route serving it under ``prefix`` (bounded set of values)."""
    compiled = [(route.path_regex, prefix + route.path) for route in routes]

    def template_of(path: str) -> str:
        if path == prefix or path.startswith(prefix + "/"):
            sub = path[len(prefix) :] or "/"
            if sub == OPENAPI:
                return prefix + OPENAPI
            return next((t for regex, t in compiled if regex.match(sub)), prefix + "/{unknown}")
        if path == REVIEW or path.startswith(REVIEW + "/"):
            return REVIEW + "/{path}"  # the review page and its files: one label
        return path if path in SYSTEM_PATHS else "/{unknown}"

    return template_of


class RequestMetrics:
    """ASGI middleware: count and time each API request by route template, method and status class."""

    def __init__(self, app, routes: Sequence[APIRoute], prefix: str = "/v1"):
        self.app, self.routes, self.prefix = app, routes, prefix

    def template(self, scope) -> str:
        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:  # PARTIAL: the path matched, not the method (405)
                return self.prefix + route.path
        return self.prefix + "/{unknown}"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            observe_request(self.template(scope), scope["method"], status[0] or 500, time.perf_counter() - start)


class _RestorePath:
    """Below the metrics middleware: the application sees the real path again."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if REAL_PATH in scope:  # http and websocket scopes alike
            scope = {k: v for k, v in scope.items() if k != REAL_PATH} | {"path": scope[REAL_PATH]}
        await self.app(scope, receive, send)


def install(template_of: Callable[[str], str]) -> None:
    """Patch BentoML's traffic-metrics middleware in this process (idempotent)."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as Middleware

    if getattr(Middleware, "_uga_templated", False):
        Middleware._uga_template_of = staticmethod(template_of)
        return
    original = Middleware.__call__

    async def templated(self, scope, receive, send):
        if scope.get("type") not in ("http", "websocket"):
            return await original(self, scope, receive, send)
        if not isinstance(self.app, _RestorePath):
            self.app = _RestorePath(self.app)
        labelled = scope | {"path": Middleware._uga_template_of(scope["path"]), REAL_PATH: scope["path"]}
        return await original(self, labelled, receive, send)

    Middleware._uga_template_of = staticmethod(template_of)
    Middleware.__call__ = templated
    Middleware._uga_templated = True
