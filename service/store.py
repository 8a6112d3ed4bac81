"""Durable metadata store: SQLite in WAL mode, one transaction per change, plus the blob directory.

Tables: jobs, queue_items (per finished job), item_status (skipped / corrected, per slide region),
audit. Every write happens inside ``BEGIN IMMEDIATE ... COMMIT`` with ``synchronous=FULL``, so a
change acknowledged to a client survives a crash.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    dedup_key TEXT UNIQUE,
    slide TEXT NOT NULL,
    options TEXT NOT NULL,
    model_version TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    progress_done INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    summary TEXT,
    submitted_by TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_slide ON jobs (slide, finished_at);
CREATE TABLE IF NOT EXISTS queue_items (
    id TEXT NOT NULL,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    slide TEXT NOT NULL,
    rank INTEGER NOT NULL,
    score REAL NOT NULL,
    measure TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (job_id, id)
);
CREATE INDEX IF NOT EXISTS queue_by_item ON queue_items (id);
CREATE TABLE IF NOT EXISTS item_status (
    slide TEXT NOT NULL,
    item_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('skipped', 'corrected')),
    actor TEXT,
    at REAL NOT NULL,
    PRIMARY KEY (slide, item_id)
);
CREATE TABLE IF NOT EXISTS corrections (
    id TEXT PRIMARY KEY,                -- content hash: same correction twice = one record
    slide TEXT NOT NULL,
    x INTEGER NOT NULL, y INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,  -- level 0
    mpp REAL NOT NULL,                  -- µm/px of the stored image crop and mask
    queue_item_id TEXT,
    proposed_by_version TEXT,
    annotator TEXT NOT NULL,
    tumour_fraction REAL NOT NULL,
    holdout INTEGER NOT NULL DEFAULT 0, -- held out from training, used by the promotion gate
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_versions (
    version TEXT PRIMARY KEY,
    parent TEXT,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('baseline', 'promoted', 'rejected', 'failed', 'candidate')),
    reason TEXT,
    metrics TEXT,
    corrections TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_pointer (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version TEXT NOT NULL REFERENCES model_versions (version),
    changed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pointer_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    version TEXT NOT NULL,
    previous TEXT,
    action TEXT NOT NULL,
    actor TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS finetune_runs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('requested', 'running', 'promoted', 'rejected', 'failed')),
    trigger TEXT NOT NULL,
    parent TEXT,
    candidate TEXT,
    corrections TEXT,
    progress_done INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    metrics TEXT,
    reason TEXT,
    requested_by TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT,
    action TEXT NOT NULL,
    target TEXT,
    details TEXT
);
"""
JOB_STATES = ("queued", "running", "succeeded", "failed")
# Queue items of each slide's latest finished job that nobody corrected or skipped yet.
PENDING_ITEMS = """
    FROM queue_items qi JOIN jobs j ON j.id = qi.job_id
    WHERE j.finished_at = (SELECT MAX(j2.finished_at) FROM jobs j2 WHERE j2.slide = j.slide AND j2.state = 'succeeded')
      AND NOT EXISTS (SELECT 1 FROM item_status s WHERE s.slide = qi.slide AND s.item_id = qi.id)
"""


class StoreError(RuntimeError):
    pass


def _row(r: sqlite3.Row | None) -> dict | None:
    if r is None:
        return None
    d = dict(r)
    for key in ("options", "summary", "item", "details", "metrics", "corrections"):
        if d.get(key):
            d[key] = json.loads(d[key])
    return d


