"""Wiring of one serving process: settings -> store, registry, auth, model holder, job worker, tiles, metrics."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass
from functools import partial

from service.config import Settings
from service.http import metrics
from service.http.auth import Authenticator
from service.loop.callbacks import CallbackSender
from service.loop.corrections import sweep_orphans
from service.loop.model_holder import ModelHolder
from service.loop.registry import Registry
from service.loop.worker import JobWorker, sweep_scratch
from service.store import Store
from service.wsi.deepzoom import DeepZoomSlides

log = logging.getLogger("uga")


@dataclass
class Runtime:
    settings: Settings
    store: Store
    registry: Registry
    auth: Authenticator
    models: ModelHolder
    worker: JobWorker
    tiles: DeepZoomSlides  # deep-zoom tiles and overlay images of the review page (bounded caches)
    callbacks: CallbackSender | None = None

    @classmethod
    def create(cls, settings: Settings, *, start_worker: bool = True) -> Runtime:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store.open(settings)
        try:  # named users' tokens live in the store, so auth is built after it
            auth = Authenticator.from_settings(settings, store.tokens)
        except BaseException:
            store.close()
            raise
        registry = Registry(store, settings.data_dir, settings.baseline_dir)
        registry.ensure_baseline()
        if swept := sweep_scratch(store):
            log.warning("removed the scratch rasters of %d jobs that were not running (interrupted runs)", swept)
        removed = sweep_orphans(settings.data_dir / "corrections", lambda cid: store.corrections.get(cid) is not None)
        if removed:
            log.warning("removed %d correction directories without a database row (interrupted ingests)", len(removed))
        models = ModelHolder(
            registry,
            providers=settings.providers,
            threads=settings.ort_threads,
            on_swap=partial(metrics.model_swapped, sites=settings.site_names),
            load_retry_s=settings.model_load_retry_s,
        )
        ensemble = models.load()
        if forgotten := metrics.forget_dead_processes():
            log.info("dropped the live metrics of %d serving processes that are gone: %s", len(forgotten), forgotten)
        metrics.model_swapped(None, ensemble.version, settings.site_names)
        models.start_watch(settings.model_poll_s)
        log.info("serving model %s on %s", ensemble.version, ", ".join(ensemble.providers))
        worker = JobWorker(
            store,
            settings,
            models,
            name=f"{socket.gethostname()}-{os.getpid()}",
            on_success=metrics.observe_segmentation,
        )
        if start_worker:
            worker.start()
        callbacks = CallbackSender(store, settings) if settings.callback_targets else None
        if callbacks and start_worker:
            callbacks.start()
        tiles = DeepZoomSlides(int(settings.tile_cache_mb * 2**20), settings.tile_open_slides)
        return cls(settings, store, registry, auth, models, worker, tiles, callbacks)

    def health(self) -> dict:
        """What readiness depends on: a loaded model, a store that takes a write, UGA_MIN_FREE_MB free."""
        free_mb = shutil.disk_usage(self.settings.data_dir).free / 2**20
        checks = {
            "model_loaded": self.models.loaded,
            "store_writable": self.store.writable(),
            "disk_space": free_mb >= self.settings.min_free_mb,
            "job_worker_alive": self.worker.alive,
        }
        return {
            "ready": all(checks.values()),
            "checks": checks,
            "free_mb": round(free_mb),
            "min_free_mb": self.settings.min_free_mb,
            "model_served": self.models.version,
            "model_current": self.store.models.current(),
        }

    def ready(self) -> bool:
        health = self.health()
        if not health["checks"]["disk_space"]:
            log.warning("not ready: %s MiB free on the data volume (UGA_MIN_FREE_MB)", health["free_mb"])
        return health["ready"]

    def close(self) -> None:
        self.models.stop()
        self.worker.stop()
        if self.callbacks:
            self.callbacks.stop()
