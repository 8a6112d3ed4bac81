"""The job worker outlives a store that is down for a moment: the job it could not record is left to
stale recovery (requeued, run again), never failed for the store's sake, and the next job runs."""

from __future__ import annotations

import time

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
        assert (
            sweep_scratch(store, older_than_s=0) == 2
        )  # the cancelled job's folder; the .part an earlier attempt of the queued one left
        assert not store.job_dir(jobs["cancelled"].id).exists()
        assert sorted(p.name for p in store.job_dir(jobs["queued"].id).iterdir()) == ["mask.tif"]
        assert sorted(p.name for p in store.job_dir(jobs["running"].id).iterdir()) == ["mask.tif", "mask.tif.part"]
    finally:
        store.close()