class Store:
    """Thread-safe access (one connection per thread) to ``<data_dir>/uga.sqlite`` and the blob dirs."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / "uga.sqlite"
        self.jobs_dir = self.data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

    # -- connection handling -------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable change: BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _migrate(self) -> None:
        db = self._conn()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"store {self.db_path} has schema {version}, newer than this code ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            db.executescript("BEGIN IMMEDIATE;" + SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def writable(self) -> bool:
        """True when the data directory takes a file and the database a write lock within a second (/readyz)."""
        try:
            with tempfile.NamedTemporaryFile(dir=self.data_dir, prefix=".ready-"):
                pass
            probe = sqlite3.connect(self.db_path, timeout=1.0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
            finally:
                probe.close()
            return True
        except (OSError, sqlite3.Error):
            return False

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- audit -----------------------------------------------------------------------------
    @staticmethod
    def _audit(db: sqlite3.Connection, actor: str | None, action: str, target: str, details: Any = None) -> None:
        db.execute(
            "INSERT INTO audit (at, actor, action, target, details) VALUES (?, ?, ?, ?, ?)",
            (time.time(), actor, action, target, json.dumps(details) if details is not None else None),
        )

    def audit_log(self, limit: int = 100) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]

    # -- jobs ------------------------------------------------------------------------------
    def submit_job(
        self, *, slide: str, options: dict, model_version: str, dedup_key: str, actor: str | None
    ) -> tuple[dict, bool]:
        """Create a queued job, or return the existing one with the same key. Returns (job, created).

        A failed job with the same key is retried as a new job (its key is released).
        """
        with self.transaction() as db:
            existing = db.execute("SELECT * FROM jobs WHERE dedup_key = ?", (dedup_key,)).fetchone()
            if existing is not None and existing["state"] != "failed":
                return _row(existing), False
            if existing is not None:
                db.execute("UPDATE jobs SET dedup_key = NULL WHERE id = ?", (existing["id"],))
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (id, dedup_key, slide, options, model_version, state, submitted_by, created_at)"
                " VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                (job_id, dedup_key, slide, json.dumps(options), model_version, actor, time.time()),
            )
            self._audit(db, actor, "job.submit", job_id, {"slide": slide, "options": options})
            return _row(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()), True

    def get_job(self, job_id: str) -> dict | None:
        return _row(self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list_jobs(self, state: str | None = None, limit: int = 50) -> list[dict]:
        q, args = "SELECT * FROM jobs", []
        if state:
            q += " WHERE state = ?"
            args.append(state)
        q += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        return [_row(r) for r in self._conn().execute(q, args).fetchall()]

    def job_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        for r in self._conn().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts

    def claim_job(self, worker: str) -> dict | None:
        """Atomically take the oldest queued job for ``worker``."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "UPDATE jobs SET state = 'running', worker = ?, started_at = ?, heartbeat_at = ?,"
                " attempts = attempts + 1, progress_done = 0"
                " WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at LIMIT 1)"
                " RETURNING *",
                (worker, now, now),
            ).fetchone()
            return _row(row)

    def heartbeat(self, job_id: str, worker: str, done: int | None = None, total: int | None = None) -> None:
        with self.transaction() as db:
            if done is None:
                db.execute(
                    "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND worker = ? AND state = 'running'",
                    (time.time(), job_id, worker),
                )
            else:
                db.execute(
                    "UPDATE jobs SET heartbeat_at = ?, progress_done = ?, progress_total = ?"
                    " WHERE id = ? AND worker = ? AND state = 'running'",
                    (time.time(), done, total, job_id, worker),
                )

    def finish_job(self, job_id: str, worker: str, summary: dict, queue: list[dict]) -> bool:
        """Record success and the job's queue in one transaction. False if the job was taken away."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'succeeded', summary = ?, model_version = ?, finished_at = ?,"
                " progress_done = progress_total, error = NULL WHERE id = ? AND worker = ? AND state = 'running'",
                (json.dumps(summary), summary["model_version"], time.time(), job_id, worker),
            )
            if cur.rowcount != 1:
                return False
            slide = db.execute("SELECT slide FROM jobs WHERE id = ?", (job_id,)).fetchone()["slide"]
            db.executemany(
                "INSERT INTO queue_items (id, job_id, slide, rank, score, measure, item) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(q["id"], job_id, slide, q["rank"], q["score"], q["measure"], json.dumps(q)) for q in queue],
            )
            return True

    def fail_job(self, job_id: str, worker: str | None, error: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ? AND state = 'running'"
                + (" AND worker = ?" if worker else ""),
                (error, time.time(), job_id, *([worker] if worker else [])),
            )

    def requeue(self, job_id: str, worker: str) -> None:
        """Give a running job back to the queue (clean shutdown of its worker)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL, attempts = MAX(0, attempts - 1)"
                " WHERE id = ? AND worker = ? AND state = 'running'",
                (job_id, worker),
            )

    def recover_stale_jobs(self, stale_after_s: float, max_attempts: int = 2) -> list[str]:
        """Running jobs whose worker stopped beating: requeue (or fail after ``max_attempts``)."""
        cutoff = time.time() - stale_after_s
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id, attempts FROM jobs WHERE state = 'running' AND heartbeat_at < ?", (cutoff,)
            ).fetchall()
            for r in rows:
                if r["attempts"] >= max_attempts:
                    db.execute(
                        "UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE id = ?",
                        (
                            time.time(),
                            f"interrupted {r['attempts']} times (worker stopped); resubmit",
                            r["id"],
                        ),
                    )
                else:
                    db.execute("UPDATE jobs SET state = 'queued', worker = NULL WHERE id = ?", (r["id"],))
                self._audit(db, "system", "job.recover", r["id"], {"attempts": r["attempts"]})
            return [r["id"] for r in rows]

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # -- queue -----------------------------------------------------------------------------
    def latest_job_for_slide(self, slide: str) -> dict | None:
        return _row(
            self._conn()
            .execute(
                "SELECT * FROM jobs WHERE slide = ? AND state = 'succeeded' ORDER BY finished_at DESC LIMIT 1",
                (slide,),
            )
            .fetchone()
        )

    def segmented_slides(self) -> list[str]:
        rows = self._conn().execute("SELECT DISTINCT slide FROM jobs WHERE state = 'succeeded'").fetchall()
        return [r[0] for r in rows]

    def pending_queue(self, slide: str | None, k: int, measure: str | None = None) -> list[dict]:
        """Pending items of each slide's latest finished job, best score first (one slide or pooled)."""
        q = "SELECT qi.item, qi.slide, qi.job_id " + PENDING_ITEMS
        args: list[Any] = []
        if slide is not None:
            q += " AND qi.slide = ?"
            args.append(slide)
        if measure is not None:
            q += " AND qi.measure = ?"
            args.append(measure)
        q += " ORDER BY qi.score DESC, qi.slide, qi.rank LIMIT ?"
        args.append(k)
        out = []
        for r in self._conn().execute(q, args).fetchall():
            item = json.loads(r["item"])
            item.update(slide=r["slide"], job_id=r["job_id"])
            out.append(item)
        return out

    def queue_item(self, item_id: str) -> dict | None:
        """The most recent stored version of a queue item, with its slide, job and status."""
        r = (
            self._conn()
            .execute(
                "SELECT qi.item, qi.slide, qi.job_id, s.status FROM queue_items qi JOIN jobs j ON j.id = qi.job_id"
                " LEFT JOIN item_status s ON s.slide = qi.slide AND s.item_id = qi.id"
                " WHERE qi.id = ? ORDER BY j.finished_at DESC LIMIT 1",
                (item_id,),
            )
            .fetchone()
        )
        if r is None:
            return None
        item = json.loads(r["item"])
        item.update(slide=r["slide"], job_id=r["job_id"], status=r["status"] or "pending")
        return item

    def set_item_status(self, slide: str, item_id: str, status: str, actor: str | None) -> bool:
        """Mark a queue item skipped/corrected. False if it already had that status."""
        with self.transaction() as db:
            prev = db.execute(
                "SELECT status FROM item_status WHERE slide = ? AND item_id = ?", (slide, item_id)
            ).fetchone()
            if prev is not None and prev["status"] == status:
                return False
            db.execute(
                "INSERT INTO item_status (slide, item_id, status, actor, at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (slide, item_id) DO UPDATE SET status = excluded.status, actor = excluded.actor,"
                " at = excluded.at",
                (slide, item_id, status, actor, time.time()),
            )
            self._audit(db, actor, f"queue.{status}", item_id, {"slide": slide})
            return True

    def handled_items(self, slide: str) -> set[str]:
        rows = self._conn().execute("SELECT item_id FROM item_status WHERE slide = ?", (slide,)).fetchall()
        return {r["item_id"] for r in rows}

    def pending_count(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) " + PENDING_ITEMS).fetchone()[0])

    # -- corrections -------------------------------------------------------------------------
    def correction(self, correction_id: str) -> dict | None:
        return _row(self._conn().execute("SELECT * FROM corrections WHERE id = ?", (correction_id,)).fetchone())

    def add_correction(self, record: dict, actor: str) -> bool:
        """Insert a correction (files already durable) and mark its queue item corrected; one transaction.

        Returns False when the same correction (same content hash) already exists.
        """
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM corrections WHERE id = ?", (record["id"],)).fetchone():
                return False
            cols = ", ".join(record)
            db.execute(
                f"INSERT INTO corrections ({cols}) VALUES ({', '.join('?' * len(record))})", tuple(record.values())
            )
            if record.get("queue_item_id"):
                db.execute(
                    "INSERT INTO item_status (slide, item_id, status, actor, at) VALUES (?, ?, 'corrected', ?, ?)"
                    " ON CONFLICT (slide, item_id) DO UPDATE SET status = 'corrected', actor = excluded.actor,"
                    " at = excluded.at",
                    (record["slide"], record["queue_item_id"], actor, time.time()),
                )
            self._audit(db, actor, "correction.ingest", record["id"], {"slide": record["slide"]})
            return True

    def list_corrections(self, limit: int = 1000) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM corrections ORDER BY created_at LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]

    def count_corrections(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM corrections").fetchone()[0])

    def correction_ids(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT id FROM corrections")}

    def seen_corrections(self, roles: tuple[str, ...] = ("train", "holdout")) -> set[str]:
        """Ids of corrections some registered version used in ``roles`` (trained on / held out)."""
        seen: set[str] = set()
        for r in self._conn().execute("SELECT corrections FROM model_versions WHERE corrections IS NOT NULL"):
            used = json.loads(r[0])
            for role in roles:
                seen.update(used.get(role, []))
        return seen

    def unused_corrections(self) -> list[dict]:
        """Training corrections that no registered version has been trained on yet."""
        used = self.seen_corrections(("train",))
        rows = self._conn().execute("SELECT * FROM corrections WHERE holdout = 0 ORDER BY created_at").fetchall()
        return [_row(r) for r in rows if r["id"] not in used]

    # -- model versions and the current pointer ----------------------------------------------
    def register_version(self, v: dict, actor: str | None = None) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO model_versions (version, parent, sha256, path, status, reason, metrics,"
                " corrections, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    v["version"],
                    v.get("parent"),
                    v["sha256"],
                    v["path"],
                    v["status"],
                    v.get("reason"),
                    json.dumps(v.get("metrics") or {}),
                    json.dumps(v.get("corrections") or {}),
                    time.time(),
                ),
            )
            self._audit(db, actor or "system", "model.register", v["version"], {"status": v["status"]})

    def set_version_status(self, version: str, status: str, reason: str | None, actor: str | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE model_versions SET status = ?, reason = ? WHERE version = ?", (status, reason, version))
            self._audit(db, actor or "system", f"model.{status}", version, {"reason": reason})

    def version(self, version: str) -> dict | None:
        return _row(self._conn().execute("SELECT * FROM model_versions WHERE version = ?", (version,)).fetchone())

    def versions(self) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM model_versions ORDER BY created_at DESC").fetchall()
        return [_row(r) for r in rows]

    def current_version(self) -> str | None:
        r = self._conn().execute("SELECT version FROM model_pointer WHERE id = 1").fetchone()
        return r[0] if r else None

    def move_pointer(self, version: str, *, action: str, actor: str | None, expect: str | None = None) -> bool:
        """Point 'current' at ``version`` atomically (optionally only if it still is ``expect``)."""
        with self.transaction() as db:
            cur = db.execute("SELECT version FROM model_pointer WHERE id = 1").fetchone()
            previous = cur[0] if cur else None
            if expect is not None and previous != expect:
                return False
            if previous == version:
                return False
            db.execute(
                "INSERT INTO model_pointer (id, version, changed_at) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET version = excluded.version, changed_at = excluded.changed_at",
                (version, time.time()),
            )
            db.execute(
                "INSERT INTO pointer_history (version, previous, action, actor, at) VALUES (?, ?, ?, ?, ?)",
                (version, previous, action, actor, time.time()),
            )
            self._audit(db, actor or "system", f"pointer.{action}", version, {"previous": previous})
            return True

    def pointer_history(self, limit: int = 50) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM pointer_history ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def rollback_target(self) -> str | None:
        """The version that was current before the current one."""
        r = (
            self._conn()
            .execute(
                "SELECT previous FROM pointer_history WHERE version = (SELECT version FROM model_pointer WHERE id = 1)"
                " ORDER BY id DESC LIMIT 1"
            )
            .fetchone()
        )
        return r[0] if r else None

    def count_actions(self, action: str) -> int:
        return int(
            self._conn().execute("SELECT COUNT(*) FROM pointer_history WHERE action = ?", (action,)).fetchone()[0]
        )

    # -- fine-tune runs ------------------------------------------------------------------------
    def request_run(self, trigger: str, actor: str | None) -> tuple[dict, bool]:
        """A new 'requested' run, unless one is already requested or running (then that one)."""
        with self.transaction() as db:
            open_run = db.execute(
                "SELECT * FROM finetune_runs WHERE state IN ('requested', 'running') ORDER BY created_at LIMIT 1"
            ).fetchone()
            if open_run is not None:
                return _row(open_run), False
            run_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO finetune_runs (id, state, trigger, requested_by, created_at)"
                " VALUES (?, 'requested', ?, ?, ?)",
                (run_id, trigger, actor, time.time()),
            )
            self._audit(db, actor or "system", "finetune.request", run_id, {"trigger": trigger})
            return _row(db.execute("SELECT * FROM finetune_runs WHERE id = ?", (run_id,)).fetchone()), True

    def start_run(self, run_id: str, parent: str, corrections: dict, total: int) -> None:
        with self.transaction() as db:
            now = time.time()
            db.execute(
                "UPDATE finetune_runs SET state = 'running', parent = ?, corrections = ?, progress_total = ?,"
                " started_at = ?, heartbeat_at = ? WHERE id = ?",
                (parent, json.dumps(corrections), total, now, now, run_id),
            )

    def run_progress(self, run_id: str, done: int) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE finetune_runs SET progress_done = ?, heartbeat_at = ? WHERE id = ?", (done, time.time(), run_id)
            )

    def end_run(self, run_id: str, state: str, *, candidate: str | None, metrics: dict | None, reason: str | None):
        with self.transaction() as db:
            db.execute(
                "UPDATE finetune_runs SET state = ?, candidate = ?, metrics = ?, reason = ?, finished_at = ?"
                " WHERE id = ?",
                (state, candidate, json.dumps(metrics or {}), reason, time.time(), run_id),
            )
            self._audit(db, "runner", f"finetune.{state}", run_id, {"candidate": candidate, "reason": reason})

    def runs(self, limit: int = 50) -> list[dict]:
        rows = self._conn().execute("SELECT * FROM finetune_runs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]

    def run(self, run_id: str) -> dict | None:
        return _row(self._conn().execute("SELECT * FROM finetune_runs WHERE id = ?", (run_id,)).fetchone())

    def fail_interrupted_runs(self) -> list[str]:
        """At runner start: runs left 'running' by a dead runner are failed (their work is redone)."""
        with self.transaction() as db:
            rows = db.execute("SELECT id FROM finetune_runs WHERE state = 'running'").fetchall()
            for r in rows:
                db.execute(
                    "UPDATE finetune_runs SET state = 'failed', reason = 'runner stopped mid-run (restarted)',"
                    " finished_at = ? WHERE id = ?",
                    (time.time(), r["id"]),
                )
            return [r["id"] for r in rows]

    def run_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("promoted", "rejected", "failed"), 0)
        for r in self._conn().execute("SELECT state, COUNT(*) FROM finetune_runs GROUP BY state"):
            if r[0] in counts:
                counts[r[0]] = r[1]
        return counts
