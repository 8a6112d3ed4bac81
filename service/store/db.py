"""The one transaction helper: SQLite in WAL mode, one connection per thread, migrations.

Every write is one ``BEGIN IMMEDIATE ... COMMIT`` with ``synchronous=FULL``, so a change
acknowledged to a client survives a crash.
"""

from __future__ import annotations

import fcntl
import json
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.vocabulary import (
    DELIVERY_STATES,
    HANDLED_ITEM_STATUSES,
    JOB_STATES,
    MODEL_STATUSES,
    ROLES,
    RUN_STATES,
    sql_in,
)

SCHEMA_VERSION = 12


def jobs_table(name: str) -> str:
    return f"""CREATE TABLE IF NOT EXISTS {name} (
    id TEXT PRIMARY KEY,
    dedup_key TEXT UNIQUE,
    slide TEXT NOT NULL,
    options TEXT NOT NULL,              -- what the client asked for (None = server default)
    resolved TEXT,                      -- the segmentation options the job runs with
    model_version TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN {sql_in(JOB_STATES)}),
    cancel_requested INTEGER NOT NULL DEFAULT 0,  -- a running job stops at its next tiles
    error_code TEXT,                    -- a failure's stable reason (a domain error code, job_timeout, ...)
    site TEXT,                          -- a configured site (UGA_SITES) the submitter named, for metrics
    callback TEXT,                      -- a configured callback (UGA_CALLBACKS) told when the job ends
    stow TEXT,                          -- a configured PACS (UGA_PACS) the job's DICOM SEG is stored to
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
    heartbeat_at REAL,
    expired_at REAL,                    -- when its files were removed (superseded; UGA_JOB_RETENTION_DAYS)
    origin TEXT                         -- 'client' (or NULL: before origins) or 'rescoring' (after a model change)
);
"""


