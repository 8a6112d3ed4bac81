"""The job worker outlives a store that is down for a moment: the job it could not record is left to
stale recovery (requeued, run again), never failed for the store's sake, and the next job runs."""

from __future__ import annotations

import time

import pytest

from service.config import Settings
from service.errors import Unavailable
from service.loop.worker import JobWorker, sweep_scratch
from service.store import Store

DOWN = Unavailable("store_unavailable", "the database is unreachable; retry shortly")


class Models:
    """The worker's model holder, reduced to what these tests need: ``sync`` reaches the store."""

    loaded = True

    def __init__(self, store_down: list[bool]):
        self.store_down = store_down

    def sync(self) -> None:
        if self.store_down[0]:
            raise DOWN
        raise RuntimeError("no model in this test: the job fails once the store answers")


def _wait(predicate, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow  # over 5 s on 2 cores: not in make test-fast
def test_a_store_outage_at_a_jobs_end_neither_kills_the_worker_nor_fails_the_job(tmp_path):
    store = Store(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", slide_root=tmp_path, job_stale_s=1)
    down = [True]
    real_fail = store.jobs.fail

    def fail(*args, **kwargs):
        if down[0]:
            raise DOWN
        return real_fail(*args, **kwargs)

    store.jobs.fail = fail
    first, _ = store.jobs.submit(slide="a.tif", options={}, resolved={}, model_version="v", dedup_key="a", actor="t")
    worker = JobWorker(store, settings, Models(down), "w1")
    worker.start()
    try:
        assert _wait(lambda: store.jobs.get(first.id).state == "running")  # claimed
        time.sleep(1.5)  # its end could not be recorded
        assert worker.alive
        assert store.jobs.get(first.id).state in ("running", "queued")  # not failed for the store's sake
        down[0] = False  # the store is back: stale recovery requeues the job, and it runs again
        assert _wait(lambda: store.jobs.get(first.id).state == "failed")
        assert "no model in this test" in store.jobs.get(first.id).error
        second, _ = store.jobs.submit(
            slide="b.tif", options={}, resolved={}, model_version="v", dedup_key="b", actor="t"
        )
        assert _wait(lambda: store.jobs.get(second.id).state == "failed")  # the worker still claims jobs
        assert worker.alive
    finally:
        worker.stop()
        store.close()


def test_the_start_sweep_removes_a_cancelled_jobs_files_and_half_written_ones_but_not_a_running_jobs(tmp_path):
    store = Store(tmp_path / "data")
    try:
        jobs = {}
        for name in ("cancelled", "running", "queued"):
            jobs[name], _ = store.jobs.submit(
                slide=f"{name}.tif", options={}, resolved={}, model_version="v", dedup_key=name, actor="t"
            )
        for name in ("cancelled", "running"):
            assert store.jobs.claim("w1").id == jobs[name].id
        store.jobs.cancel(jobs["cancelled"].id, "t")  # cancel requested, then its worker dies:
        time.sleep(0.05)
        store.jobs.heartbeat(jobs["running"].id, "w1")  # (the running one's worker is alive)
        store.jobs.recover_stale(0.03)  # stale recovery ends it cancelled, its files still there
        assert store.jobs.get(jobs["cancelled"].id).state == "cancelled"
        for job in jobs.values():
            out = store.job_dir(job.id)
            out.mkdir(parents=True)
            (out / "mask.tif").write_bytes(b"x")
            (out / "mask.tif.part").write_bytes(b"y")
            (out / ".attempt-0123").mkdir()  # a crashed attempt's unpublished outputs
            (out / ".attempt-0123" / "mask.tif").write_bytes(b"z")
        assert (
            sweep_scratch(store, older_than_s=0) == 3
        )  # the cancelled job's folder; the .part and the attempt an earlier run of the queued one left
        assert not store.job_dir(jobs["cancelled"].id).exists()
        assert sorted(p.name for p in store.job_dir(jobs["queued"].id).iterdir()) == ["mask.tif"]
        running = sorted(p.name for p in store.job_dir(jobs["running"].id).iterdir())
        assert running == [".attempt-0123", "mask.tif", "mask.tif.part"]
    finally:
        store.close()


class Loaded:
    """A model holder whose model is never used: the pipeline is replaced in the test below."""

    loaded = True

    def sync(self) -> None:
        pass

    def current(self):
        return None


def test_a_worker_that_lost_its_job_never_touches_the_files_of_the_worker_that_took_it(tmp_path, monkeypatch):
    """Worker A is cut off past UGA_JOB_STALE_S; B reclaims the job and finishes it. A's outputs,
    written afterwards, must not land over B's: they stay in A's attempt and go with it."""
    store = Store(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", slide_root=tmp_path)
    (tmp_path / "a.tif").write_bytes(b"not read: the pipeline is replaced")
    job, _ = store.jobs.submit(slide="a.tif", options={}, resolved={}, model_version="v", dedup_key="a", actor="t")
    assert store.jobs.claim("A").id == job.id
    final = store.job_dir(job.id)

    def a_runs_while_b_takes_over(slide, out, *args, **kwargs):
        store.db.conn().execute("UPDATE jobs SET worker = 'B' WHERE id = ?", (job.id,))  # recovered, claimed by B
        final.mkdir(parents=True, exist_ok=True)
        (final / "mask.tif").write_bytes(b"B's mask")
        assert store.jobs.finish(job.id, "B", {"model_version": "v2", "artifacts": {}}, [])
        out.mkdir(parents=True, exist_ok=True)  # as the pipeline does
        (out / "mask.tif").write_bytes(b"A's mask")
        (out / "queue.json").write_text("[]")
        return {"model_version": "v1", "artifacts": {"queue": "queue.json", "mask": "mask.tif"}}

    monkeypatch.setattr("service.loop.worker.run_segmentation", a_runs_while_b_takes_over)
    try:
        JobWorker(store, settings, Loaded(), "A")._run(store.jobs.get(job.id))
        assert (final / "mask.tif").read_bytes() == b"B's mask"
        assert sorted(p.name for p in final.iterdir()) == ["mask.tif"]  # no report, no attempt left behind
        assert store.jobs.get(job.id).model_version == "v2"
    finally:
        store.close()


def test_a_finished_job_publishes_its_outputs_and_replaces_an_unfinished_attempts(tmp_path, monkeypatch):
    store = Store(tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", slide_root=tmp_path)
    (tmp_path / "a.tif").write_bytes(b"not read")
    job, _ = store.jobs.submit(slide="a.tif", options={}, resolved={}, model_version="v", dedup_key="a", actor="t")
    final = store.job_dir(job.id)
    final.mkdir(parents=True)
    (final / "segmentation.dcm").write_bytes(b"from a run that crashed while publishing")

    def pipeline(slide, out, *args, **kwargs):
        out.mkdir(parents=True, exist_ok=True)  # as the pipeline does
        (out / "mask.tif").write_bytes(b"mask")
        (out / "queue.json").write_text("[]")
        return {"model_version": "v", "artifacts": {"queue": "queue.json", "mask": "mask.tif"}}

    monkeypatch.setattr("service.loop.worker.run_segmentation", pipeline)
    monkeypatch.setattr("service.loop.worker.diagnostic_report", lambda *a: {"resourceType": "DiagnosticReport"})
    try:
        assert store.jobs.claim("A").id == job.id
        JobWorker(store, settings, Loaded(), "A")._run(store.jobs.get(job.id))
        assert store.jobs.get(job.id).state == "succeeded"
        assert sorted(p.name for p in final.iterdir()) == ["mask.tif", "queue.json", "report.fhir.json", "summary.json"]
    finally:
        store.close()
