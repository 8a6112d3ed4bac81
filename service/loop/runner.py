"""The background fine-tune runner (its own process: `uga runner`). It only schedules.

Loop: when enough new corrections exist (or an admin asks), build a candidate from the current
version, gate it, commit it to the registry (immutable), and promote it only if it passed. Serving
never waits for this: workers pick the new version up through their pointer watchers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, start_http_server

from service.config import Settings
from service.loop.candidate import build_candidate, corrections_used, source_bank_problem
from service.loop.corrections import redrawn_roles
from service.loop.gate import gate_candidate
from service.loop.jobs import enqueue_rescoring
from service.loop.promotion import promote_candidate
from service.loop.registry import Registry
from service.loop.store_metrics import StoreCollector
from service.loop.worker import STORE_ERRORS
from service.store import FinetuneRun, Lease, Store
from service.vocabulary import GATED_RUN_STATES

log = logging.getLogger("uga.runner")
MAX_BACKOFF_S = 3600.0
ALIVE = "runner.alive"  # in the data directory: touched by the runner's loop, read by its liveness probe
LEASE = "runner"  # one runner per deployment: startup's sweep and recovery assume no other is working


class Runner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store.open(settings)
        self.registry = Registry(self.store, settings.data_dir, settings.baseline_dir)
        self._stop = threading.Event()
        self.lease: Lease | None = None  # the deployment's runner lease, once main() holds it
        self.lost_lease = False
        self.failures = 0  # consecutive failed runs: the next waits runner_poll_s × 2^failures (≤ 1 h)
        self.rescored_for: int | None = None  # the pointer move every slide's queue was last brought to
        self.metrics = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.metrics)
        self.heartbeat = Gauge(
            "uga_runner_heartbeat_timestamp_seconds",
            "When the runner last looked for work or reported progress",
            registry=self.metrics,
        )
        if settings.store_metrics == "runner":  # the one exporter of the deployment's store metrics
            self.metrics.register(StoreCollector(self.store))

    def serve_metrics(self) -> None:
        """Serve /metrics on UGA_RUNNER_METRICS_HOST:PORT (a daemon thread; port 0: not at all)."""
        s = self.settings
        if s.runner_metrics_port:
            start_http_server(s.runner_metrics_port, addr=s.runner_metrics_host, registry=self.metrics)
            log.info("metrics on http://%s:%d/metrics", s.runner_metrics_host, s.runner_metrics_port)

    def stop(self, *_: object) -> None:
        self._stop.set()

    def beat(self) -> None:
        """The loop is alive: the metric, and a file `uga runner --check` (the liveness probe) reads."""
        self.heartbeat.set_to_current_time()
        alive = self.settings.data_dir / ALIVE
        try:
            alive.touch()
        except OSError as exc:  # a full or read-only volume: the store will say more
            log.warning("cannot mark the runner alive in %s: %s", alive, exc)

    def pause(self, seconds: float) -> None:
        """Wait ``seconds`` (or until stopped), beating at least every 30 s."""
        end = time.monotonic() + seconds
        while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
            self.beat()
            self._stop.wait(min(30.0, left))

    def device(self) -> str:
        import torch

        want = self.settings.finetune_device
        return ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want

    def redraw_gate_roles(self) -> None:
        """Corrections no run has used yet take the current hold-out rule (UGA_HOLDOUT_EVERY) and the
        role of an earlier correction they overlap: also those two replicas ingested side by side."""
        unseen = {c.id for c in self.store.corrections.unseen()}
        standing = self.store.corrections.list(1_000_000, withdrawn=False)
        redrawn = redrawn_roles(standing, unseen, self.settings.holdout_every)
        if redrawn:
            self.store.corrections.set_holdout(redrawn)
            log.warning("%d unused corrections took a new gate role (hold-out rule, overlaps)", len(redrawn))

    def startup(self) -> None:
        self.registry.ensure_baseline()
        for run in self.store.runs.fail_interrupted():
            log.warning("run %s was interrupted by a runner crash: marked failed, work will be redone", run.id)
        for name in self.registry.sweep():
            log.warning("moved aside unregistered model directory %s (interrupted run)", name)
        self.redraw_gate_roles()
        current = self.store.models.current()
        stranded = [  # gated, never current (an admin may have promoted and rolled back a candidate: not it)
            v.version
            for v in self.store.models.list()
            if v.status == "candidate" and v.version != current and not self.store.models.was_current(v.version)
        ]
        for version in stranded:  # gated, but the runner stopped before the pointer moved: redo the run
            why = "the runner stopped between its gate and its promotion; its corrections train with the next run"
            self.store.models.set_status(version, "rejected", why, actor="runner")
            log.warning("candidate %s was never promoted (runner stopped): rejected, run requested again", version)
        if stranded:
            self.store.runs.request("recovery", "runner")
        self.keep_queues_current()

    def keep_queues_current(self) -> None:
        """Queue rescoring of every slide not yet segmented by the current version, whenever the pointer
        moved since this runner last looked: a promotion's or an admin's rescoring cut short (a crash,
        the store gone for a moment) is finished here, not left until the runner restarts; so is an
        automatic rollback (slides a few replicas re-segmented with the version that failed elsewhere)."""
        moves = self.store.models.pointer_history(1)  # the newest move names the version it moved to
        if not moves or moves[0]["id"] == self.rescored_for:
            return
        current, move = moves[0]["version"], moves[0]["id"]
        try:
            again = enqueue_rescoring(self.store, self.settings, current, "runner")
        except STORE_ERRORS as exc:
            log.warning("rescoring for %s not queued yet (%s); next poll", current, exc)
            return
        if again:
            log.warning("%d slides not yet segmented by %s (a rescoring cut short): queued", len(again), current)
        self.rescored_for = move

    def next_run(self) -> FinetuneRun | None:
        """The oldest requested run, or a new one when enough unseen corrections wait."""
        requested = self.store.runs.oldest_requested()
        if requested is not None:
            return requested
        if len(self.store.corrections.unseen()) >= self.settings.finetune_min_corrections:
            run, _ = self.store.runs.request("threshold", "runner")
            return run
        return None

    def holds_lease(self) -> bool:
        """Still the one runner (a PostgreSQL lease goes with its connection); if not, stop working:
        another runner may have taken over, and its startup failed this one's run."""
        if self.lease is None or self.lease.held():
            return True
        if not self.lost_lease:
            log.error("the runner lease was lost (database connection gone): stopping; a restart waits for it")
        self.lost_lease = True
        self._stop.set()
        return False

    def serve_forever(self) -> None:
        self.startup()
        log.info("runner ready (threshold %d corrections)", self.settings.finetune_min_corrections)
        while not self._stop.is_set() and self.holds_lease():
            self.beat()
            run = self.next_run()
            if run is None:
                self.keep_queues_current()
                self.pause(self.settings.runner_poll_s)
                continue
            state = self.execute(run)
            self.failures = self.failures + 1 if state == "failed" else 0
            if self.failures:  # a run that fails fast (a broken file, no device) is not retried back to back
                wait = min(MAX_BACKOFF_S, self.settings.runner_poll_s * 2**self.failures)
                log.warning("run %s failed (%d in a row): next attempt in %.0f s", run.id, self.failures, wait)
                self.pause(wait)

    def execute(self, run: FinetuneRun) -> str:
        """One fine-tune run from start to promote / reject / fail. Returns the final state."""
        s, runs = self.settings, self.store.runs
        t0 = time.time()
        self.redraw_gate_roles()  # overlapping corrections ingested at once each drew their own role
        parent = self.store.models.current()
        train = self.store.corrections.unused_for_training(parent)
        holdout = self.store.corrections.held_out()
        used = corrections_used(s, train, holdout)
        runs.start(run.id, parent, used, total=0)  # the fine-tune plans its steps (by corrected area): then known
        if not train:
            runs.end(run.id, "rejected", candidate=None, metrics={}, reason="no new training corrections")
            return "rejected"
        last, withdrawn = [0.0], []

        def progress(done: int, total: int) -> None:
            if self._stop.is_set():
                raise InterruptedError("runner stopping")
            if time.monotonic() - last[0] > 1.0 or done == total:
                last[0] = time.monotonic()
                if not self.holds_lease():
                    raise InterruptedError("runner lease lost")
                runs.progress(run.id, done, total)
                self.beat()

        try:
            candidate = build_candidate(
                self.registry,
                s,
                parent=parent,
                train=train,
                used=used,
                run_id=run.id,
                seed=int(t0) % 100000,
                progress=progress,
                device=self.device(),
            )
            result = gate_candidate(self.registry, s, candidate, parent=parent, holdout=holdout)
            result["duration_s"] = round(time.time() - t0, 1)
            if not self.holds_lease():  # another runner may own this run now: register and promote nothing
                raise InterruptedError("runner lease lost")
            withdrawn = self.store.corrections.withdrawn_among(used)
            if not withdrawn:
                _, reason = self.registry.commit_gated(candidate.staging, candidate.card, result, used)
        except InterruptedError:  # a stop (SIGTERM: a rolling update): an admin's request is asked again
            if self.lost_lease:  # the files and the run may be another runner's now: touch nothing
                return "failed"
            self.registry.discard_staging()
            runs.interrupt(run.id, "runner stopped mid-run")
            return "failed"
        except Exception as exc:  # noqa: BLE001 - recorded on the run, the loop continues
            log.exception("fine-tune run %s failed", run.id)
            if self.holds_lease():  # else the staging directories may be the new runner's
                self.registry.discard_staging()  # a full volume gets its space back before the retry
            runs.end(run.id, "failed", candidate=None, metrics={}, reason=f"{type(exc).__name__}: {exc}"[:300])
            return "failed"
        if withdrawn:
            return self.drop_withdrawn(run, withdrawn)
        runs.gated(run.id, candidate.version, dict(result))
        status = "rejected"
        if result.passed and not self.holds_lease():  # the new runner rejects it as stranded and redoes the run
            return "failed"
        if result.passed:
            reason = promote_candidate(self.registry, s, candidate.version, parent=parent, run=run.id)
            status = "promoted" if reason is None else "rejected"
        runs.end(run.id, status, candidate=candidate.version, metrics=dict(result), reason=reason)
        log.info("run %s: %s %s (%s)", run.id, status, candidate.version, reason or "gate passed")
        if status == "rejected" and self.store.corrections.withdrawn_among(used):  # withdrawn before the pointer moved
            self.store.runs.request("withdrawal", "runner")
        return status

    def drop_withdrawn(self, run: FinetuneRun, withdrawn: list[str]) -> str:
        """A run trained or gated on corrections withdrawn meanwhile registers nothing; the others
        start a new run at once."""
        self.registry.discard_staging()
        why = f"corrections withdrawn during the run ({', '.join(withdrawn)}); the others train with the next run"
        self.store.runs.end(run.id, "rejected", candidate=None, metrics={}, reason=why)  # its gate judged nothing
        self.store.runs.request("withdrawal", "runner")
        log.warning("run %s: %s", run.id, why)
        return "rejected"


