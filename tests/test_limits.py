"""Bounded work: every input that causes work has a limit, refused in the error contract, nothing written."""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest

from service.loop.store_metrics import store_metrics
from tests.inprocess import InProcessService
from tests.server import wait_job, wait_started


@pytest.fixture()
def slides(tmp_path, source_slide):
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(source_slide, root / "a.tif")
    return root


def _jobs(service) -> int:
    return len(service.runtime.store.jobs.list(limit=500))


def test_active_jobs_are_limited_per_caller_and_in_all_with_retry_after(tmp_path, slides):
    service = InProcessService(
        tmp_path / "data", slides, start_worker=False, max_active_jobs=2, max_active_jobs_per_caller=1
    )
    try:
        with service.client("annotator") as c:
            assert c.post("/v1/jobs", json={"slide": "a.tif"}).status_code == 202
            again = c.post("/v1/jobs", json={"slide": "a.tif"})  # the same job: deduplicated, not limited
            assert again.status_code == 200 and again.json()["deduplicated"] is True
            r = c.post("/v1/jobs", json={"slide": "a.tif", "options": {"queue_size": 3}})
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs"
            assert int(r.headers["retry-after"]) > 0
            assert "UGA_MAX_ACTIVE_JOBS_PER_CALLER" in r.json()["error"]["message"]
        with service.client("admin") as c:
            assert c.post("/v1/jobs", json={"slide": "a.tif", "options": {"queue_size": 4}}).status_code == 202
            r = c.post("/v1/jobs", json={"slide": "a.tif", "options": {"queue_size": 5}})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert _jobs(service) == 2
        age_line = r'^uga_oldest_queued_job_age_seconds\{origin="client"\} (\S+)$'
        age = re.search(age_line, store_metrics(service.runtime.store), re.M)
        assert age and float(age[1]) > 0  # two jobs wait: no worker runs here
    finally:
        service.close()


@pytest.mark.parametrize(
    ("settings", "options", "code", "setting"),
    [
        ({"max_job_tiles": 10}, {}, "too_much_work", "UGA_MAX_JOB_TILES"),
        ({}, {"patch_um": 8192}, "patch_too_large", "UGA_MAX_CORRECTION_PX"),
    ],
)
def test_a_job_over_a_work_limit_is_refused_at_submit(tmp_path, slides, settings, options, code, setting):
    service = InProcessService(tmp_path / "data", slides, start_worker=False, **settings)
    try:
        with service.client("annotator") as c:
            r = c.post("/v1/jobs", json={"slide": "a.tif", "options": options})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code and setting in r.json()["error"]["message"]
        assert _jobs(service) == 0
    finally:
        service.close()


def test_a_job_past_its_wall_time_fails_and_leaves_no_scratch(tmp_path, slides):
    service = InProcessService(tmp_path / "data", slides, max_job_s=0.01)
    try:
        with service.client("annotator") as c:
            job = wait_job(c, c.post("/v1/jobs", json={"slide": "a.tif"}).json()["id"], timeout=120)
        assert job["state"] == "failed" and "UGA_MAX_JOB_S" in job["error"]
        text = store_metrics(service.runtime.store)  # QC: failures by reason code
        assert 'uga_job_failures_total{reason="job_timeout"} 1.0' in text
        assert not list((tmp_path / "data" / "jobs" / job["id"]).glob(".work-*"))
    finally:
        service.close()


def test_scratch_of_crashed_jobs_is_removed_at_start_and_a_full_disk_is_not_ready(tmp_path, slides):
    left = tmp_path / "data" / "jobs" / "crashed-job" / ".work-abc"
    left.mkdir(parents=True)
    (left / "probability.raw").write_bytes(b"\0" * 1024)
    os.utime(left, (time.time() - 3600, time.time() - 3600))  # an hour old: its run died
    fresh = tmp_path / "data" / "jobs" / "just-claimed" / ".work-def"  # another worker's run, just begun
    fresh.mkdir(parents=True)
    service = InProcessService(tmp_path / "data", slides, start_worker=False)
    try:
        assert not left.exists() and fresh.exists()
        assert service.runtime.ready()
        service.runtime.settings.min_free_mb = 1e12  # more than any disk has: as good as full
        assert not service.runtime.ready()
        with service.client("viewer") as c:
            health = c.get("/v1/health").json()
        assert health["ready"] is False and health["checks"] == {
            "model_loaded": True,
            "store_writable": True,
            "disk_space": False,
            "job_worker_alive": True,
        }
    finally:
        service.close()


def test_slide_mpp_cannot_override_the_slides_own_metadata(tmp_path, slides):
    service = InProcessService(tmp_path / "data", slides, start_worker=False)
    try:
        with service.client("annotator") as c:
            r = c.post("/v1/jobs", json={"slide": "a.tif", "options": {"slide_mpp": 4, "mpp": 0.25}})
            assert r.status_code == 422 and r.json()["error"]["code"] == "unusable_slide"
            assert "only for slides without it" in r.json()["error"]["message"]
            assert _jobs(service) == 0
            ok = c.post("/v1/jobs", json={"slide": "a.tif", "options": {"slide_mpp": 0.52}})  # within 10 %
            assert ok.status_code == 202
    finally:
        service.close()


def test_cancel_a_queued_job_own_jobs_only_and_resubmit(tmp_path, slides):
    service = InProcessService(tmp_path / "data", slides, start_worker=False)
    try:
        _, other = service.runtime.store.tokens.issue("dr.other", "annotator")
        with service.client("annotator") as c:
            job = c.post("/v1/jobs", json={"slide": "a.tif"}).json()
            r = c.post(f"/v1/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {other}"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_job"
            r = c.post(f"/v1/jobs/{job['id']}/cancel")
            assert r.status_code == 200 and r.json()["state"] == "cancelled"
            assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["error"]["code"] == "job_finished"
            again = c.post("/v1/jobs", json={"slide": "a.tif"})
            assert again.status_code == 202 and again.json()["id"] != job["id"]  # cancelled: a new job
            assert c.get("/v1/jobs", params={"state": "cancelled"}).json()["jobs"][0]["id"] == job["id"]
        with service.client("admin") as c:  # an admin cancels anyone's job
            assert c.post(f"/v1/jobs/{again.json()['id']}/cancel").json()["state"] == "cancelled"
    finally:
        service.close()


def test_cancel_a_running_job_stops_it_and_removes_its_files(tmp_path, slides):
    service = InProcessService(tmp_path / "data", slides)
    try:
        with service.client("annotator") as c:
            job = c.post("/v1/jobs", json={"slide": "a.tif", "options": {"mpp": 0.25}}).json()
            wait_started(c, job["id"], timeout=60)
            r = c.post(f"/v1/jobs/{job['id']}/cancel")
            assert r.status_code == 202 and r.json()["cancel_requested"] is True
            done = wait_job(c, job["id"], timeout=60)
        assert done["state"] == "cancelled" and done["progress"]["done"] < done["progress"]["total"]
        assert not (tmp_path / "data" / "jobs" / job["id"]).exists()
    finally:
        service.close()
