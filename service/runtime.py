"""Wiring of one serving process: settings -> store, auth, model, background job worker."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from service.auth import TokenAuth
from service.config import Settings
from service.jobs import JobWorker
from service.registry import ModelHolder
from service.store import Store

log = logging.getLogger("uga")


@dataclass
class Runtime:
    settings: Settings
    store: Store
    auth: TokenAuth
    models: ModelHolder
    worker: JobWorker

    @classmethod
    def create(cls, settings: Settings, *, start_worker: bool = True) -> Runtime:
        auth = TokenAuth.from_settings(settings.auth_tokens_file, settings.auth_tokens, settings.auth_disabled)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.data_dir)
        models = ModelHolder(settings.baseline_dir, providers=settings.providers, threads=settings.ort_threads)
        ensemble = models.load()
        log.info("serving model %s on %s", ensemble.version, ", ".join(ensemble.providers))
        worker = JobWorker(store, settings, models, name=f"{socket.gethostname()}-{os.getpid()}")
        if start_worker:
            worker.start()
        return cls(settings, store, auth, models, worker)

    def ready(self) -> bool:
        return self.models.loaded and self.store.writable()

    def close(self) -> None:
        self.worker.stop()
