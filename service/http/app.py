"""The REST surface (FastAPI app mounted under /v1 by the BentoML service): one router per resource.
Routers only translate HTTP to use cases (service.loop) and back; errors map in service.http.errors.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.routing import Match

from service.errors import NotFound
from service.http.deps import AuthFirst
from service.http.errors import BodyLimit, BodyLimits, CleanUrl, ErrorBoundary, error_response, install_handlers
from service.http.headers import CommonHeaders
from service.http.request_metrics import RequestMetrics
from service.http.routers import corrections, deliveries, finetune, health, jobs, me, models, overlays, queue, slides
from service.http.schemas import COMMON_ERRORS


def create_app(limits: BodyLimits, body_timeout_s: float = 30.0, body_total_s: float = 120.0) -> FastAPI:
    app = FastAPI(
        title="UGA Serve",
        version="0.1.0",
        description="Uncertainty-guided annotation for whole-slide segmentation",
        responses=COMMON_ERRORS,
        # FastAPI's docs pages load Swagger UI / ReDoc from a public CDN, on the review page's origin:
        # none here. The schema stays at /v1/openapi.json (any OpenAPI viewer, or the client generator).
        docs_url=None,
        redoc_url=None,
    )
    routers = (
        jobs.router,
        overlays.router,
        slides.router,
        deliveries.router,
        queue.router,
        corrections.router,
        finetune.router,
        models.router,
        health.router,
        me.router,
    )
    routes = [route for router in routers for route in router.routes]
    app.add_middleware(AuthFirst, api=app, routes=routes)  # innermost: decides before any route reads a body
    app.add_middleware(CleanUrl)
    uploads = [route for route in routes if route.endpoint in corrections.UPLOADS]
    app.add_middleware(BodyLimit, limits=limits, upload_routes=uploads, timeout_s=body_timeout_s, total_s=body_total_s)
    app.add_middleware(ErrorBoundary)
    app.add_middleware(CommonHeaders)  # on refusals and errors too
    app.add_middleware(RequestMetrics, routes=routes)  # outermost: refusals are counted too
    install_handlers(app)
    for router in routers:
        app.include_router(router)
    app.state.routes = routes  # the API's routes, for request metrics by template

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def unknown_route(path: str, request: Request):
        allowed = sorted({m for r in routes if r.matches(request.scope)[0] == Match.PARTIAL for m in r.methods})
        if allowed:  # the path exists, the method does not
            message = f"{request.method} is not allowed on /v1/{path}; use {' or '.join(allowed)}"
            return error_response(405, "method_not_allowed", message, {"allow": allowed}, {"Allow": ", ".join(allowed)})
        raise NotFound("not_found", f"no such endpoint /v1/{path}; see /v1/openapi.json")

    return app
