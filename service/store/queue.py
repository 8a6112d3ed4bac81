"""The review queue: pending items of each slide's latest finished job, and their status per slide."""

from __future__ import annotations

import json
import time
from typing import Any

from service.errors import Conflict
from service.store.db import Database, audit
from service.store.records import QueueItem
from service.vocabulary import ITEM_STATUSES

# Queue items of each slide's latest finished job that nobody corrected or skipped yet.
PENDING_ITEMS = """
    FROM queue_items qi JOIN jobs j ON j.id = qi.job_id
    WHERE j.finished_at = (SELECT MAX(j2.finished_at) FROM jobs j2 WHERE j2.slide = j.slide AND j2.state = 'succeeded')
      AND NOT EXISTS (SELECT 1 FROM item_status s WHERE s.slide = qi.slide AND s.item_id = qi.id)
"""
# ... and that no other reviewer holds now ({now}: the database's clock; argument: the caller).
UNCLAIMED = """
      AND NOT EXISTS (SELECT 1 FROM item_claims c WHERE c.slide = qi.slide AND c.item_id = qi.id
                      AND c.until > {now} AND c.claimed_by <> ?)
"""
# Upsert of an item's status (skipped / corrected); also used inside the correction transaction.
SET_STATUS = (
    "INSERT INTO item_status (slide, item_id, status, actor, at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (slide, item_id) DO UPDATE SET status = excluded.status, actor = excluded.actor, at = excluded.at"
)


def _item(row: dict, status: str | None) -> QueueItem:
    item = row["item"] if isinstance(row["item"], dict) else json.loads(row["item"])
    return QueueItem.from_row({**item, "slide": row["slide"], "job_id": row["job_id"], "status": status or "pending"})


