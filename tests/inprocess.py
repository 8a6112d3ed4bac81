"""The API in-process: the ASGI app mounted at /v1 over a real Runtime (store, model, job worker)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.config import Settings
from service.http.app import create_app
from service.http.errors import BodyLimits
from service.http.runtime import Runtime
from tests.server import TOKENS


class InProcessService:
    """Same surface as tests.server.Server for contract tests: ``client(role)`` and ``data_dir``."""

    def __init__(self, data_dir: Path, slide_root: Path, *, start_worker: bool = True, **settings: object):
        self.data_dir, self.slide_root = data_dir, slide_root
        self.settings = Settings(
            data_dir=data_dir,
            slide_root=slide_root,
            auth_tokens=",".join(f"{r}:{t}" for r, t in TOKENS.items()),
            ort_threads=2,
            job_stale_s=3,
            **settings,
        )
        self.runtime = Runtime.create(self.settings, start_worker=start_worker)
        api = create_app(BodyLimits.from_settings(self.settings))
        api.state.uga = self.runtime
        self.app = FastAPI()
        self.app.mount("/v1", api)  # as BentoML mounts it: links carry the /v1 root path

    def client(self, role: str | None = "admin") -> TestClient:
        headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
        return TestClient(self.app, headers=headers, raise_server_exceptions=False)

    def close(self) -> None:
        self.runtime.close()
        self.runtime.store.close()
