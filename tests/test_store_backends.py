"""The store's contract, run on both backends: SQLite in the data directory and a real PostgreSQL.

Several ``Store`` objects on one database stand for several processes or hosts (each has its own
connections): jobs are claimed exactly once, a dead worker's job is requeued and finished by
another, the model pointer is a compare-and-set, corrections are idempotent by content hash, a
failed change writes nothing, and the schema is created once by processes starting together.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.config import Settings, get_settings
from service.errors import Conflict, Gone
from service.http.errors import status_of
from service.http.schemas import job_view
from service.loop.jobs import artifact_path, expire_superseded
from service.loop.worker import sweep_scratch
from service.store import Correction, Store
from service.store.db import SCHEMA_VERSION
from service.store.records import ModelVersion
from service.vocabulary import PROMOTE_ACTIONS


@pytest.fixture
def stores(tmp_path, database_url):
    """Open ``n`` stores ("replicas") on one database; all closed at the end."""
    opened: list[Store] = []

    def open_stores(n: int = 1) -> list[Store]:
        new = [Store(tmp_path / "data", database_url) for _ in range(n)]
        opened.extend(new)
        return new

    yield open_stores
    for store in opened:
        store.close()


def submit(store: Store, i: int | str, slide: str = "a.tif"):
    return store.jobs.submit(
        slide=slide,
        options={"patch_um": 256},
        resolved={"mpp": 1.0},
        model_version="v1",
        dedup_key=f"key-{i}",
        actor="annotator",
    )


def test_identical_submissions_are_one_job_and_limits_hold(stores):
    [store] = stores()
    job, created = submit(store, 1)
    again, created_again = submit(store, 1)
    assert created and not created_again and again.id == job.id
    assert store.jobs.get(job.id).options == {"patch_um": 256}


def test_concurrent_workers_on_several_replicas_claim_every_job_exactly_once(stores):
    replicas = stores(4)
    for i in range(40):
        submit(replicas[0], i)
    claimed: list[str] = []
    lock = threading.Lock()

    def work(replica: Store, name: str) -> None:
        while (job := replica.jobs.claim(name)) is not None:
            with lock:
                claimed.append(job.id)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: work(replicas[k % 4], f"w{k}"), range(8)))
    assert len(claimed) == 40 and len(set(claimed)) == 40, Counter(claimed).most_common(3)
    assert replicas[1].jobs.counts()["running"] == 40


def test_a_dead_workers_job_is_requeued_and_finished_by_another_replica(stores):
    a, b = stores(2)
    job, _ = submit(a, 1)
    assert a.jobs.claim("host-a").id == job.id
    time.sleep(0.05)  # host-a dies: no heartbeat from now on
    assert b.jobs.recover_stale(stale_after_s=0.01) == [job.id]
    taken = b.jobs.claim("host-b")
    assert taken.id == job.id and taken.attempts == 2
    assert a.jobs.heartbeat(job.id, "host-a") is None  # no longer host-a's: it stops
    box = {"x": 0, "y": 0, "width": 64, "height": 64}
    queue = [
        {"id": "q1", "rank": 1, "score": 0.9, "measure": "uga", "scoring": "mean", "bbox_level0": box, "bbox_um": box}
        | {"mean_uncertainty": 0.9, "mean_probability": 0.4, "tissue_fraction": 1.0, "model_version": "v1"}
    ]
    assert b.jobs.finish(job.id, "host-b", {"model_version": "v1", "tiles": 3}, queue)
    done = a.jobs.get(job.id)
    assert done.state == "succeeded" and done.summary == {"model_version": "v1", "tiles": 3}
    assert [i.id for i in a.queue.pending("a.tif", 5)] == ["q1"]
    assert a.queue.set_status("a.tif", "q1", "corrected", "annotator")
    assert a.queue.status_counts()["corrected"] == 1 and a.queue.pending("a.tif", 5) == []
    with pytest.raises(Conflict):  # a skip that looked before the correction committed (another replica)
        b.queue.set_status("a.tif", "q1", "skipped", "other")
    assert a.queue.status_counts()["corrected"] == 1


def test_a_replica_whose_clock_runs_ahead_does_not_requeue_a_live_job(stores, monkeypatch):
    """Heartbeats and the stale cutoff are both the database's clock: a host an hour ahead (or behind)
    cannot take a job from a worker that is beating."""
    a, b = stores(2)
    job, _ = submit(a, 1)
    assert a.jobs.claim("host-a").id == job.id
    host_clock = time.time
    monkeypatch.setattr(time, "time", lambda: host_clock() + 3600)  # host b's clock is an hour ahead
    assert b.jobs.recover_stale(stale_after_s=60) == []
    assert a.jobs.heartbeat(job.id, "host-a") is False  # still host-a's, not cancelled


def _finished_with_queue(store: Store, slide: str, scores: list[float]) -> list[str]:
    """A finished job of ``slide`` whose queue ranks its items in the order given (rank 1 first)."""
    job, _ = submit(store, slide, slide=slide)
    assert store.jobs.claim("w").id == job.id
    box = {"x": 0, "y": 0, "width": 64, "height": 64}
    queue = [
        {"id": f"{slide}-{rank}", "rank": rank, "score": score, "measure": "uga", "scoring": "mean"}
        | {"bbox_level0": box, "bbox_um": box, "mean_uncertainty": score, "mean_probability": 0.4}
        | {"tissue_fraction": 1.0, "model_version": "v1"}
        for rank, score in enumerate(scores, 1)
    ]
    assert store.jobs.finish(job.id, "w", {"model_version": "v1"}, queue)
    return [i["id"] for i in queue]


def test_the_pooled_queue_takes_every_slides_patches_in_turn_and_each_slide_in_its_selections_order(stores):
    """A slide far out of domain (all its scores high) must not take the whole pooled queue; within a
    slide the selection's order (e.g. class-balanced alternation) is kept, not re-sorted by score."""
    [store] = stores()
    hot = _finished_with_queue(store, "hot.tif", [0.95, 0.90, 0.85])
    cool = _finished_with_queue(store, "cool.tif", [0.30, 0.50, 0.20])  # a strategy's order, not score order
    assert [i.id for i in store.queue.pending("cool.tif", 10)] == cool
    assert [i.id for i in store.queue.pending(None, 4)] == [hot[0], cool[0], hot[1], cool[1]]
    assert store.queue.set_status("hot.tif", hot[0], "corrected", "annotator")
    assert [i.id for i in store.queue.pending(None, 3)] == [cool[0], hot[1], cool[1]]  # cool.tif catches up


