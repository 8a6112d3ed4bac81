"""Model versions (immutable rows) and the one 'current' pointer with its history."""

from __future__ import annotations

import json
import time

from service.store.corrections import used_ids, withdrawn_query
from service.store.db import Database, audit
from service.store.records import ModelVersion
from service.vocabulary import ROLLBACK_ACTIONS, PointerAction


class ModelRepository:
    def __init__(self, db: Database):
        self.db = db

    def register(self, v: ModelVersion, actor: str | None = None) -> None:
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO model_versions (version, parent, sha256, path, status, reason, metrics,"
                " corrections, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (version) DO NOTHING",
                (
                    v.version,
                    v.parent,
                    v.sha256,
                    v.path,
                    v.status,
                    v.reason,
                    json.dumps(v.metrics),
                    json.dumps(v.corrections),
                    v.created_at,
                ),
            )
            audit(db, actor or "system", "model.register", v.version, {"status": v.status})

    def set_status(self, version: str, status: str, reason: str | None, actor: str | None = None) -> None:
        with self.db.transaction() as db:
            db.execute("UPDATE model_versions SET status = ?, reason = ? WHERE version = ?", (status, reason, version))
            audit(db, actor or "system", f"model.{status}", version, {"reason": reason})

    def get(self, version: str) -> ModelVersion | None:
        return ModelVersion.from_row(self.db.one("SELECT * FROM model_versions WHERE version = ?", (version,)))

    def list(self) -> list[ModelVersion]:
        return [ModelVersion.from_row(r) for r in self.db.all("SELECT * FROM model_versions ORDER BY created_at DESC")]

    def current(self) -> str | None:
        return self.db.scalar("SELECT version FROM model_pointer WHERE id = 1")

    def move_pointer(
        self,
        version: str,
        *,
        action: PointerAction,
        actor: str | None,
        expect: str | None = None,
        status: str | None = None,
        run: str | None = None,
    ) -> bool:
        """Point 'current' at ``version`` atomically (compare-and-set: only if it still is ``expect``),
        and set its ``status`` and the fine-tune ``run``'s outcome in the same transaction when given
        (a promotion is one change: a crash right after it cannot leave the run 'failed')."""
        with self.db.transaction() as db:
            return _move_pointer(db, version, action, actor, expect, status, run)

    def fail_and_roll_back(self, version: str, reason: str, back: str | None) -> bool:
        """Mark ``version`` failed and, if it is still current, point back to ``back``: one change, so a
        crash cannot leave the current version 'failed' with nothing moving the pointer back."""
        with self.db.transaction() as db:
            db.execute("UPDATE model_versions SET status = 'failed', reason = ? WHERE version = ?", (reason, version))
            audit(db, "system", "model.failed", version, {"reason": reason})
            return bool(back) and _move_pointer(db, back, "auto-rollback", "system", version, None, None)

    def was_current(self, version: str) -> bool:
        """Whether the pointer ever pointed at ``version``."""
        return self.db.scalar("SELECT COUNT(*) FROM pointer_history WHERE version = ?", (version,)) > 0

    def pointer_history(self, limit: int = 50) -> list[dict]:
        return self.db.all("SELECT * FROM pointer_history ORDER BY id DESC LIMIT ?", (limit,))

    def rollback_target(self) -> str | None:
        """The version the current one replaced when it last moved forward (a promotion or the first
        pointer), so rolling back twice goes back twice instead of undoing the first rollback."""
        marks = ", ".join("?" * len(ROLLBACK_ACTIONS))
        return self.db.scalar(
            "SELECT previous FROM pointer_history WHERE version = (SELECT version FROM model_pointer WHERE id = 1)"
            f" AND action NOT IN ({marks}) ORDER BY id DESC LIMIT 1",
            ROLLBACK_ACTIONS,
        )

    def count_actions(self, actions: tuple[str, ...]) -> int:
        marks = ", ".join("?" * len(actions))
        return int(self.db.scalar(f"SELECT COUNT(*) FROM pointer_history WHERE action IN ({marks})", actions))


def _move_pointer(
    db, version: str, action: str, actor: str | None, expect: str | None, status: str | None, run: str | None
) -> bool:
    """ModelRepository.move_pointer's change, inside the caller's transaction."""
    cur = db.execute("SELECT version FROM model_pointer WHERE id = 1").fetchone()
    previous = cur[0] if cur else None
    if (expect is not None and previous != expect) or previous == version:
        return False
    if run is not None:  # a run another runner has ended (it lost its lease) promotes nothing,
        row = db.execute("SELECT state, corrections FROM finetune_runs WHERE id = ?", (run,)).fetchone()
        if row is None or row[0] != "running":
            return False
        used = json.loads(row[1]) if row[1] else {}  # nor one trained or gated on a correction withdrawn since
        if db.execute(*withdrawn_query(used_ids(used))).fetchone() is not None:
            return False
    now = time.time()
    db.execute(
        "INSERT INTO model_pointer (id, version, changed_at) VALUES (1, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET version = excluded.version, changed_at = excluded.changed_at",
        (version, now),
    )
    db.execute(
        "INSERT INTO pointer_history (version, previous, action, actor, at) VALUES (?, ?, ?, ?, ?)",
        (version, previous, action, actor, now),
    )
    audit(db, actor or "system", f"pointer.{action}", version, {"previous": previous})
    if status is not None:
        db.execute("UPDATE model_versions SET status = ?, reason = NULL WHERE version = ?", (status, version))
        audit(db, actor or "system", f"model.{status}", version, {"reason": None})
    if run is not None:
        db.execute(
            "UPDATE finetune_runs SET state = 'promoted', candidate = ?, finished_at = ?"
            " WHERE id = ? AND state = 'running'",
            (version, now, run),
        )
        audit(db, actor or "system", "finetune.promoted", run, {"candidate": version, "reason": None})
    return True
