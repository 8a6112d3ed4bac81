"""The BentoML service: the REST API (service/http/app.py) mounted at /v1, plus BentoML's own /livez,
/readyz (ready only with a loaded model and a writable store) and /metrics (ours appended).

    bentoml serve service.api:UGAService --port 3000
"""

from __future__ import annotations

import logging

import bentoml

from service.config import get_settings
from service.http import connections
from service.http.app import create_app
from service.http.metrics import store_metrics
from service.http.runtime import Runtime

settings = get_settings()
connections.install(settings.header_timeout_s, settings.max_connections)  # before the worker's server starts
app = create_app(max_body_bytes=int(settings.max_body_mb * 1024 * 1024), body_timeout_s=settings.body_timeout_s)
log = logging.getLogger("uga")


@bentoml.service(
    name="uga",
    workers=settings.workers,
    traffic={"timeout": 300},
    http={"port": settings.port},
)
@bentoml.asgi_app(app, path="/v1")
class UGAService:
    def __init__(self) -> None:
        self.runtime = Runtime.create(get_settings())
        app.state.uga = self.runtime

    def __is_ready__(self) -> bool:
        return self.runtime.ready()

    def __metrics__(self, content: str) -> str:
        return content + store_metrics(self.runtime.store)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.runtime.close()