class QueueRepository:
    def __init__(self, db: Database):
        self.db = db

    def pending(
        self, slide: str | None, k: int, measure: str | None = None, *, reviewer: str | None = None
    ) -> list[QueueItem]:
        """Pending items of each slide's latest finished job in the selection's order (their rank). Pooled
        over slides, round robin by rank (every slide's rank 1, then rank 2, …; ties by score): each slide
        keeps its share however its scores compare with another's, and a slide whose first patches were
        reviewed waits for the others to catch up. For a ``reviewer``, without the items another
        reviewer holds."""
        q = "SELECT qi.item, qi.slide, qi.job_id " + PENDING_ITEMS
        args: list[Any] = []
        if reviewer is not None:
            q += UNCLAIMED.format(now=self.db.now)
            args.append(reviewer)
        if slide is not None:
            q += " AND qi.slide = ?"
            args.append(slide)
        if measure is not None:
            q += " AND qi.measure = ?"
            args.append(measure)
        q += " ORDER BY qi.rank, qi.score DESC, qi.slide LIMIT ?"
        args.append(k)
        return [_item(r, None) for r in self.db.all(q, args)]

    def item(self, item_id: str) -> QueueItem | None:
        """The most recent stored version of a queue item, with its slide, job and status."""
        r = self.db.one(
            "SELECT qi.item, qi.slide, qi.job_id, s.status FROM queue_items qi JOIN jobs j ON j.id = qi.job_id"
            " LEFT JOIN item_status s ON s.slide = qi.slide AND s.item_id = qi.id"
            " WHERE qi.id = ? ORDER BY j.finished_at DESC LIMIT 1",
            (item_id,),
        )
        return None if r is None else _item(r, r["status"])

    def set_status(self, slide: str, item_id: str, status: str, actor: str | None) -> bool:
        """Mark a queue item skipped/corrected. False if it already had that status."""
        with self.db.transaction() as db:
            prev = db.execute(
                "SELECT status FROM item_status WHERE slide = ? AND item_id = ?", (slide, item_id)
            ).fetchone()
            if prev is not None and prev["status"] == status:
                return False
            if prev is not None and prev["status"] == "corrected":  # committed since the caller looked
                raise Conflict("already_corrected", "this patch already has a correction; it cannot be skipped")
            db.execute(SET_STATUS, (slide, item_id, status, actor, time.time()))
            audit(db, actor, f"queue.{status}", item_id, {"slide": slide})
            return True

    def claim(self, slide: str, item_id: str, reviewer: str, hold_s: float) -> tuple[str, float]:
        """Hold the item for ``reviewer`` for ``hold_s`` from now (or renew it), letting go of any other
        item they held (one patch open per reviewer): (holder, until). The holder is someone else while
        their hold lasts; then nothing changes. Holds are timed by the database's clock, which every
        replica shares, whatever its host's clock says."""
        with self.db.transaction() as db:
            now = float(db.execute(f"SELECT {self.db.now} AS now").fetchone()["now"])
            held = db.execute(
                "SELECT claimed_by, until FROM item_claims WHERE slide = ? AND item_id = ?", (slide, item_id)
            ).fetchone()
            if held is not None and held["claimed_by"] != reviewer and held["until"] > now:
                return held["claimed_by"], held["until"]
            db.execute(
                "DELETE FROM item_claims WHERE claimed_by = ? AND NOT (slide = ? AND item_id = ?)",
                (reviewer, slide, item_id),
            )
            db.execute(
                "INSERT INTO item_claims (slide, item_id, claimed_by, until) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (slide, item_id) DO UPDATE SET claimed_by = excluded.claimed_by, until = excluded.until",
                (slide, item_id, reviewer, now + hold_s),
            )
            db.execute("DELETE FROM item_claims WHERE until < ?", (now - 86400,))  # long-lapsed holds
            return reviewer, now + hold_s

    def release(self, slide: str, item_id: str, reviewer: str | None) -> None:
        """Let go of the item: ``reviewer``'s own hold, or (None: an admin) anyone's."""
        with self.db.transaction() as db:
            db.execute(
                "DELETE FROM item_claims WHERE slide = ? AND item_id = ? AND claimed_by = COALESCE(?, claimed_by)",
                (slide, item_id, reviewer),
            )

    def holder(self, slide: str, item_id: str) -> tuple[str, float] | None:
        """(reviewer, until) of a hold on the item that lasts now, or None."""
        row = self.db.one(
            f"SELECT claimed_by, until FROM item_claims WHERE slide = ? AND item_id = ? AND until > {self.db.now}",
            (slide, item_id),
        )
        return None if row is None else (row["claimed_by"], row["until"])

    def handled_boxes(self, slide: str) -> set[tuple[int, int, int, int]]:
        """Level-0 boxes (x, y, width, height) of the slide's patches someone corrected or skipped."""
        rows = self.db.all(
            "SELECT qi.item FROM item_status s JOIN queue_items qi ON qi.slide = s.slide AND qi.id = s.item_id"
            " WHERE s.slide = ?",
            (slide,),
        )
        boxes = set()
        for r in rows:  # one row per job that proposed the item: the same box
            b = (r["item"] if isinstance(r["item"], dict) else json.loads(r["item"]))["bbox_level0"]
            boxes.add((b["x"], b["y"], b["width"], b["height"]))
        return boxes

    def status_counts(self) -> dict[str, int]:
        """Items of each slide's current queue by status: pending, skipped, corrected."""
        counts = dict.fromkeys(ITEM_STATUSES, 0)
        rows = self.db.all(
            "SELECT COALESCE(s.status, 'pending') AS status, COUNT(*) AS n FROM queue_items qi"
            " JOIN jobs j ON j.id = qi.job_id"
            " LEFT JOIN item_status s ON s.slide = qi.slide AND s.item_id = qi.id"
            " WHERE j.finished_at = (SELECT MAX(j2.finished_at) FROM jobs j2 WHERE j2.slide = j.slide"
            " AND j2.state = 'succeeded') GROUP BY COALESCE(s.status, 'pending')"
        )
        counts.update({r["status"]: r["n"] for r in rows})
        return counts

    def pending_count(self) -> int:
        return int(self.db.scalar("SELECT COUNT(*) " + PENDING_ITEMS))