def test_holds_are_timed_by_the_databases_clock(stores, monkeypatch):
    """A replica whose host clock runs an hour ahead neither sees a live hold as lapsed nor takes it."""
    a, b = stores(2)
    [item, *_] = _finished_with_queue(a, "held.tif", [0.9, 0.8])
    assert a.queue.claim("held.tif", item, "dr.a", hold_s=60)[0] == "dr.a"
    host_clock = time.time
    monkeypatch.setattr(time, "time", lambda: host_clock() + 3600)
    assert b.queue.holder("held.tif", item)[0] == "dr.a"
    assert b.queue.claim("held.tif", item, "dr.b", hold_s=60)[0] == "dr.a"
    assert item not in [i.id for i in b.queue.pending("held.tif", 5, reviewer="dr.b")]


def test_a_replica_whose_clock_runs_ahead_does_not_take_a_delivery_being_sent(stores, monkeypatch):
    a, b = stores(2)
    job, _ = a.jobs.submit(
        slide="a.tif", options={}, resolved={}, model_version="v1", dedup_key="k", actor="x", callback="lis"
    )
    a.jobs.claim("w")
    a.jobs.fail(job.id, "w", "boom", "internal_error")  # its end event is due
    lease = a.deliveries.claim(lease_s=30.0)
    assert lease is not None
    host_clock = time.time
    monkeypatch.setattr(time, "time", lambda: host_clock() + 3600)  # host b's clock is an hour ahead
    assert b.deliveries.claim(lease_s=30.0) is None  # a's lease is live on the database's clock


