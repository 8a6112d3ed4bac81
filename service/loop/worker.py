"""Background segmentation worker: claims queued jobs from the store, runs them, records results.

One worker thread per serving process. Progress and a heartbeat go to the store, so any worker or
replica can report status, and a job whose worker died is requeued once its heartbeat is stale.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from service.config import Settings
from service.errors import DomainError, Unavailable
from service.fsutil import ATTEMPT_PREFIX, atomic_write_json, commit_file, publish_outputs
from service.inference.pipeline import run_segmentation
from service.integrations.dicom_seg import SegUnavailable, tumour_segmentation
from service.integrations.fhir import diagnostic_report
from service.loop.jobs import check_work, expire_superseded
from service.loop.model_holder import ModelHolder
from service.loop.review import reviewed_boxes
from service.loop.slides import locate_slide, pacs_client, parse_dicomweb
from service.options import SegmentationOptions
from service.store import Job, Store
from service.vocabulary import ARTIFACTS
from service.wsi.dicom import find_series, is_dicom

log = logging.getLogger("uga.jobs")
HEARTBEAT_S = 2.0
RECOVER_EVERY_S = 5.0
EXPIRE_EVERY_S = 600.0  # superseded jobs' files: retention is in days, a pass every 10 minutes is plenty
STORE_ERRORS = (Unavailable, sqlite3.OperationalError)  # the store is down or busy for a moment


class Cancelled(Exception):
    """The worker is stopping; the job goes back to the queue."""


class TimedOut(Exception):
    """The job ran past UGA_MAX_JOB_S."""


class CancelRequested(Exception):
    """Someone cancelled the running job."""


class Lost(Exception):
    """The job is no longer this worker's (requeued to another after a stale heartbeat, or ended)."""


def sweep_scratch(store: Store, older_than_s: float = 300.0) -> int:
    """At start: remove what jobs that are not running left behind (crashed runs): their scratch
    (``.work-*``) and half-written files (``*.part``), and every file of a cancelled job (cancelled
    while queued after an earlier attempt, or ended by stale recovery) or of one retention marked
    expired (a crash between the mark and the removal). Returns how many were removed.

    Only what is untouched for ``older_than_s``: a job another worker claimed a moment ago is safe."""
    running = {j.id for j in store.jobs.list("running", 100_000)}
    discarded = {j.id for j in store.jobs.list("cancelled", 100_000)} | store.jobs.expired_ids()
    swept = 0
    for job_dir in list(store.jobs_dir.iterdir()):
        if job_dir.name in running:
            continue
        leftovers = (
            [job_dir]
            if job_dir.name in discarded
            else [*job_dir.glob(".work-*"), *job_dir.glob("*.part"), *job_dir.glob(f"{ATTEMPT_PREFIX}*")]
        )
        for path in leftovers:
            try:
                stale = time.time() - path.stat().st_mtime > older_than_s
            except FileNotFoundError:
                continue
            if not stale:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            swept += 1
    return swept


