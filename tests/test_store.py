"""The store: migrations of an existing data directory, typed records, one transaction per change."""

from __future__ import annotations

import json
import multiprocessing
import re
import sqlite3
import time

import pytest

from service.store import Job, Store, StoreError
from service.store.db import SCHEMA, SCHEMA_VERSION


def _version_2_store(data_dir) -> None:
    """A data directory as the previous release left it (schema 2: jobs without resolved options)."""
    data_dir.mkdir(parents=True)
    schema_2 = re.sub(r"\n    (resolved|cancel_requested|error_code|site|callback) [^\n]*", "", SCHEMA)
    schema_2 = schema_2.replace(", 'cancelled'", "")
    schema_2 = re.sub(r"CREATE TABLE IF NOT EXISTS deliveries \(.*?\n\);", "", schema_2, flags=re.S)
    schema_2 = re.sub(r"CREATE INDEX IF NOT EXISTS deliveries[^\n]*", "", schema_2)
    schema_2 = re.sub(r",\n    model_dice [^\n]*(\n    withdrawn_[^\n]*)*", "", schema_2)
    schema_2 = re.sub(r"CREATE TABLE IF NOT EXISTS api_tokens \(.*?\n\);", "", schema_2, flags=re.S)
    schema_2 = re.sub(r"CREATE INDEX IF NOT EXISTS api_tokens[^\n]*", "", schema_2)
    newer = "resolved|cancel|api_tokens|model_dice|withdrawn|error_code|site|callback|deliveries"
    assert not re.search(newer, schema_2)
    db = sqlite3.connect(data_dir / "uga.sqlite")
    db.executescript(schema_2 + "PRAGMA user_version=2;")
    db.execute(
        "INSERT INTO jobs (id, dedup_key, slide, options, model_version, state, created_at)"
        " VALUES ('j1', 'k1', 'a.tif', ?, 'v1', 'succeeded', 1.0)",
        (json.dumps({"patch_um": 256}),),
    )
    db.execute(
        "INSERT INTO queue_items (id, job_id, slide, rank, score, measure, item) VALUES ('q1', 'j1', 'a.tif',"
        " 1, 0.5, 'uga', '{}')"
    )
    db.commit()
    db.close()


def test_a_version_2_data_directory_is_migrated_and_keeps_its_jobs(tmp_path):
    _version_2_store(tmp_path / "data")
    store = Store(tmp_path / "data")
    job = store.jobs.get("j1")
    assert isinstance(job, Job) and job.options == {"patch_um": 256} and job.resolved is None
    assert store.db.scalar("SELECT job_id FROM queue_items WHERE id = 'q1'") == "j1"  # its queue kept
    assert store.db.scalar("PRAGMA foreign_key_check") is None
    assert store.db.scalar("PRAGMA user_version") == SCHEMA_VERSION
    new, created = store.jobs.submit(
        slide="a.tif", options={}, resolved={"mpp": 1.0}, model_version="v1", dedup_key="k2", actor="t"
    )
    assert created and store.jobs.get(new.id).resolved == {"mpp": 1.0}
    store.close()
    assert Store(tmp_path / "data").jobs.get("j1").state == "succeeded"  # reopening migrates nothing twice


def test_a_store_from_newer_code_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    db = sqlite3.connect(tmp_path / "data" / "uga.sqlite")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this code"):
        Store(tmp_path / "data")


def test_a_failed_change_writes_nothing(tmp_path):
    store = Store(tmp_path / "data")
    with pytest.raises(RuntimeError), store.db.transaction() as db:
        db.execute(
            "INSERT INTO jobs (id, slide, options, model_version, state, created_at)"
            " VALUES ('x', 'a.tif', '{}', 'v1', 'queued', 1.0)"
        )
        raise RuntimeError("crash inside the transaction")
    assert store.jobs.get("x") is None and store.jobs.counts()["queued"] == 0


def test_a_failed_commit_releases_the_write_lock(tmp_path):
    """A COMMIT that fails (here a deferred foreign key; in life a full disk) rolls back: the
    connection takes the next change, and other processes are not locked out."""
    store = Store(tmp_path / "data")
    with store.db.transaction() as db:
        db.execute("CREATE TABLE parent (id TEXT PRIMARY KEY)")
        db.execute("CREATE TABLE child (p TEXT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError), store.db.transaction() as db:
        db.execute("INSERT INTO child VALUES ('missing')")  # checked only at COMMIT
    assert not store.db.conn().in_transaction
    assert store.db.scalar("SELECT COUNT(*) FROM child") == 0
    other = sqlite3.connect(store.db.path, timeout=0.5)
    other.execute("BEGIN IMMEDIATE")  # "database is locked" while the failed change held it
    other.execute("ROLLBACK")
    other.close()
    with store.db.transaction() as db:
        db.execute("INSERT INTO parent VALUES ('p')")
    assert store.db.scalar("SELECT COUNT(*) FROM parent") == 1


def _open(path: str, start: float) -> str:
    while time.time() < start:
        pass
    try:
        Store(path).close()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("existing", [True, False], ids=["version-2 store", "new store"])
def test_processes_starting_together_migrate_a_store_once(tmp_path, existing):
    if existing:
        _version_2_store(tmp_path / "data")
    start = time.time() + 0.5
    with multiprocessing.get_context("fork").Pool(6) as pool:
        results = pool.starmap(_open, [(str(tmp_path / "data"), start)] * 6)
    assert results == ["ok"] * 6
    store = Store(tmp_path / "data")
    assert store.db.scalar("PRAGMA user_version") == SCHEMA_VERSION
    assert (store.jobs.get("j1") is not None) == existing


def test_a_schema_11_store_gains_the_claims_table(tmp_path):
    Store(tmp_path / "data").close()
    db = sqlite3.connect(tmp_path / "data" / "uga.sqlite")
    db.executescript("DROP TABLE item_claims; PRAGMA user_version=11;")
    db.close()
    store = Store(tmp_path / "data")
    assert store.queue.claim("a.tif", "q1", "dr.a", 60)[0] == "dr.a"
    assert store.db.scalar("PRAGMA user_version") == SCHEMA_VERSION
    store.close()
