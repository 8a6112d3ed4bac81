"""Background segmentation worker: claims queued jobs from the store, runs them, records results.

One worker thread per serving process. Progress and a heartbeat go to the store, so any worker or
replica can report status, and a job whose worker died is requeued once its heartbeat is stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from service.config import Settings
from service.http import metrics
from service.inference.pipeline import RunOptions, run_segmentation
from service.loop.registry import ModelHolder
from service.store import Store
from service.wsi.slide import SlideError, resolve_slide_path

log = logging.getLogger("uga.jobs")
HEARTBEAT_S = 2.0
RECOVER_EVERY_S = 5.0


class Cancelled(Exception):
    """The worker is stopping; the job goes back to the queue."""


def run_options(settings: Settings, options: dict) -> RunOptions:
    """A job's options (None = server default) on top of the settings."""
    return RunOptions.from_settings(
        settings,
        mpp=options.get("mpp"),
        slide_mpp=options.get("slide_mpp"),
        measure=options.get("uncertainty"),
        scoring=options.get("scoring"),
        queue_size=options.get("queue_size"),
        patch_um=options.get("patch_um"),
    )


def job_key(settings: Settings, slide_path: Path, rel: str, options: dict, model_version: str) -> str:
    """Identity of a segmentation: same slide file, options, defaults and model version = same job."""
    stat = slide_path.stat()
    src = {
        "slide": rel,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "options": options,
        "model_version": model_version,
        "defaults": [
            settings.mpp,
            settings.queue_size,
            settings.patch_um,
            settings.uncertainty,
            settings.scoring,
            settings.threshold,
            settings.tile,
            settings.overlap,
        ],
    }
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()


def enqueue_rescoring(store: Store, settings: Settings, version: str, actor: str) -> list[str]:
    """After a model change: re-segment every slide's latest finished job with the new version, so the
    queue is rescored by the model now serving (corrected / skipped patches stay out of it)."""
    created = []
    for slide in store.segmented_slides():
        latest = store.latest_job_for_slide(slide)
        if latest is None or latest["model_version"] == version:
            continue
        try:
            path = resolve_slide_path(settings.slide_root, slide)
        except (SlideError, ValueError):
            continue  # the slide is gone; its old queue stays readable
        key = job_key(settings, path, slide, latest["options"], version)
        job, new = store.submit_job(
            slide=slide, options=latest["options"], model_version=version, dedup_key=key, actor=actor
        )
        if new:
            created.append(job["id"])
    return created


class JobWorker:
    def __init__(self, store: Store, settings: Settings, models: ModelHolder, name: str):
        self.store, self.settings, self.models, self.name = store, settings, models, name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"uga-jobs-{name}", daemon=True)
        self.current_job: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        last_recover = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_recover > RECOVER_EVERY_S:
                    last_recover = time.monotonic()
                    for job_id in self.store.recover_stale_jobs(self.settings.job_stale_s):
                        log.warning("job %s had no heartbeat for %.0fs: requeued", job_id, self.settings.job_stale_s)
                job = self.store.claim_job(self.name) if self.models.loaded else None
            except Exception:  # noqa: BLE001 - the store may be briefly busy; keep the worker alive
                log.exception("job worker: store error")
                job = None
            if job is None:
                self._stop.wait(0.5)
                continue
            self._run(job)

    def _run(self, job: dict) -> None:
        job_id = job["id"]
        self.current_job = job_id
        beat_stop = threading.Event()

        def beat() -> None:
            while not beat_stop.wait(HEARTBEAT_S):
                try:
                    self.store.heartbeat(job_id, self.name)
                except Exception:  # noqa: BLE001
                    log.exception("heartbeat failed")

        last = [0.0]

        def progress(done: int, total: int) -> None:
            if self._stop.is_set():
                raise Cancelled()
            now = time.monotonic()
            if now - last[0] >= 0.5 or done == total:
                last[0] = now
                self.store.heartbeat(job_id, self.name, done, total)

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        try:
            self.models.sync()  # a job claimed right after a pointer move runs on the new version
            slide = resolve_slide_path(self.settings.slide_root, job["slide"])
            out = self.store.job_dir(job_id)
            ensemble = self.models.current()  # pinned: the whole job runs on this version
            summary = run_segmentation(
                slide,
                out,
                ensemble,
                run_options(self.settings, job["options"]),
                slide_key=job["slide"],
                progress=progress,
                exclude=self.store.handled_items(job["slide"]),
            )
            queue = json.loads((Path(out) / summary["artifacts"]["queue"]).read_text())
            if self.store.finish_job(job_id, self.name, summary, queue):
                metrics.observe_segmentation(summary)
        except Cancelled:
            log.warning("job %s interrupted by shutdown: back to the queue", job_id)
            self.store.requeue(job_id, self.name)
        except (SlideError, ValueError) as exc:
            self.store.fail_job(job_id, self.name, str(exc))
            metrics.JOBS_FAILED.inc()
        except Exception as exc:  # noqa: BLE001 - any failure is recorded on the job, never lost
            log.exception("job %s failed", job_id)
            self.store.fail_job(job_id, self.name, f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            metrics.JOBS_FAILED.inc()
        finally:
            beat_stop.set()
            self.current_job = None