def test_a_clients_job_is_claimed_before_an_earlier_rescoring_and_their_waits_are_apart(stores):
    """After a promotion every slide is queued again: a pathologist's new slide must not wait behind them."""
    [store] = stores()
    rescoring, _ = store.jobs.submit(
        slide="old.tif", options={}, resolved={}, model_version="v2", dedup_key="r", actor=None, origin="rescoring"
    )
    time.sleep(0.01)
    client, _ = submit(store, 1, slide="new.tif")
    ages = store.jobs.oldest_queued_age_s()
    assert ages["rescoring"] > ages["client"] > 0
    assert store.jobs.claim("w").id == client.id
    assert store.jobs.oldest_queued_age_s()["client"] == 0.0
    assert store.jobs.claim("w").id == rescoring.id


def test_the_model_pointer_is_a_compare_and_set_across_replicas(stores):
    a, b, c = stores(3)
    for version in ("v1", "v2", "v3"):
        a.models.register(ModelVersion(version, "sha-" + version, f"models/{version}", "promoted", time.time()))
    assert a.models.move_pointer("v1", action="baseline", actor=None)
    # two replicas race to move it from v1: exactly one wins
    with ThreadPoolExecutor(2) as pool:
        won = list(pool.map(lambda args: args[0].models.move_pointer(args[1], action="promote", actor="x", expect="v1"),
                            [(b, "v2"), (c, "v3")]))  # fmt: skip
    assert sorted(won) == [False, True]
    winner = "v2" if won[0] else "v3"
    assert a.models.current() == winner
    assert [h["version"] for h in a.models.pointer_history()] == [winner, "v1"]
    assert a.models.count_actions(PROMOTE_ACTIONS) == 1


def test_one_process_of_the_deployment_holds_the_runner_lease(stores):
    a, b = stores(2)
    lease = a.try_lease("runner")
    assert lease is not None and lease.held()
    assert b.try_lease("runner") is None  # a second runner, on this host or another: refused
    other = b.try_lease("other")
    assert other is not None  # leases are by name
    other.release()
    lease.release()  # the first runner ends
    assert not lease.held()
    again = b.try_lease("runner")
    assert again is not None
    again.release()


def test_a_postgres_lease_is_lost_with_its_connection_and_says_so(stores, database_url):
    if not database_url:
        pytest.skip("a SQLite lease is a file lock: it cannot be lost while the process lives")
    import psycopg

    a, b = stores(2)
    lease = a.try_lease("runner")
    with psycopg.connect(database_url, autocommit=True) as admin:  # a failover ends every session
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    assert not lease.held()  # the runner learns it is no longer the one
    again = b.try_lease("runner")
    assert again is not None  # and another can take over
    again.release()


def test_corrections_are_idempotent_by_content_hash_and_audited(stores):
    a, b = stores(2)
    record = Correction("c" * 64, "a.tif", 0, 0, 64, 64, 1.0, "annotator", 0.25, 0, time.time(), model_dice=0.5)
    assert a.corrections.add(record, "annotator") is True
    assert b.corrections.add(record, "annotator") is False
    assert a.corrections.count() == 1 and b.corrections.get(record.id) == record
    assert [e["action"] for e in a.audit_log()].count("correction.ingest") == 1
    withdrawn = b.corrections.withdraw(record.id, "dr.qc", "off-slide")  # on another replica
    assert (withdrawn.withdrawn_by, withdrawn.withdrawn_reason) == ("dr.qc", "off-slide")
    assert a.corrections.unseen() == [] and a.corrections.withdrawn_among({"train": [record.id]}) == [record.id]
    assert a.corrections.add(record, "annotator") is True  # sent again: reinstated
    assert b.corrections.get(record.id) == record and [c.id for c in b.corrections.unseen()] == [record.id]


