"""Fine-tune runs: requested -> running -> promoted / rejected / failed, with progress and heartbeat."""

from __future__ import annotations

import json
import time
import uuid

from service.store.db import Database, audit
from service.store.records import FinetuneRun
from service.vocabulary import OPEN_RUN_STATES, RUN_OUTCOMES, sql_in


class RunRepository:
    def __init__(self, db: Database):
        self.db = db

    def request(self, trigger: str, actor: str | None) -> tuple[FinetuneRun, bool]:
        """A new 'requested' run, unless one is already requested or running (then that one)."""
        with self.db.transaction() as db:
            open_run = db.execute(
                f"SELECT id FROM finetune_runs WHERE state IN {sql_in(OPEN_RUN_STATES)} ORDER BY created_at LIMIT 1"
            ).fetchone()
            if open_run is not None:
                return self.get(open_run["id"]), False
            run_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO finetune_runs (id, state, trigger, requested_by, created_at)"
                " VALUES (?, 'requested', ?, ?, ?)",
                (run_id, trigger, actor, time.time()),
            )
            audit(db, actor or "system", "finetune.request", run_id, {"trigger": trigger})
        return self.get(run_id), True

    def oldest_requested(self) -> FinetuneRun | None:
        return FinetuneRun.from_row(
            self.db.one("SELECT * FROM finetune_runs WHERE state = 'requested' ORDER BY created_at LIMIT 1")
        )

    def start(self, run_id: str, parent: str, corrections: dict, total: int) -> None:
        with self.db.transaction() as db:
            now = time.time()
            db.execute(
                "UPDATE finetune_runs SET state = 'running', parent = ?, corrections = ?, progress_total = ?,"
                " started_at = ?, heartbeat_at = ? WHERE id = ?",
                (parent, json.dumps(corrections), total, now, now, run_id),
            )

    def progress(self, run_id: str, done: int, total: int) -> None:
        """Steps done of ``total`` (the fine-tune's own count: it may scale steps with corrected area)."""
        with self.db.transaction() as db:
            db.execute(
                "UPDATE finetune_runs SET progress_done = ?, progress_total = ?, heartbeat_at = ? WHERE id = ?",
                (done, total, time.time(), run_id),
            )

    def gated(self, run_id: str, candidate: str, metrics: dict) -> None:
        """The gate's measurements on the run's candidate, recorded before a promotion (which marks the
        run promoted in its own transaction): a crash between the two leaves the run whole."""
        with self.db.transaction() as db:
            db.execute(
                "UPDATE finetune_runs SET candidate = ?, metrics = ? WHERE id = ? AND state = 'running'",
                (candidate, json.dumps(metrics), run_id),
            )

    def end(self, run_id: str, state: str, *, candidate: str | None, metrics: dict | None, reason: str | None) -> None:
        """A running run's outcome (a run another runner already ended, e.g. failed at its start, stays so)."""
        with self.db.transaction() as db:
            cur = db.execute(
                "UPDATE finetune_runs SET state = ?, candidate = ?, metrics = ?, reason = ?, finished_at = ?"
                " WHERE id = ? AND state = 'running'",
                (state, candidate, json.dumps(metrics or {}), reason, time.time(), run_id),
            )
            if cur.rowcount:
                audit(db, "runner", f"finetune.{state}", run_id, {"candidate": candidate, "reason": reason})

    def list(self, limit: int = 50) -> list[FinetuneRun]:
        rows = self.db.all("SELECT * FROM finetune_runs ORDER BY created_at DESC LIMIT ?", (limit,))
        return [FinetuneRun.from_row(r) for r in rows]

    def get(self, run_id: str) -> FinetuneRun | None:
        return FinetuneRun.from_row(self.db.one("SELECT * FROM finetune_runs WHERE id = ?", (run_id,)))

    def fail_interrupted(self) -> list[FinetuneRun]:
        """At runner start: runs left 'running' by a dead runner are failed (see ``interrupt``)."""
        return self.interrupt(None, "runner stopped mid-run (restarted)")

    def interrupt(self, run_id: str | None, reason: str) -> list[FinetuneRun]:
        """Fail the running run ``run_id`` (None: every running run) that a stop cut short. An admin's
        request is not lost with it: it is requested again (in the same transaction), so the work is redone."""
        with self.db.transaction() as db:
            only = "" if run_id is None else " AND id = ?"
            rows = db.execute(
                f"SELECT id FROM finetune_runs WHERE state = 'running'{only}", () if run_id is None else (run_id,)
            ).fetchall()
            for r in rows:
                db.execute(
                    "UPDATE finetune_runs SET state = 'failed', reason = ?, finished_at = ? WHERE id = ?",
                    (reason, time.time(), r["id"]),
                )
            failed = [self.get(r["id"]) for r in rows]
            if any(run.trigger == "admin" for run in failed):
                admin = next(run for run in failed if run.trigger == "admin")
                db.execute(
                    "INSERT INTO finetune_runs (id, state, trigger, requested_by, created_at)"
                    " VALUES (?, 'requested', 'admin', ?, ?)",
                    (uuid.uuid4().hex, admin.requested_by, time.time()),
                )
                audit(db, "runner", "finetune.request", admin.id, {"trigger": "admin", "redo_of": admin.id})
            return failed

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(RUN_OUTCOMES, 0)
        for r in self.db.all("SELECT state, COUNT(*) AS n FROM finetune_runs GROUP BY state"):
            if r["state"] in counts:
                counts[r["state"]] = r["n"]
        return counts
