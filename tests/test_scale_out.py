"""Scale-out, end to end: two `uga serve` replicas and one `uga runner` on one real PostgreSQL.

The replicas share the artifact root (as on a ReadWriteMany volume) and nothing else: each has its
own processes and BentoML home. Jobs submitted through both are each processed exactly once;
`kill -9` of a replica mid-job gets the job requeued and finished by the other; corrections through
replica A make the runner promote a new version, both replicas swap to it, and steady traffic
through the swap sees no failed request.
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from tests.server import RunnerProcess, Server, correct_disagreeing, finished_run, wait_for, wait_job

pytestmark = pytest.mark.e2e
ENV = {
    "UGA_WORKERS": "1",
    "UGA_JOB_STALE_S": "3",
    "UGA_FINETUNE_MIN_CORRECTIONS": "5",
    "UGA_FINETUNE_STEPS": "10",
    "UGA_FINETUNE_THREADS": "2",
    "UGA_HOLDOUT_EVERY": "0",
    "UGA_GATE_MARGIN": "1.0",  # the gate's judgement is tested elsewhere; here: promotion across hosts
    "UGA_RUNNER_POLL_S": "1",
    "UGA_MODEL_POLL_S": "0.5",
}
SLIDES = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres, ood_slide):
    root = tmp_path_factory.mktemp("scale-out")
    slides = root / "slides"
    slides.mkdir()
    for i in range(SLIDES):
        shutil.copy(ood_slide, slides / f"s{i}.tif")
    env = {**ENV, "UGA_DATABASE_URL": postgres.new_database()}
    shared = root / "shared"  # the artifact root every replica mounts
    a = Server(shared, slides, name="replica-a", **env).start()
    b = Server(shared, slides, name="replica-b", **env).start()
    state = {"a": a, "b": b, "runner": None}
    yield state
    for key in ("runner", "b", "a"):
        if state[key] is not None:
            state[key].stop()


def worker_pid(job: dict) -> int:
    return int(job["worker"].rsplit("-", 1)[1])


def test_jobs_through_both_replicas_are_each_processed_once_by_either(cluster):
    a, b = cluster["a"], cluster["b"]
    ids = []
    for i in range(SLIDES):
        replica = (a, b)[i % 2]
        with replica.client("annotator") as c:
            r = c.post("/v1/jobs", json={"slide": f"s{i}.tif", "options": {"patch_um": 512, "queue_size": 2}})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
    with a.client("viewer") as c:
        jobs = [wait_job(c, job_id) for job_id in ids]
        details = [c.get(f"/v1/jobs/{j['id']}").json() for j in jobs]
    assert [j["state"] for j in jobs] == ["succeeded"] * SLIDES
    with b.client("admin") as c:  # the same jobs, whichever replica is asked
        assert {j["id"] for j in c.get("/v1/jobs", params={"limit": 50}).json()["jobs"]} >= set(ids)
    from service.store import Store

    store = Store(a.data_dir, a.extra_env["UGA_DATABASE_URL"])
    try:
        ran = [store.jobs.get(job_id) for job_id in ids]
    finally:
        store.close()
    assert [j.attempts for j in ran] == [1] * SLIDES  # each claimed once
    hosts = {("a" if int(j.worker.rsplit("-", 1)[1]) in a.pids() else "b") for j in ran}
    assert hosts == {"a", "b"}, "both replicas took work"
    assert all(d["artifacts"] for d in details)


def test_a_killed_replicas_job_is_requeued_and_finished_by_the_other(cluster):
    a, b = cluster["a"], cluster["b"]
    b_pids = b.pids()
    with b.client("annotator") as c:
        ids = [
            c.post("/v1/jobs", json={"slide": f"s{i}.tif", "options": {"patch_um": 256, "queue_size": 3}}).json()["id"]
            for i in range(2)
        ]

    def running_on_b():
        with a.client("viewer") as c:
            for job_id in ids:
                job = c.get(f"/v1/jobs/{job_id}").json()
                if job["state"] == "running" and job["progress"]["done"] > 0:
                    from service.store import Store

                    store = Store(a.data_dir, a.extra_env["UGA_DATABASE_URL"])
                    try:
                        worker = store.jobs.get(job_id).worker
                    finally:
                        store.close()
                    if int(worker.rsplit("-", 1)[1]) in b_pids:
                        return job_id
        return None

    victim = wait_for(running_on_b, timeout=120, interval=0.2, what="a job running on replica b")
    b.kill()
    with a.client("viewer") as c:
        done = [wait_job(c, job_id, timeout=300) for job_id in ids]
    assert [j["state"] for j in done] == ["succeeded", "succeeded"]
    from service.store import Store

    store = Store(a.data_dir, a.extra_env["UGA_DATABASE_URL"])
    try:
        job = store.jobs.get(victim)
    finally:
        store.close()
    assert job.attempts == 2 and int(job.worker.rsplit("-", 1)[1]) in a.pids()
    b.start()  # the replica comes back (as Kubernetes restarts it)


def test_corrections_through_a_promote_and_both_replicas_swap_without_a_failed_request(cluster):
    a, b = cluster["a"], cluster["b"]
    with a.client("annotator") as c:
        items = c.get("/v1/queue", params={"k": 5}).json()["items"]
        assert len(items) == 5
        baseline = items[0]["model_version"]
        correct_disagreeing(c, items)
    failures, answered, stop = [], [0], threading.Event()

    def traffic(replica: Server) -> None:  # a bounded load generator: 2 clients per replica
        with replica.client("viewer") as c:
            while not stop.is_set():
                for url in ("/v1/models/current", "/v1/queue?k=3", "/v1/jobs?limit=5"):
                    try:
                        r = c.get(url)
                        if r.status_code != 200:
                            failures.append((replica.name, url, r.status_code))
                    except httpx.HTTPError as exc:
                        failures.append((replica.name, url, repr(exc)))
                    answered[0] += 1

    threads = [threading.Thread(target=traffic, args=(r,), daemon=True) for r in (a, b, a, b)]
    for t in threads:
        t.start()
    cluster["runner"] = RunnerProcess(a).start()
    try:
        with a.client("admin") as c:
            run = finished_run(c)
            assert run["state"] == "promoted", run
        new = run["candidate"]
        started = time.monotonic()
        for replica in (a, b):
            with replica.client("viewer") as c:
                wait_for(
                    lambda c=c: c.get("/v1/models/current").json()["served_by_this_worker"] == new,
                    timeout=60,
                    interval=0.25,
                    what=f"{replica.name} serving {new}",
                )
        swap_s = time.monotonic() - started
        time.sleep(2)  # traffic goes on after the swap
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert new != baseline
    print(f"both replicas on {new} {swap_s:.1f} s after the promotion was seen; {answered[0]} requests")
    assert answered[0] > 50 and failures == [], failures[:5]