def test_a_failed_change_writes_nothing(stores):
    [store] = stores()
    with pytest.raises(RuntimeError), store.db.transaction() as db:
        db.execute("INSERT INTO audit (at, actor, action, target) VALUES (?, ?, ?, ?)", (1.0, "x", "probe", "t"))
        raise RuntimeError("boom")
    assert store.db.scalar("SELECT COUNT(*) FROM audit WHERE action = 'probe'") == 0


@pytest.mark.e2e
def test_postgres_changes_run_read_committed_whatever_the_servers_default(postgres, tmp_path):
    """Under a REPEATABLE READ default each change's snapshot would predate the write lock, and
    check-then-write steps (one open fine-tune run, one correction per hash) would read stale rows."""
    import psycopg

    url = postgres.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        conn.execute(f"ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'")
    with psycopg.connect(url) as conn:
        assert conn.execute("SHOW transaction_isolation").fetchone()[0] == "repeatable read"
    a, b = Store(tmp_path / "a", url), Store(tmp_path / "b", url)
    try:
        with a.db.transaction() as db:
            assert db.execute("SHOW transaction_isolation").fetchone()["transaction_isolation"] == "read committed"
        answer: list = []
        with a.db.transaction() as db:  # a requests a run and holds the write lock while b asks too
            db.execute(
                "INSERT INTO finetune_runs (id, state, trigger, requested_by, created_at)"
                " VALUES ('first', 'requested', 'admin', 'x', 1.0)"
            )
            asking = threading.Thread(target=lambda: answer.append(b.runs.request("admin", "y")))
            asking.start()
            time.sleep(0.5)  # b waits for the lock (its snapshot, under the default, taken now)
        asking.join(10)
        assert answer and answer[0][0].id == "first" and answer[0][1] is False
    finally:
        a.close()
        b.close()


def test_fine_tune_runs_and_tokens(stores):
    a, b = stores(2)
    run, created = a.runs.request("admin", "alice")
    same, created_again = b.runs.request("threshold", "runner")
    assert created and not created_again and same.id == run.id
    b.runs.start(run.id, "v1", {"train": ["c1"], "holdout": []}, total=10)
    b.runs.progress(run.id, 4, 12)  # the fine-tune's own total (steps scaled with corrected area)
    assert (a.runs.get(run.id).progress_done, a.runs.get(run.id).progress_total) == (4, 12)
    b.runs.end(run.id, "promoted", candidate="v2", metrics={"passed": True, "duration_s": 1.5}, reason=None)
    ended = a.runs.get(run.id)
    assert ended.state == "promoted" and ended.metrics["duration_s"] == 1.5 and ended.corrections["train"] == ["c1"]
    assert a.runs.counts()["promoted"] == 1
    token, secret = a.tokens.issue("alice", "annotator")
    assert b.tokens.verify(secret).name == "alice"
    b.tokens.revoke("alice")
    assert a.tokens.verify(secret) is None


def test_timestamps_keep_full_precision(stores):
    [store] = stores()
    job, _ = submit(store, 1)
    assert store.jobs.get(job.id).created_at == job.created_at  # 8-byte floats, not 4-byte REAL
    assert abs(job.created_at - time.time()) < 60


def _open(data_dir, url, ready) -> None:
    ready.wait()
    Store(data_dir, url).close()


def test_processes_opening_a_new_store_together_create_its_schema_once(tmp_path, database_url):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    procs = [ctx.Process(target=_open, args=(tmp_path / "data", database_url, ready)) for _ in range(6)]
    for p in procs:
        p.start()
    ready.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    store = Store(tmp_path / "data", database_url)
    try:
        if database_url:
            assert store.db.scalar("SELECT COUNT(*) FROM uga_schema") == 1
        assert store.jobs.counts()["queued"] == 0
    finally:
        store.close()


