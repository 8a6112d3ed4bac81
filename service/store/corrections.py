"""Corrections: durable rows (files are written before), and which versions used which."""

from __future__ import annotations

import time
from dataclasses import astuple, fields

from service.store.db import Database, audit
from service.store.queue import SET_STATUS
from service.store.records import Correction

USED_ROLES = ("train", "early_stop", "holdout")  # how a run used a correction (its record and card)
ACTIVE = "withdrawn_at IS NULL"  # a withdrawn correction is kept for the record, never used again


def used_ids(used: dict | None) -> set[str]:
    """Every correction id a run's or a version's record names, in any role."""
    return {cid for role in USED_ROLES for cid in (used or {}).get(role, [])}


def withdrawn_query(ids: set[str]) -> tuple[str, list[str]]:
    """The query for those of ``ids`` that were withdrawn, and its arguments."""
    marks = ", ".join("?" * len(ids)) or "NULL"
    return f"SELECT id FROM corrections WHERE id IN ({marks}) AND NOT ({ACTIVE}) ORDER BY id", sorted(ids)


class CorrectionRepository:
    def __init__(self, db: Database):
        self.db = db

    def get(self, correction_id: str) -> Correction | None:
        return Correction.from_row(self.db.one("SELECT * FROM corrections WHERE id = ?", (correction_id,)))

    def add(self, record: Correction, actor: str) -> bool:
        """Insert a correction (files already durable) and mark its queue item corrected; one transaction.

        Returns False when the same correction (same content hash) already exists.
        """
        cols = [f.name for f in fields(record)]
        with self.db.transaction() as db:
            row = db.execute("SELECT withdrawn_at FROM corrections WHERE id = ?", (record.id,)).fetchone()
            if row is not None and row["withdrawn_at"] is None:
                return False
            if row is None:
                db.execute(
                    f"INSERT INTO corrections ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    astuple(record),
                )
            else:  # the very mask sent again after its withdrawal: meant after all, by this sender
                db.execute(
                    "UPDATE corrections SET withdrawn_at = NULL, withdrawn_by = NULL, withdrawn_reason = NULL,"
                    " annotator = ?, queue_item_id = ?, proposed_by_version = ?, model_dice = ?, created_at = ?"
                    " WHERE id = ?",
                    (
                        record.annotator,
                        record.queue_item_id,
                        record.proposed_by_version,
                        record.model_dice,
                        record.created_at,
                        record.id,
                    ),
                )
            if record.queue_item_id:
                db.execute(SET_STATUS, (record.slide, record.queue_item_id, "corrected", actor, time.time()))
            action = "correction.ingest" if row is None else "correction.reinstate"
            audit(db, actor, action, record.id, {"slide": record.slide})
            return True

    def withdraw(self, correction_id: str, actor: str, reason: str) -> Correction | None:
        """Withdraw a correction (None: no such one); one transaction, audited. Its queue patch returns
        to the queue unless another correction of it stands. Withdrawing twice changes nothing."""
        with self.db.transaction() as db:
            row = db.execute("SELECT * FROM corrections WHERE id = ?", (correction_id,)).fetchone()
            if row is None or row["withdrawn_at"] is not None:
                return self.get(correction_id) if row is not None else None
            db.execute(
                "UPDATE corrections SET withdrawn_at = ?, withdrawn_by = ?, withdrawn_reason = ? WHERE id = ?",
                (time.time(), actor, reason, correction_id),
            )
            item = row["queue_item_id"]
            if (
                item
                and not db.execute(
                    f"SELECT 1 FROM corrections WHERE slide = ? AND queue_item_id = ? AND {ACTIVE}",
                    (row["slide"], item),
                ).fetchone()
            ):
                db.execute(
                    "DELETE FROM item_status WHERE slide = ? AND item_id = ? AND status = 'corrected'",
                    (row["slide"], item),
                )
            audit(db, actor, "correction.withdraw", correction_id, {"slide": row["slide"], "reason": reason})
        return self.get(correction_id)

    def withdrawn_among(self, used: dict) -> list[str]:
        """The corrections of a run's record (``used``: ids by role) withdrawn since."""
        return [r["id"] for r in self.db.all(*withdrawn_query(used_ids(used)))]

    def learned_by(self, correction_id: str) -> list[str]:
        """Registered versions fine-tuned on the correction (newest first)."""
        rows = self.db.all("SELECT version, corrections FROM model_versions ORDER BY created_at DESC")
        return [r["version"] for r in rows if correction_id in (r["corrections"] or {}).get("train", [])]

    def list(self, limit: int = 1000, *, withdrawn: bool = True) -> list[Correction]:
        """Corrections in arrival order (``withdrawn=False``: only those that stand)."""
        where = "" if withdrawn else f"WHERE {ACTIVE} "
        rows = self.db.all(f"SELECT * FROM corrections {where}ORDER BY created_at, id LIMIT ?", (limit,))
        return [Correction.from_row(r) for r in rows]

    def on_slide(self, slide: str) -> list[Correction]:
        """The slide's standing corrections in arrival order."""
        rows = self.db.all(f"SELECT * FROM corrections WHERE slide = ? AND {ACTIVE} ORDER BY created_at, id", (slide,))
        return [Correction.from_row(r) for r in rows]

    def count(self) -> int:
        return int(self.db.scalar("SELECT COUNT(*) FROM corrections"))

    def withdrawn_count(self) -> int:
        """Corrections withdrawn now (a resent one stands again)."""
        return int(self.db.scalar(f"SELECT COUNT(*) FROM corrections WHERE NOT ({ACTIVE})"))

    def ids(self) -> set[str]:
        return {r["id"] for r in self.db.all("SELECT id FROM corrections")}

    def seen(self, roles: tuple[str, ...] = USED_ROLES) -> set[str]:
        """Ids of corrections some registered version used in ``roles`` (trained on, early-stopped on,
        held out)."""
        seen: set[str] = set()
        for r in self.db.all("SELECT corrections FROM model_versions WHERE corrections IS NOT NULL"):
            used = r["corrections"] or {}  # a JSON null: a version registered without a record
            for role in roles:
                seen.update(used.get(role, []))
        return seen

    def unseen(self) -> list[Correction]:
        """Corrections that arrived since the last run with a verdict: no registered version and no
        promoted or rejected run has used them, for training or as held-out. (A run that failed
        leaves its corrections unseen: they start the next run, after the runner's backoff.)"""
        seen = self.seen()
        for r in self.db.all(
            "SELECT corrections FROM finetune_runs WHERE state IN ('promoted', 'rejected') AND corrections IS NOT NULL"
        ):
            for role in USED_ROLES:
                seen.update(r["corrections"].get(role, []))
        return [c for c in self.list(1_000_000, withdrawn=False) if c.id not in seen]

    def trained_into(self, version: str | None) -> set[str]:
        """Ids of the corrections ``version`` and its ancestors were fine-tuned on."""
        used: set[str] = set()
        visited: set[str] = set()
        while version and version not in visited:
            visited.add(version)
            row = self.db.one("SELECT parent, corrections FROM model_versions WHERE version = ?", (version,))
            if row is None:
                break
            used.update((row["corrections"] or {}).get("train", []))
            version = row["parent"]
        return used

    def unused_for_training(self, current: str | None) -> list[Correction]:
        """Training corrections the ``current`` model has not learned: none of its ancestors was trained
        on them. A rejected candidate's corrections stay here, to be trained on with the next ones."""
        used = self.trained_into(current)
        rows = self.db.all(f"SELECT * FROM corrections WHERE holdout = 0 AND {ACTIVE} ORDER BY created_at, id")
        return [Correction.from_row(r) for r in rows if r["id"] not in used]

    def agreement(self) -> list[tuple[str, float]]:
        """(proposing model version, Dice of its mask against the correction) of every measured one."""
        rows = self.db.all(
            "SELECT proposed_by_version, model_dice FROM corrections WHERE model_dice IS NOT NULL"
            f" AND proposed_by_version IS NOT NULL AND {ACTIVE}"
        )
        return [(r["proposed_by_version"], r["model_dice"]) for r in rows]

    def set_holdout(self, changes: dict[str, int]) -> None:
        """Set the gate role (1: held out) of corrections, by id; one transaction, audited."""
        with self.db.transaction() as db:
            for cid, holdout in changes.items():
                db.execute("UPDATE corrections SET holdout = ? WHERE id = ?", (holdout, cid))
                audit(db, "runner", "correction.holdout", cid, {"holdout": holdout})

    def held_out(self) -> list[Correction]:
        rows = self.db.all(f"SELECT * FROM corrections WHERE holdout = 1 AND {ACTIVE} ORDER BY created_at, id")
        return [Correction.from_row(r) for r in rows]