class JobWorker:
    """Runs queued jobs one at a time; ``on_success(job, summary)`` observes each finished one."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        models: ModelHolder,
        name: str,
        *,
        on_success: Callable[[Job, dict], None] | None = None,
    ):
        self.store, self.settings, self.models, self.name = store, settings, models, name
        self.on_success = on_success
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"uga-jobs-{name}", daemon=True)
        self._started = False
        self.current_job: str | None = None

    def start(self) -> None:
        self._started = True
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False only when the worker was started and its thread has ended (readiness says so)."""
        return not self._started or self._thread.is_alive() or self._stop.is_set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        last_recover = last_expire = -math.inf
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_recover > RECOVER_EVERY_S:
                    last_recover = time.monotonic()
                    for job_id in self.store.jobs.recover_stale(self.settings.job_stale_s):
                        log.warning("job %s had no heartbeat for %.0fs: requeued", job_id, self.settings.job_stale_s)
                if time.monotonic() - last_expire > EXPIRE_EVERY_S:
                    last_expire = time.monotonic()
                    if expired := expire_superseded(self.store, self.settings):
                        log.info("removed the files of %d superseded jobs (UGA_JOB_RETENTION_DAYS)", len(expired))
                job = self.store.jobs.claim(self.name) if self.models.loaded else None
            except Exception:  # noqa: BLE001 - the store may be briefly busy; keep the worker alive
                log.exception("job worker: store error")
                job = None
            if job is None:
                self._stop.wait(0.5)
                continue
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - even recording the outcome failed (the store is down):
                log.exception("job %s: its outcome could not be recorded; stale recovery requeues it", job.id)
                self._stop.wait(1.0)  # the heartbeat has stopped, so another attempt picks it up later

    def options(self, job: Job) -> SegmentationOptions:
        """The options resolved at submission (older jobs: resolved now, from the settings)."""
        if job.resolved:
            return SegmentationOptions(**job.resolved)
        return SegmentationOptions.resolve(self.settings, job.options)

    def _run(self, job: Job) -> None:
        jobs = self.store.jobs
        self.current_job = job.id
        beat_stop = threading.Event()

        cancel, lost = threading.Event(), threading.Event()

        def beat() -> None:
            while not beat_stop.wait(HEARTBEAT_S):
                try:
                    answer = jobs.heartbeat(job.id, self.name)
                    if answer is None:
                        lost.set()
                    elif answer:
                        cancel.set()
                except Exception:  # noqa: BLE001
                    log.exception("heartbeat failed")

        last, started = [0.0], time.monotonic()

        def check() -> None:
            """Stop the job here if the worker stops, time is up, or it was lost or cancelled."""
            if self._stop.is_set():
                raise Cancelled()
            if time.monotonic() - started > self.settings.max_job_s:
                raise TimedOut()
            if lost.is_set():
                raise Lost()
            if cancel.is_set():
                raise CancelRequested()

        def progress(done: int, total: int) -> None:
            check()
            now = time.monotonic()
            if now - last[0] >= 0.5 or done == total:
                last[0] = now
                try:
                    answer = jobs.heartbeat(job.id, self.name, done, total)
                except STORE_ERRORS as exc:  # a blip: keep computing; the beat thread keeps trying
                    log.warning("job %s: progress not recorded (%s)", job.id, exc)
                    return
                if answer is None:
                    raise Lost()
                if answer:
                    raise CancelRequested()

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        attempt = self.store.job_dir(job.id) / f"{ATTEMPT_PREFIX}{uuid.uuid4().hex[:12]}"  # this run's own outputs
        try:
            self.models.sync()  # a job claimed right after a pointer move runs on the new version
            slide = locate_slide(self.settings, job.slide, check)  # a DICOMweb series: fetched into the cache
            if parse_dicomweb(job.slide):
                check_work(self.settings, slide, self.options(job))  # limits of a series known only now
            ensemble = self.models.current()  # pinned: the whole job runs on this version
            summary = run_segmentation(
                slide,
                attempt,
                ensemble,
                self.options(job),
                slide_key=job.slide,
                progress=progress,
                reviewed=reviewed_boxes(self.store, job.slide),
            )
            queue = json.loads((attempt / summary["artifacts"]["queue"]).read_text())
            write_hospital_outputs(job, slide, attempt, summary, self.settings, lambda: self._still_mine(job))
            final = self.store.job_dir(job.id)
            if jobs.finish(
                job.id, self.name, summary, queue, publish=lambda: publish_outputs(attempt, final, remove_stale=True)
            ):
                if self.on_success:
                    self.on_success(job, summary)
            elif (now := jobs.get(job.id)) is not None and now.cancel_requested and now.worker == self.name:
                raise CancelRequested()  # cancelled while its outputs were being written
        except Cancelled:
            log.warning("job %s interrupted by shutdown: back to the queue", job.id)
            jobs.requeue(job.id, self.name)
        except Lost:
            log.warning("job %s is no longer this worker's (requeued after a stale heartbeat): stopped", job.id)
        except CancelRequested:
            log.info("job %s cancelled while running", job.id)
            if jobs.end_cancelled(job.id, self.name):  # only its owner removes the outputs
                shutil.rmtree(self.store.job_dir(job.id), ignore_errors=True)
        except TimedOut:
            self._fail(
                job, f"stopped after {self.settings.max_job_s:.0f} s (UGA_MAX_JOB_S); use a coarser mpp", "job_timeout"
            )
        except DomainError as exc:  # the slide or the options cannot be used, or the model failed to load
            if exc.code == "store_unavailable":
                raise  # not the job's fault: left running, so stale recovery requeues it once the store is back
            if isinstance(exc, Unavailable):
                log.exception("job %s failed", job.id)
            self._fail(job, exc.message, exc.code)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded on the job, never lost
            log.exception("job %s failed", job.id)
            self._fail(job, f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
        finally:  # published, or never to be: another worker may own the job's directory now
            shutil.rmtree(attempt, ignore_errors=True)
            beat_stop.set()
            self.current_job = None

    def _fail(self, job: Job, error: str, code: str = "internal_error") -> None:
        self.store.jobs.fail(job.id, self.name, error, code)

    def _still_mine(self, job: Job) -> None:
        """Raise unless the job is still this worker's and not cancelled (before an irreversible step)."""
        answer = self.store.jobs.heartbeat(job.id, self.name)
        if answer is None:
            raise Lost()
        if answer:
            raise CancelRequested()


def write_hospital_outputs(
    job: Job, slide: Path, out: Path, summary: dict, settings: Settings, still_mine: Callable[[], None] | None = None
) -> None:
    """The FHIR report, and for a DICOM source its SEG (stored to the PACS when the job asks); each
    added to the summary's artifacts.

    A SEG the source cannot carry (no Frame of Reference, no usable level) is skipped with its reason
    in the summary: the segmentation itself stands."""
    report = diagnostic_report(job.id, job.slide, summary, f"/v1/queue?slide={job.slide}", time.time())
    atomic_write_json(out / ARTIFACTS["fhir_report"], report)
    summary["artifacts"]["fhir_report"] = ARTIFACTS["fhir_report"]
    if not is_dicom(slide):
        atomic_write_json(out / ARTIFACTS["summary"], summary)
        return
    try:
        seg = tumour_segmentation(
            find_series(slide), out / ARTIFACTS["mask"], summary["mpp"], summary["model_version"], job.id
        )
    except SegUnavailable as exc:
        log.warning("job %s: %s", job.id, exc.message)
        summary["dicom_seg_skipped"] = exc.message
        atomic_write_json(out / ARTIFACTS["summary"], summary)
        return
    tmp = out / (ARTIFACTS["dicom_seg"] + ".part")
    seg.save_as(tmp)
    commit_file(tmp, out / ARTIFACTS["dicom_seg"])
    summary["artifacts"]["dicom_seg"] = ARTIFACTS["dicom_seg"]
    if job.stow:  # the job asked: STOW-RS to its PACS (a failure fails the job with the PACS's reason)
        if still_mine is not None:
            still_mine()  # never store the result of a job that was cancelled or taken over meanwhile
        with pacs_client(settings, job.stow) as pacs:
            pacs.store(seg)
        summary["stored_to"] = {"pacs": job.stow, "series_instance_uid": str(seg.SeriesInstanceUID)}
    atomic_write_json(out / ARTIFACTS["summary"], summary)  # the file says what the job wrote, as the store