@pytest.mark.e2e
def test_an_embedded_store_is_copied_into_postgresql_with_one_command(tmp_path, postgres, monkeypatch, capsys):
    from service.cli import main

    sqlite = Store(tmp_path / "data")
    job, _ = submit(sqlite, 1)
    sqlite.models.register(ModelVersion("v1", "sha", "models/v1", "baseline", time.time()))
    sqlite.models.move_pointer("v1", action="init", actor="system")
    sqlite.tokens.issue("alice", "admin")
    before = sqlite.audit_log()
    sqlite.close()
    url = postgres.new_database()
    monkeypatch.setenv("UGA_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()  # another test in this process may have read the settings of its own environment
    assert main(["store", "copy", "--to", url]) == 0
    assert "jobs\t1" in capsys.readouterr().out
    copied = Store(tmp_path / "data", url)
    try:
        assert copied.jobs.get(job.id) == job and copied.models.current() == "v1"
        assert [(e["id"], e["action"]) for e in copied.audit_log()] == [(e["id"], e["action"]) for e in before]
        assert copied.tokens.list()[0].name == "alice"
        copied.tokens.issue("bob", "viewer")  # new rows take ids after the copied ones
        assert copied.audit_log()[0]["id"] == before[0]["id"] + 1
        assert main(["store", "copy", "--to", url]) == 2  # never into a database that has data
        assert "not empty" in capsys.readouterr().err
    finally:
        copied.close()


@pytest.mark.e2e
def test_a_lost_database_is_unavailable_not_a_bug(tmp_path, postgres):
    from service.errors import Unavailable
    from tests.postgres import PostgresServer

    private = PostgresServer().start()  # one this test may stop
    store = Store(tmp_path / "data", private.new_database(), timeout_s=2)
    try:
        assert store.writable() and store.jobs.counts()["queued"] == 0
        private.stop()
        assert store.writable() is False  # /readyz: this replica takes no traffic
        with pytest.raises(Unavailable) as caught:
            store.jobs.counts()
        assert caught.value.code == "store_unavailable"
        with pytest.raises(Unavailable):
            submit(store, 1)
    finally:
        store.close()


def test_a_callback_event_commits_with_the_jobs_end_and_is_leased_to_one_sender(stores):
    replicas = stores(4)
    job, _ = replicas[0].jobs.submit(
        slide="a.tif", options={}, resolved={}, model_version="v1", dedup_key="k", actor="x", callback="lis"
    )
    replicas[0].jobs.claim("w")
    assert replicas[0].deliveries.for_job(job.id) == []  # nothing before the job ends
    replicas[0].jobs.fail(job.id, "w", "boom", "internal_error")
    [event] = replicas[1].deliveries.for_job(job.id)
    assert event.event == "job.failed" and event.state == "pending"
    with ThreadPoolExecutor(4) as pool:
        leased = [d for d in pool.map(lambda s: s.deliveries.claim(30.0), replicas) if d is not None]
    assert [d.id for d in leased] == [event.id] and leased[0].attempts == 1


@pytest.mark.e2e
def test_a_schema_8_postgresql_store_is_upgraded_in_place(tmp_path, postgres):
    url = postgres.new_database()
    Store(tmp_path / "data", url).close()
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:  # as the previous release left it
        conn.execute("DROP TABLE deliveries")
        conn.execute("ALTER TABLE jobs DROP COLUMN callback")
        conn.execute("ALTER TABLE jobs DROP COLUMN expired_at")
        for column in ("withdrawn_at", "withdrawn_by", "withdrawn_reason"):
            conn.execute(f"ALTER TABLE corrections DROP COLUMN {column}")
        conn.execute("UPDATE uga_schema SET version = 8")
    store = Store(tmp_path / "data", url)
    try:
        job, _ = submit(store, 1)
        assert store.jobs.get(job.id).callback is None and store.deliveries.list() == []
        assert store.jobs.get(job.id).expired_at is None
        fix = Correction("d" * 64, "a.tif", 0, 0, 64, 64, 1.0, "dr.a", 0.25, 0, time.time())
        assert store.corrections.add(fix, "dr.a") and store.corrections.withdraw(fix.id, "dr.a", "x").withdrawn_at
        assert store.db.scalar("SELECT version FROM uga_schema") == SCHEMA_VERSION
    finally:
        store.close()


def test_retention_removes_only_long_superseded_jobs_files_and_their_artifacts_answer_410(stores, tmp_path):
    """A job loses its files once a newer job of its slide has served for the retention, unless a
    correction was made on it; its row stays, its artifacts answer 410, and asking again runs it again."""
    [store] = stores()
    settings = Settings(data_dir=tmp_path / "data", job_retention_days=30)
    day = 86400.0

    def finished(i: int, slide: str, age_days: float, items: tuple[str, ...] = ()) -> str:
        job, _ = submit(store, i, slide)
        store.jobs.claim("w")
        queue = [{"id": q, "rank": r, "score": 1.0, "measure": "uga"} for r, q in enumerate(items)]
        assert store.jobs.finish(job.id, "w", {"model_version": "v1"}, queue)
        with store.db.transaction() as db:
            db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (time.time() - age_days * day, job.id))
        store.job_dir(job.id).mkdir(parents=True, exist_ok=True)
        (store.job_dir(job.id) / "mask.tif").write_bytes(b"mask")
        return job.id

    old_a, latest_a = finished(1, "a.tif", 90), finished(2, "a.tif", 60)  # superseded 60 days ago
    corrected_b, latest_b = finished(3, "b.tif", 90, ("item-b",)), finished(4, "b.tif", 40)
    old_c, latest_c = finished(5, "c.tif", 400), finished(6, "c.tif", 5)  # old, but superseded 5 days ago
    lone_d = finished(7, "d.tif", 400)  # nothing replaced it
    fix = Correction("c" * 64, "b.tif", 0, 0, 64, 64, 1.0, "dr.a", 0.2, 0, time.time(), queue_item_id="item-b")
    assert store.corrections.add(fix, "dr.a")

    assert expire_superseded(store, settings) == [old_a]
    assert not store.job_dir(old_a).exists() and store.jobs.get(old_a).expired_at is not None
    for kept in (latest_a, corrected_b, latest_b, old_c, latest_c, lone_d):
        assert (store.job_dir(kept) / "mask.tif").exists() and store.jobs.get(kept).expired_at is None
    with pytest.raises(Gone, match="UGA_JOB_RETENTION_DAYS") as gone:
        artifact_path(store, old_a, "mask")
    assert gone.value.code == "artifacts_expired" and status_of(gone.value) == 410
    view = job_view(store.jobs.get(old_a), "/v1")
    assert view.expired_at is not None and view.artifacts == {}  # no links to files that are gone
    assert expire_superseded(store, settings) == []  # a second pass finds nothing more
    assert expire_superseded(store, Settings(data_dir=tmp_path / "data", job_retention_days=0), time.time() * 2) == []

    again, created = submit(store, 1, "a.tif")  # the same request as the expired job: a new run of it
    assert created and again.id != old_a and again.state == "queued"
    assert not store.jobs.mark_expired(corrected_b)  # a correction on it: never marked, whatever the caller

    store.jobs.mark_expired(old_c)  # a crash between the mark and the removal of its files ...
    sweep_scratch(store, older_than_s=0)  # ... is finished by the next start's sweep
    assert not store.job_dir(old_c).exists() and (store.job_dir(latest_c) / "mask.tif").exists()


def test_a_patch_is_held_by_one_reviewer_across_replicas(stores):
    a, b = stores(2)
    assert a.queue.claim("a.tif", "q1", "dr.a", 60)[0] == "dr.a"
    holder, until = b.queue.claim("a.tif", "q1", "dr.b", 60)  # another replica, another reviewer
    assert holder == "dr.a" and until > time.time() + 50
    b.queue.release("a.tif", "q1", "dr.b")  # not theirs: stays
    assert a.queue.holder("a.tif", "q1")[0] == "dr.a"
    assert b.queue.claim("a.tif", "q2", "dr.a", 60)[0] == "dr.a"  # one patch per reviewer
    assert b.queue.holder("a.tif", "q1") is None
    a.queue.release("a.tif", "q2", None)  # an admin's
    assert b.queue.claim("a.tif", "q2", "dr.b", 60)[0] == "dr.b"