def check(settings: Settings, stale_s: float = 600.0) -> tuple[bool, str]:
    """Liveness for Kubernetes: the runner's loop has beaten lately (once it has started), the store
    opens, and a running run has a recent heartbeat."""
    if not settings.database_url and not (settings.data_dir / "uga.sqlite").is_file():  # never make one here
        return False, f"no store in {settings.data_dir} (is UGA_DATA_DIR the deployment's data directory?)"
    alive = settings.data_dir / ALIVE
    if alive.exists() and (age := time.time() - alive.stat().st_mtime) > stale_s:
        return False, f"the runner's loop has not beaten for {age:.0f} s (stuck?)"
    try:
        store = Store.open(settings)
        running = [r for r in store.runs.list(5) if r.state == "running"]
    except Exception as exc:  # noqa: BLE001
        return False, f"store unavailable: {exc}"
    for r in running:
        if time.time() - (r.heartbeat_at or 0) > stale_s:
            return False, f"run {r.id} has no heartbeat for {stale_s:.0f}s"
    return True, "ok"


def main(settings: Settings, once: bool = False) -> int:
    # before torch loads: no busy-waiting OpenMP threads (measured 3-5x slower fine-tunes next to serving)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.nice(5)
    if settings.finetune_source_bank is not None and (why := source_bank_problem(settings.finetune_source_bank)):
        print(f"uga: error: UGA_FINETUNE_SOURCE_BANK: {why}", file=sys.stderr)
        return 2
    runner = Runner(settings)
    try:
        if not once:  # a one-shot run is over before anything would scrape it
            runner.serve_metrics()
    except OSError as exc:
        where = f"{settings.runner_metrics_host}:{settings.runner_metrics_port}"
        print(
            f"uga: error: runner metrics on {where}: {exc.strerror or exc} (set UGA_RUNNER_METRICS_PORT)",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    lease = runner.store.try_lease(LEASE)
    if lease is None and once:
        print("uga: error: another runner is running (it holds the runner lease); let it work", file=sys.stderr)
        return 2
    while lease is None and not runner._stop.is_set():  # a rolling update: the old runner is still ending
        log.warning("another runner holds the runner lease: waiting for it to stop")
        runner.pause(max(settings.runner_poll_s, 5.0))
        lease = runner.store.try_lease(LEASE)
    if lease is None:
        return 0
    runner.lease = lease
    try:
        if once:
            runner.startup()
            run = runner.next_run()
            return 0 if run is None or runner.execute(run) in GATED_RUN_STATES else 1
        runner.serve_forever()
        return 1 if runner.lost_lease else 0
    finally:
        lease.release()
