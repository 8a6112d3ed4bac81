"""Segmentation jobs: submit (deduplicated), claim, heartbeat, finish with the job's queue, recover."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

from service.errors import Conflict, TooBusy
from service.store.db import Database, audit
from service.store.deliveries import enqueue_job_event
from service.store.records import Job
from service.vocabulary import ACTIVE_JOB_STATES, JOB_STATES, RETRYABLE_JOB_STATES, WORKER_FAILURE_CODES, sql_in


def corrected_on(job_id_column: str) -> str:
    """SQL: a correction was made on one of the queue items of the job whose id is in that column."""
    return (
        "EXISTS (SELECT 1 FROM corrections c JOIN queue_items q ON q.id = c.queue_item_id"
        f" WHERE q.job_id = {job_id_column} AND q.slide = c.slide)"
    )


class JobRepository:
    def __init__(self, db: Database):
        self.db = db

    def submit(
        self,
        *,
        slide: str,
        options: dict,
        resolved: dict,
        model_version: str,
        dedup_key: str,
        actor: str | None,
        limits: tuple[int, int] | None = None,
        site: str | None = None,
        callback: str | None = None,
        stow: str | None = None,
        origin: str = "client",
    ) -> tuple[Job, bool]:
        """Create a queued job, or return the existing one with the same key. Returns (job, created).

        A failed or cancelled job with the same key, or one whose files retention removed, is run again as
        a new job (its key is released). ``limits`` (all, per caller) bound the jobs waiting or running:
        over either, TooBusy and nothing written.
        """
        with self.db.transaction() as db:
            existing = db.execute("SELECT * FROM jobs WHERE dedup_key = ?", (dedup_key,)).fetchone()
            if (
                existing is not None
                and existing["state"] not in RETRYABLE_JOB_STATES
                and existing["expired_at"] is None
            ):
                return self.get(existing["id"]), False
            if limits is not None:
                self._check_limits(db, actor, *limits)
            if existing is not None:
                db.execute("UPDATE jobs SET dedup_key = NULL WHERE id = ?", (existing["id"],))
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (id, dedup_key, slide, options, resolved, model_version, state, submitted_by,"
                " created_at, site, callback, stow, origin) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    dedup_key,
                    slide,
                    json.dumps(options),
                    json.dumps(resolved),
                    model_version,
                    actor,
                    time.time(),
                    site,
                    callback,
                    stow,
                    origin,
                ),
            )
            audit(db, actor, "job.submit", job_id, {"slide": slide, "options": options})
        return self.get(job_id), True

    @staticmethod
    def _check_limits(db, actor: str | None, total: int, per_caller: int) -> None:
        active = f"SELECT COUNT(*) FROM jobs WHERE state IN {sql_in(ACTIVE_JOB_STATES)}"
        if db.execute(active).fetchone()[0] >= total:
            raise TooBusy(
                "queue_full",
                f"{total} jobs are already waiting or running (UGA_MAX_ACTIVE_JOBS); retry later",
                {"limit": total},
                retry_after=60,
            )
        if db.execute(active + " AND submitted_by = ?", (actor,)).fetchone()[0] >= per_caller:
            raise TooBusy(
                "too_many_jobs",
                f"you already have {per_caller} jobs waiting or running (UGA_MAX_ACTIVE_JOBS_PER_CALLER); "
                "retry when one has finished, or cancel one",
                {"limit": per_caller},
                retry_after=60,
            )

    def get(self, job_id: str) -> Job | None:
        return Job.from_row(self.db.one("SELECT * FROM jobs WHERE id = ?", (job_id,)))

    def list(self, state: str | None = None, limit: int = 50) -> list[Job]:
        q, args = "SELECT * FROM jobs", []
        if state:
            q += " WHERE state = ?"
            args.append(state)
        q += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        return [Job.from_row(r) for r in self.db.all(q, args)]

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        for r in self.db.all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts

    def claim(self, worker: str) -> Job | None:
        """Atomically take the oldest queued job for ``worker``: a client's before any rescoring (after a
        promotion every slide is queued again; a new slide must not wait behind them)."""
        now = time.time()
        with self.db.transaction() as db:
            row = db.execute(
                "UPDATE jobs SET state = 'running', worker = ?, started_at = ?, heartbeat_at = "
                + self.db.now
                + ", attempts = attempts + 1, progress_done = 0"
                " WHERE id = (SELECT id FROM jobs WHERE state = 'queued'"
                " ORDER BY CASE WHEN origin = 'rescoring' THEN 1 ELSE 0 END, created_at LIMIT 1"
                + self.db.skip_locked
                + ") RETURNING id",
                (worker, now),
            ).fetchone()
        return self.get(row["id"]) if row else None

    def heartbeat(self, job_id: str, worker: str, done: int | None = None, total: int | None = None) -> bool | None:
        """Record that ``worker`` is alive (and its progress). True: a cancel was requested; None: the job
        is no longer this worker's (it was requeued to another, or ended): stop without touching it."""
        with self.db.transaction() as db:
            if done is None:
                row = db.execute(
                    f"UPDATE jobs SET heartbeat_at = {self.db.now} WHERE id = ? AND worker = ? AND state = 'running'"
                    " RETURNING cancel_requested",
                    (job_id, worker),
                ).fetchone()
            else:
                row = db.execute(
                    f"UPDATE jobs SET heartbeat_at = {self.db.now}, progress_done = ?, progress_total = ?"
                    " WHERE id = ? AND worker = ? AND state = 'running' RETURNING cancel_requested",
                    (done, total, job_id, worker),
                ).fetchone()
        return None if row is None else bool(row[0])

    def cancel(self, job_id: str, actor: str | None) -> Job:
        """Cancel a queued job now; ask a running one to stop (its worker ends it). One transaction."""
        with self.db.transaction() as db:
            now = time.time()
            changed = db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = 'cancelled' WHERE id = ?"
                " AND state = 'queued'",
                (now, job_id),
            ).rowcount
            changed += db.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job_id,)
            ).rowcount
            if not changed:  # it finished between the caller's look and this transaction
                state = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()["state"]
                raise Conflict("job_finished", f"job is {state}; only queued or running jobs can be cancelled")
            if db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()["state"] == "cancelled":
                enqueue_job_event(db, job_id)
            audit(db, actor, "job.cancel", job_id)
        return self.get(job_id)

    def end_cancelled(self, job_id: str, worker: str) -> bool:
        """The worker stopped a job whose cancel was requested. False if the job was not its own."""
        with self.db.transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = 'cancelled'"
                " WHERE id = ? AND worker = ? AND state = 'running'",
                (time.time(), job_id, worker),
            )
            if cur.rowcount == 1:
                enqueue_job_event(db, job_id)
            return cur.rowcount == 1

    def finish(
        self, job_id: str, worker: str, summary: dict, queue: list[dict], publish: Callable[[], None] | None = None
    ) -> bool:
        """Record success and the job's queue in one transaction. False if the job was taken away or its
        cancel was requested meanwhile (a cancel acknowledged to a caller wins over a late finish).
        ``publish`` (moving the outputs into place) runs inside it, once the job is known to be
        ``worker``'s: a worker that lost the job never touches the files of the one that took it."""
        with self.db.transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'succeeded', summary = ?, model_version = ?, finished_at = ?,"
                " progress_done = progress_total, error = NULL"
                " WHERE id = ? AND worker = ? AND state = 'running' AND cancel_requested = 0",
                (json.dumps(summary), summary["model_version"], time.time(), job_id, worker),
            )
            if cur.rowcount != 1:
                return False
            slide = db.execute("SELECT slide FROM jobs WHERE id = ?", (job_id,)).fetchone()["slide"]
            db.executemany(
                "INSERT INTO queue_items (id, job_id, slide, rank, score, measure, item) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(q["id"], job_id, slide, q["rank"], q["score"], q["measure"], json.dumps(q)) for q in queue],
            )
            enqueue_job_event(db, job_id)
            if publish is not None:
                publish()
            return True

    def fail(self, job_id: str, worker: str | None, error: str, code: str = "internal_error") -> None:
        """Record a failure: the message for people, ``code`` for dashboards (a bounded set)."""
        with self.db.transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, error_code = ?, finished_at = ? WHERE id = ?"
                " AND state = 'running'" + (" AND worker = ?" if worker else ""),
                (error, code, time.time(), job_id, *([worker] if worker else [])),
            )
            if cur.rowcount == 1:
                enqueue_job_event(db, job_id)

    def failure_counts(self) -> dict[str, int]:
        """Failed jobs by reason code (the worker's own codes always present, at 0 before any failure)."""
        rows = self.db.all(
            "SELECT COALESCE(error_code, 'unknown') AS code, COUNT(*) AS n FROM jobs"
            " WHERE state = 'failed' GROUP BY code"
        )
        return dict.fromkeys(WORKER_FAILURE_CODES, 0) | {r["code"]: r["n"] for r in rows}

    def oldest_queued_age_s(self) -> dict[str, float]:
        """Seconds the oldest queued job of each origin (client, rescoring) has waited (0 when none waits)."""
        rows = self.db.all(
            "SELECT CASE WHEN origin = 'rescoring' THEN 'rescoring' ELSE 'client' END AS origin,"
            " MIN(created_at) AS oldest FROM jobs WHERE state = 'queued' GROUP BY 1"
        )
        ages = {"client": 0.0, "rescoring": 0.0}
        return ages | {r["origin"]: max(0.0, time.time() - r["oldest"]) for r in rows}

    def requeue(self, job_id: str, worker: str) -> None:
        """Give a running job back to the queue (clean shutdown of its worker)."""
        with self.db.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL,"
                " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
                " WHERE id = ? AND worker = ? AND state = 'running'",
                (job_id, worker),
            )

    def recover_stale(self, stale_after_s: float, max_attempts: int = 2) -> list[str]:
        """Running jobs whose worker stopped beating: requeue (or fail after ``max_attempts``; cancel one
        whose cancel was requested)."""
        with self.db.transaction() as db:  # heartbeats and cutoff on one clock: the database's
            rows = db.execute(
                "SELECT id, attempts, cancel_requested FROM jobs WHERE state = 'running'"
                f" AND heartbeat_at < {self.db.now} - ?",
                (stale_after_s,),
            ).fetchall()
            for r in rows:
                if r["cancel_requested"]:
                    db.execute(
                        "UPDATE jobs SET state = 'cancelled', finished_at = ?, error = 'cancelled' WHERE id = ?",
                        (time.time(), r["id"]),
                    )
                elif r["attempts"] >= max_attempts:
                    db.execute(
                        "UPDATE jobs SET state = 'failed', finished_at = ?, error = ?, error_code = 'interrupted'"
                        " WHERE id = ?",
                        (time.time(), f"interrupted {r['attempts']} times (worker stopped); resubmit", r["id"]),
                    )
                else:
                    db.execute("UPDATE jobs SET state = 'queued', worker = NULL WHERE id = ?", (r["id"],))
                if r["cancel_requested"] or r["attempts"] >= max_attempts:
                    enqueue_job_event(db, r["id"])
                audit(db, "system", "job.recover", r["id"], {"attempts": r["attempts"]})
            return [r["id"] for r in rows]

    def latest_for_slide(self, slide: str) -> Job | None:
        """The slide's most recent successful job (the one whose queue is current)."""
        return Job.from_row(
            self.db.one(
                "SELECT * FROM jobs WHERE slide = ? AND state = 'succeeded' ORDER BY finished_at DESC LIMIT 1",
                (slide,),
            )
        )

    def expirable(self, superseded_before: float, limit: int = 1000) -> list[str]:
        """Successful jobs whose files retention may remove: a newer successful job of their slide
        finished before ``superseded_before`` (so a slide's latest job is never one, and a queue keeps
        its patches for the whole retention after a rescoring), and no correction was made on one of
        their queue items (their mask is that correction's 'before')."""
        rows = self.db.all(
            "SELECT j.id FROM jobs j WHERE j.state = 'succeeded' AND j.expired_at IS NULL"
            " AND EXISTS (SELECT 1 FROM jobs n WHERE n.slide = j.slide AND n.state = 'succeeded'"
            " AND n.finished_at > j.finished_at AND n.finished_at < ?)"
            f" AND NOT {corrected_on('j.id')} ORDER BY j.finished_at LIMIT ?",
            (superseded_before, limit),
        )
        return [r["id"] for r in rows]

    def mark_expired(self, job_id: str) -> bool:
        """Mark the job's files as removed, unless a correction was made on it meanwhile (checked in the
        same statement). True when marked: then, and only then, its files may go."""
        with self.db.transaction() as db:
            cur = db.execute(
                f"UPDATE jobs SET expired_at = ? WHERE id = ? AND expired_at IS NULL AND NOT {corrected_on('jobs.id')}",
                (time.time(), job_id),
            )
            return cur.rowcount == 1

    def expired_ids(self) -> set[str]:
        return {r["id"] for r in self.db.all("SELECT id FROM jobs WHERE expired_at IS NOT NULL")}

    def segmented_slides(self) -> list[str]:
        return [r["slide"] for r in self.db.all("SELECT DISTINCT slide FROM jobs WHERE state = 'succeeded'")]
