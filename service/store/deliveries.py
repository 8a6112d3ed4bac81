"""The callback outbox: one row per event to send, written in the same transaction as the job's end.

A job that names a callback gets a ``job.<state>`` delivery when it succeeds, fails or is cancelled;
because the row commits with the state change, a crash cannot lose the event nor send one for a
change that did not happen. Senders (any serving process) lease due rows one at a time.
"""

from __future__ import annotations

import json
import time
import uuid

from service.errors import Conflict, NotFound
from service.store.db import Database, audit
from service.store.records import Delivery
from service.vocabulary import DELIVERY_STATES

SUMMARY_FIELDS = ("tumour_area_mm2", "tumour_fraction_of_tissue", "tissue_area_mm2", "mean_uncertainty", "queue")


def job_event(job: dict) -> dict:
    """The event body for a job that has just ended (no slide pixels, no tokens: what a LIS files)."""
    summary = job.get("summary") or {}
    if isinstance(summary, str):
        summary = json.loads(summary)
    return {
        "event": f"job.{job['state']}",
        "job": {
            "id": job["id"],
            "slide": job["slide"],
            "state": job["state"],
            "model_version": job["model_version"],
            "site": job.get("site"),
            "error": job.get("error"),
            "error_code": job.get("error_code"),
            "finished_at": job.get("finished_at"),
            "source_identifiers": summary.get("source_identifiers") or {},
            "summary": {k: summary[k] for k in SUMMARY_FIELDS if k in summary},
            "links": {"job": f"/v1/jobs/{job['id']}", "queue": f"/v1/queue?slide={job['slide']}"},
        },
    }


def enqueue_job_event(db, job_id: str) -> None:
    """Inside the caller's transaction: the job's end event, if it names a callback."""
    job = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if job is None or not job["callback"]:
        return
    delivery_id = uuid.uuid4().hex
    body = {"delivery": delivery_id, **job_event(dict(job))}  # signed with the body: a replay is the same event
    now = time.time()
    db.execute(
        "INSERT INTO deliveries (id, job_id, target, event, payload, state, next_at, created_at)"
        " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
        (delivery_id, job_id, job["callback"], body["event"], json.dumps(body, sort_keys=True), now, now),
    )


class DeliveryRepository:
    def __init__(self, db: Database):
        self.db = db

    def get(self, delivery_id: str) -> Delivery | None:
        return Delivery.from_row(self.db.one("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)))

    def for_job(self, job_id: str) -> list[Delivery]:
        rows = self.db.all("SELECT * FROM deliveries WHERE job_id = ? ORDER BY created_at", (job_id,))
        return [Delivery.from_row(r) for r in rows]

    def list(self, state: str | None = None, limit: int = 100) -> list[Delivery]:
        q, args = "SELECT * FROM deliveries", []
        if state is not None:
            q, args = q + " WHERE state = ?", [state]
        rows = self.db.all(q + " ORDER BY created_at DESC LIMIT ?", (*args, limit))
        return [Delivery.from_row(r) for r in rows]

    def claim(self, lease_s: float) -> Delivery | None:
        """Lease the most overdue delivery (pending and due, or sending with an expired lease). Leases
        run on the database's clock, as job heartbeats do: a host whose clock runs ahead cannot take
        a delivery another is still sending."""
        now = self.db.now  # next_at is the writing host's clock (a retry's time); leases are the database's
        due = f"(state = 'pending' AND next_at <= ?) OR (state = 'sending' AND lease_until < {now})"
        if self.db.scalar(f"SELECT 1 FROM deliveries WHERE {due} LIMIT 1", (time.time(),)) is None:
            return None  # the common case, every second in every process: a read, not a write lock
        with self.db.transaction() as db:
            row = db.execute(
                f"UPDATE deliveries SET state = 'sending', lease_until = {now} + ?, attempts = attempts + 1"
                f" WHERE id = (SELECT id FROM deliveries WHERE {due} ORDER BY next_at LIMIT 1"
                + self.db.skip_locked
                + ")"
                " RETURNING id",
                (lease_s, time.time()),
            ).fetchone()
        return self.get(row["id"]) if row else None

    def delivered(self, lease: Delivery, status: int) -> None:
        """Record success, if this sender still holds the lease (``lease`` is what ``claim`` returned)."""
        with self.db.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'delivered', delivered_at = ?, last_status = ?, last_error = NULL,"
                " lease_until = NULL WHERE id = ? AND state = 'sending' AND lease_until = ?",
                (time.time(), status, lease.id, lease.lease_until),
            )

    def attempt_failed(
        self, lease: Delivery, status: int | None, error: str, *, max_attempts: int, retry_in_s: float
    ) -> str:
        """Record a failed attempt: due again after ``retry_in_s``, or failed for good. Returns the state.
        A sender whose lease expired (another took the row over) changes nothing."""
        state = "failed" if lease.attempts >= max_attempts else "pending"
        with self.db.transaction() as db:
            cur = db.execute(
                "UPDATE deliveries SET state = ?, next_at = ?, last_status = ?, last_error = ?, lease_until = NULL"
                " WHERE id = ? AND state = 'sending' AND lease_until = ?",
                (state, time.time() + retry_in_s, status, error[:500], lease.id, lease.lease_until),
            )
            if cur.rowcount == 1 and state == "failed":
                audit(db, "system", "callback.failed", lease.id, {"status": status, "error": error[:200]})
        return state

    def retry(self, delivery_id: str, actor: str | None) -> Delivery:
        """An admin sends a failed delivery again (from now, with a fresh attempt budget)."""
        with self.db.transaction() as db:
            row = db.execute("SELECT state FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            if row is None:
                raise NotFound("delivery_not_found", f"no delivery {delivery_id}")
            if row["state"] != "failed":
                raise Conflict("delivery_not_failed", f"the delivery is {row['state']}; only failed ones are retried")
            db.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_at = ? WHERE id = ?",
                (time.time(), delivery_id),
            )
            audit(db, actor, "callback.retry", delivery_id)
        return self.get(delivery_id)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(DELIVERY_STATES, 0)
        for r in self.db.all("SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts
