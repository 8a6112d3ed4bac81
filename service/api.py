"""The BentoML service: the REST API (service/http/app.py) mounted at /v1, the review page at /review
(service/http/review_page.py), plus BentoML's own /livez, /readyz (ready only with a loaded model and
a writable store) and /metrics (ours appended).

    bentoml serve service.api:UGAService --port 3000
"""

from __future__ import annotations

import logging
import sqlite3
import sys

import bentoml
from pydantic import ValidationError

from service.config import Settings, get_settings, settings_error
from service.errors import DomainError
from service.http import connections, request_metrics
from service.http.app import create_app
from service.http.auth import AuthConfigError, Authenticator
from service.http.errors import BodyLimits
from service.http.review_page import create_review_app, sign_in_config
from service.http.runtime import Runtime
from service.inference.ensemble import read_card
from service.loop.store_metrics import store_metrics
from service.store import Store, StoreError


def preflight() -> Settings:
    """The settings, if this process can serve with them; otherwise one line on stderr and exit 2.

    Run when BentoML imports this module, in its main process before any worker starts: a fatal
    misconfiguration stops `bentoml serve` at once instead of crash-looping its workers.
    """
    try:
        settings = get_settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store.open(settings)
        try:
            Authenticator.from_settings(settings, store.tokens)
        finally:
            store.close()
        read_card(settings.baseline_dir)
    except ValidationError as exc:
        _fatal(settings_error(exc))
    except (AuthConfigError, DomainError, StoreError, OSError, sqlite3.Error) as exc:
        _fatal(str(exc).splitlines()[0])
    return settings


def _fatal(reason: str) -> None:
    print(f"uga: error: {reason}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# `bentoml serve` (also what `uga serve` runs) checks the configuration first; `bentoml build` and
# the workers only import the definitions (a build must not need the deployment's secrets).
settings = preflight() if sys.argv[1:2] == ["serve"] else get_settings()
connections.install(settings.header_timeout_s, settings.max_connections)  # before the worker's server starts
app = create_app(
    BodyLimits.from_settings(settings),
    body_timeout_s=settings.body_timeout_s,
    body_total_s=settings.body_total_s,
)
request_metrics.install(request_metrics.route_templates(app.state.routes, "/v1"))  # no caller-made labels
log = logging.getLogger("uga")


@bentoml.service(
    name="uga",
    workers=settings.workers,
    traffic={"timeout": 300},
    http={"port": settings.port},
)
@bentoml.asgi_app(app, path="/v1")
@bentoml.asgi_app(create_review_app(sign_in_config(settings)), path="/review")
class UGAService:
    def __init__(self) -> None:
        self.runtime = Runtime.create(get_settings())
        app.state.uga = self.runtime

    def __is_ready__(self) -> bool:
        return self.runtime.ready()

    def __is_alive__(self) -> bool:
        """/livez fails if this process's job worker has died, so Kubernetes restarts the pod."""
        return self.runtime.worker.alive

    def __metrics__(self, content: str) -> str:
        """Per-process metrics; the store-derived ones too where this deployment exports them here."""
        if self.runtime.settings.store_metrics != "serve":
            return content
        return content + store_metrics(self.runtime.store)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.runtime.close()