JOBS_TABLE = jobs_table("jobs")
SCHEMA = f"""
{JOBS_TABLE}CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
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
    status TEXT NOT NULL CHECK (status IN {sql_in(HANDLED_ITEM_STATUSES)}),
    actor TEXT,
    at REAL NOT NULL,
    PRIMARY KEY (slide, item_id)
);
CREATE TABLE IF NOT EXISTS item_claims (  -- a patch one reviewer has open, so no other takes it; since 12
    slide TEXT NOT NULL,
    item_id TEXT NOT NULL,
    claimed_by TEXT NOT NULL,
    until REAL NOT NULL,
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
    created_at REAL NOT NULL,
    model_dice REAL,                    -- Dice of the proposing model's mask against this one (QC)
    withdrawn_at REAL,                  -- withdrawn by its annotator or an admin: never trained on again
    withdrawn_by TEXT,
    withdrawn_reason TEXT
);
CREATE TABLE IF NOT EXISTS model_versions (
    version TEXT PRIMARY KEY,
    parent TEXT,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN {sql_in(MODEL_STATUSES)}),
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
    state TEXT NOT NULL CHECK (state IN {sql_in(RUN_STATES)}),
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
CREATE TABLE IF NOT EXISTS api_tokens (  -- named users' tokens (uga tokens add/list/revoke); since schema 4
    id TEXT PRIMARY KEY,                 -- public part of the token uga_<id>_<secret>
    name TEXT NOT NULL,                  -- the person: the actor of everything the token does
    role TEXT NOT NULL CHECK (role IN {sql_in(ROLES)}),
    secret_sha256 TEXT NOT NULL,         -- hex sha256 of the secret part; the secret is never stored
    created_at REAL NOT NULL,
    revoked_at REAL,
    last_used_at REAL                    -- updated at most every few minutes
);
CREATE INDEX IF NOT EXISTS api_tokens_by_name ON api_tokens (name);
CREATE TABLE IF NOT EXISTS deliveries (  -- the callback outbox: written with the job's end, sent after; since 9
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    target TEXT NOT NULL,                -- the configured callback's name (its URL lives in the settings)
    event TEXT NOT NULL,                 -- job.succeeded, job.failed, job.cancelled
    payload TEXT NOT NULL,               -- the JSON body, fixed when the event happened
    state TEXT NOT NULL CHECK (state IN {sql_in(DELIVERY_STATES)}),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,               -- pending: when it is due
    lease_until REAL,                    -- sending: until when one process has it
    last_status INTEGER,                 -- the receiver's last HTTP status (NULL: no answer)
    last_error TEXT,
    created_at REAL NOT NULL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
CREATE INDEX IF NOT EXISTS deliveries_by_job ON deliveries (job_id);
"""
# Changes to existing tables, by the schema version that introduced them; applied to older stores
# after SCHEMA (whose IF NOT EXISTS creates tables that are new). A new store gets SCHEMA alone.
_V4_JOB_COLUMNS = (
    "id, dedup_key, slide, options, resolved, model_version, state, progress_done, progress_total, error, summary,"
    " submitted_by, attempts, worker, created_at, started_at, finished_at, heartbeat_at"
)
WITHDRAWAL_COLUMNS = ("withdrawn_at REAL", "withdrawn_by TEXT", "withdrawn_reason TEXT")
UPGRADES = {
    3: "ALTER TABLE jobs ADD COLUMN resolved TEXT;\n",
    # 5: the 'cancelled' state (a CHECK constraint: SQLite rebuilds the table) and cancel requests.
    # Runs with foreign keys off (SQLite's table-rebuild procedure) and checked before the commit.
    5: "\n".join(
        [
            jobs_table("jobs_v5"),
            f"INSERT INTO jobs_v5 ({_V4_JOB_COLUMNS}) SELECT {_V4_JOB_COLUMNS} FROM jobs;",
            "DROP TABLE jobs;",
            "ALTER TABLE jobs_v5 RENAME TO jobs;",
            "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);",
            "CREATE INDEX IF NOT EXISTS jobs_by_slide ON jobs (slide, finished_at);",
        ]
    )
    + "\n",
    6: "ALTER TABLE corrections ADD COLUMN model_dice REAL;\n",
    7: "ALTER TABLE jobs ADD COLUMN error_code TEXT;\n",
    8: "ALTER TABLE jobs ADD COLUMN site TEXT;\n",
    9: "ALTER TABLE jobs ADD COLUMN callback TEXT;\nALTER TABLE jobs ADD COLUMN stow TEXT;\n",  # + deliveries
    10: "ALTER TABLE jobs ADD COLUMN expired_at REAL;\nALTER TABLE jobs ADD COLUMN origin TEXT;\n",
    11: "".join(f"ALTER TABLE corrections ADD COLUMN {c};\n" for c in WITHDRAWAL_COLUMNS),
    12: "",  # the item_claims table: SCHEMA's CREATE TABLE IF NOT EXISTS makes it
}
JSON_COLUMNS = ("options", "resolved", "summary", "item", "details", "metrics", "corrections")


