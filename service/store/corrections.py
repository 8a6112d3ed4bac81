"""Corrections: durable rows (files are written before), and which versions used which."""

from __future__ import annotations

import time
from dataclasses import astuple, fields

from service.store.db import Database, audit
from service.store.queue import SET_STATUS
from service.store.records import Correction

USED_ROLES = ("train", "early_stop", "holdout")  # how a run used a correction (its record and card)


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
            if db.execute("SELECT 1 FROM corrections WHERE id = ?", (record.id,)).fetchone():
                return False
            db.execute(
                f"INSERT INTO corrections ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", astuple(record)
            )
            if record.queue_item_id:
                db.execute(SET_STATUS, (record.slide, record.queue_item_id, "corrected", actor, time.time()))
            audit(db, actor, "correction.ingest", record.id, {"slide": record.slide})
            return True

    def list(self, limit: int = 1000) -> list[Correction]:
        rows = self.db.all("SELECT * FROM corrections ORDER BY created_at, id LIMIT ?", (limit,))
        return [Correction.from_row(r) for r in rows]

    def on_slide(self, slide: str) -> list[Correction]:
        """The slide's corrections in arrival order."""
        rows = self.db.all("SELECT * FROM corrections WHERE slide = ? ORDER BY created_at, id", (slide,))
        return [Correction.from_row(r) for r in rows]

    def count(self) -> int:
        return int(self.db.scalar("SELECT COUNT(*) FROM corrections"))

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
        return [c for c in self.list(1_000_000) if c.id not in seen]

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
        rows = self.db.all("SELECT * FROM corrections WHERE holdout = 0 ORDER BY created_at, id")
        return [Correction.from_row(r) for r in rows if r["id"] not in used]

    def agreement(self) -> list[tuple[str, float]]:
        """(proposing model version, Dice of its mask against the correction) of every measured one."""
        rows = self.db.all(
            "SELECT proposed_by_version, model_dice FROM corrections WHERE model_dice IS NOT NULL"
            " AND proposed_by_version IS NOT NULL"
        )
        return [(r["proposed_by_version"], r["model_dice"]) for r in rows]

    def set_holdout(self, changes: dict[str, int]) -> None:
        """Set the gate role (1: held out) of corrections, by id; one transaction, audited."""
        with self.db.transaction() as db:
            for cid, holdout in changes.items():
                db.execute("UPDATE corrections SET holdout = ? WHERE id = ?", (holdout, cid))
                audit(db, "runner", "correction.holdout", cid, {"holdout": holdout})

    def held_out(self) -> list[Correction]:
        rows = self.db.all("SELECT * FROM corrections WHERE holdout = 1 ORDER BY created_at, id")
        return [Correction.from_row(r) for r in rows]