def _enable_wal(conn: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """WAL mode. Switching into it needs an exclusive lock for which SQLite does not wait (processes
    opening a new store together get 'database is locked' at once), so retry for ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _adds_existing_column(db: sqlite3.Connection, statement: str) -> bool:
    """True for ``ALTER TABLE t ADD COLUMN c`` when ``t`` already has ``c``."""
    m = re.match(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", statement)
    return bool(m) and any(row[1] == m[2] for row in db.execute(f"PRAGMA table_info({m[1]})"))


def statements(script: str) -> list[str]:
    """The SQL statements of a script, one by one (DDL runs inside the caller's transaction)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


class StoreError(RuntimeError):
    pass


def decode(row: sqlite3.Row | None) -> dict | None:
    """A row as a dict with its JSON columns parsed."""
    if row is None:
        return None
    d = dict(row)
    for key in JSON_COLUMNS:
        if d.get(key):
            d[key] = json.loads(d[key])
    return d


class Database:
    """Thread-safe access (one connection per thread) to ``<data_dir>/uga.sqlite``."""

    dialect = "sqlite"
    skip_locked = ""  # SQLite has one writer at a time: a claimed row is never contended
    now = "((julianday('now') - 2440587.5) * 86400.0)"  # unix seconds by the database's clock (ms)

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate()

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable change: BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error)."""
        db = self.conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT (disk full, I/O error) may leave it open: never hold the lock
                db.execute("ROLLBACK")
            raise

    def one(self, sql: str, args: tuple | list = ()) -> dict | None:
        return decode(self.conn().execute(sql, args).fetchone())

    def all(self, sql: str, args: tuple | list = ()) -> list[dict]:
        return [decode(r) for r in self.conn().execute(sql, args).fetchall()]

    def scalar(self, sql: str, args: tuple | list = ()) -> Any:
        row = self.conn().execute(sql, args).fetchone()
        return row[0] if row else None

    def _migrate(self) -> None:
        """Bring the database to SCHEMA_VERSION. Under the write lock and re-checked there, so that
        processes starting together (workers, the runner) migrate it once, never concurrently."""
        conn = self.conn()
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        conn.execute("PRAGMA foreign_keys=OFF")  # a table rebuild drops a parent table (outside a transaction)
        try:
            with self.transaction() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"store {self.path.name} has schema {version}, newer than this code ({SCHEMA_VERSION})"
                    )
                if version == SCHEMA_VERSION:
                    return  # another process migrated it while this one waited for the lock
                upgrades = [sql for v, sql in UPGRADES.items() if 0 < version < v]
                for statement in statements(SCHEMA + "".join(upgrades)):
                    if not _adds_existing_column(db, statement):  # a rebuild may already have added it
                        db.execute(statement)
                if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                    raise StoreError(f"store {self.path.name}: migration would break references; nothing changed")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        finally:
            conn.execute("PRAGMA foreign_keys=ON")

    def writable(self) -> bool:
        """True when the directory takes a file and the database a write lock within a second (/readyz)."""
        try:
            with tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=".ready-"):
                pass
            probe = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
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

    def try_lease(self, name: str) -> Lease | None:
        """Hold the deployment-wide lease ``name`` (one holder at a time, until its process ends or it
        releases it); None while another holds it. Here: an exclusive lock on a file beside the
        database, which every process of a one-host deployment shares."""
        locks = self.path.parent / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        handle = open(locks / f"{name}.lease", "a")  # noqa: SIM115 - held open for the lease's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return Lease(release=handle.close, held=lambda: not handle.closed)  # closing the file drops the lock


@dataclass(frozen=True)
class Lease:
    """A deployment-wide lease this process holds: ``release()`` gives it up; ``held()`` says whether
    it still holds it (a PostgreSQL lease goes with its connection, e.g. in a database failover)."""

    release: Callable[[], None]
    held: Callable[[], bool]


def open_database(data_dir: Path, url: str | None = None, pool_size: int = 8, timeout_s: float = 10.0):
    """SQLite in ``data_dir`` (``url`` unset), or the PostgreSQL database at ``url``."""
    if not url:
        return Database(Path(data_dir) / "uga.sqlite")
    if not url.startswith(("postgresql://", "postgres://")):
        raise StoreError("UGA_DATABASE_URL must be a postgresql:// URL (unset: SQLite in UGA_DATA_DIR)")
    from service.store.postgres import PostgresDatabase

    return PostgresDatabase(url, pool_size=pool_size, data_dir=Path(data_dir), timeout_s=timeout_s)


def audit(db: sqlite3.Connection, actor: str | None, action: str, target: str, details: Any = None) -> None:
    """One audit row, inside the caller's transaction."""
    db.execute(
        "INSERT INTO audit (at, actor, action, target, details) VALUES (?, ?, ?, ?, ?)",
        (time.time(), actor, action, target, json.dumps(details) if details is not None else None),
    )
