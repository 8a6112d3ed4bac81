"""The background fine-tune runner (its own process: `uga runner`).

Loop: when enough new corrections exist (or an admin asks), fine-tune every member of the current
version on them plus source replay, export ONNX into a staging directory, gate the candidate, then
register it (immutable) and move the 'current' pointer only if it passed. Serving never waits for
this: workers pick the new version up through their pointer watchers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from datetime import UTC, datetime

from service.config import Settings
from service.inference.evaluation import pairs_overlap
from service.loop.corrections import load_pair
from service.loop.jobs import enqueue_rescoring
from service.loop.registry import Registry, check_outputs_finite, load_ensemble, read_card
from service.store import Store

log = logging.getLogger("uga.runner")


class GateResult(dict):
    @property
    def passed(self) -> bool:
        return bool(self["passed"])


def gate(current, candidate, holdout_bank, heldout_pairs, *, margin: float, min_heldout: int) -> GateResult:
    """Promotion rule: finite outputs; source-holdout Dice drop <= margin; not worse on held-out corrections."""
    images, masks = holdout_bank
    cur_src, cur_ok = pairs_overlap(current, images, masks)
    cand_src, cand_ok = pairs_overlap(candidate, images, masks)
    result = GateResult(
        finite=cand_ok,
        source_holdout_dice={"current": round(cur_src.dice, 4), "candidate": round(cand_src.dice, 4)},
        margin=margin,
        heldout_corrections=len(heldout_pairs[0]),
    )
    reasons = []
    if not cand_ok:
        reasons.append("candidate outputs are not finite")
    if cand_src.dice < cur_src.dice - margin:
        reasons.append(f"source holdout Dice dropped {cur_src.dice:.3f} -> {cand_src.dice:.3f} (margin {margin})")
    if len(heldout_pairs[0]) >= min_heldout:
        cur_h, _ = pairs_overlap(current, *heldout_pairs)
        cand_h, _ = pairs_overlap(candidate, *heldout_pairs)
        result["heldout_dice"] = {"current": round(cur_h.dice, 4), "candidate": round(cand_h.dice, 4)}
        if cand_h.dice < cur_h.dice:
            reasons.append(f"worse on held-out corrections: {cur_h.dice:.3f} -> {cand_h.dice:.3f}")
    else:
        result["heldout_dice"] = None
        result["heldout_note"] = f"fewer than {min_heldout} held-out corrections: not gated on them yet"
    result["passed"] = not reasons
    result["reasons"] = reasons
    return result


class Runner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store(settings.data_dir)
        self.registry = Registry(self.store, settings.data_dir, settings.baseline_dir)
        self.corrections_dir = settings.data_dir / "corrections"
        self._stop = threading.Event()

    def stop(self, *_: object) -> None:
        self._stop.set()

    def device(self) -> str:
        import torch

        want = self.settings.finetune_device
        return ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want

    def startup(self) -> None:
        self.registry.ensure_baseline()
        for run_id in self.store.fail_interrupted_runs():
            log.warning("run %s was interrupted by a runner crash: marked failed, work will be redone", run_id)
        for name in self.registry.sweep():
            log.warning("removed unregistered model directory %s (interrupted run)", name)

    def new_corrections(self) -> list[dict]:
        """Corrections no registered version has seen (for training or as held-out)."""
        seen = self.store.seen_corrections()
        return [c for c in self.store.list_corrections(100000) if c["id"] not in seen]

    def next_run(self) -> dict | None:
        runs = [r for r in self.store.runs(20) if r["state"] == "requested"]
        if runs:
            return runs[-1]
        if len(self.new_corrections()) >= self.settings.finetune_min_corrections:
            run, _ = self.store.request_run("threshold", "runner")
            return run
        return None

    def serve_forever(self) -> None:
        self.startup()
        log.info("runner ready (threshold %d corrections)", self.settings.finetune_min_corrections)
        while not self._stop.is_set():
            run = self.next_run()
            if run is None:
                self._stop.wait(self.settings.runner_poll_s)
                continue
            self.execute(run)

    def execute(self, run: dict) -> str:
        """One fine-tune run from start to promote / reject / fail. Returns the final state."""
        from models.bank import load_bank
        from models.export import export_ensemble
        from models.finetune import FinetuneBudget, finetune_members, save_members

        s = self.settings
        t0 = time.time()
        parent = self.store.current_version()
        parent_dir = self.registry.path(parent)
        train = self.store.unused_corrections()
        holdout = [c for c in self.store.list_corrections(100000) if c["holdout"]]
        budget = FinetuneBudget(
            steps=s.finetune_steps,
            batch=s.finetune_batch,
            patch=s.finetune_patch,
            lr=s.finetune_lr,
            replay_share=s.finetune_replay_share,
            threads=s.finetune_threads,
            seed=int(t0) % 100000,
        )
        used = {"train": [c["id"] for c in train], "holdout": [c["id"] for c in holdout]}
        n_members = int(read_card(parent_dir)["recipe"]["members"])
        self.store.start_run(run["id"], parent, used, total=budget.steps * n_members)
        if not train:
            self.store.end_run(run["id"], "rejected", candidate=None, metrics={}, reason="no new training corrections")
            return "rejected"
        try:
            pairs = [load_pair(self.corrections_dir, c["id"]) for c in train]
            replay = load_bank(self.settings.baseline_dir / "replay.npz")
            last = [0.0]

            def progress(done: int, total: int) -> None:
                if self._stop.is_set():
                    raise InterruptedError("runner stopping")
                if time.monotonic() - last[0] > 1.0 or done == total:
                    last[0] = time.monotonic()
                    self.store.run_progress(run["id"], done)

            members, ckpt = finetune_members(
                parent_dir / "members.pt",
                ([p[0] for p in pairs], [p[1] for p in pairs]),
                replay,
                budget,
                progress=progress,
                device=self.device(),
            )
            staging = self.registry.staging_dir()
            staging.mkdir(parents=True)
            sha = export_ensemble(members, staging / "ensemble.onnx")
            save_members(members, ckpt["recipe"], staging / "members.pt", {"parent": parent})
            version = f"ft-{datetime.now(UTC):%Y%m%d%H%M%S}-{sha[:8]}"
            card = {
                **read_card(parent_dir),
                "name": "uga-finetuned",
                "version": version,
                "sha256": sha,
                "parent": parent,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "finetune": {"budget": budget.__dict__, "corrections": used, "run": run["id"]},
            }
            (staging / "card.json").write_text(json.dumps(card, indent=2))
            final = self.registry.commit_dir(staging, version)
            candidate = load_ensemble(final, threads=s.finetune_threads)
            check_outputs_finite(candidate)
            current = load_ensemble(parent_dir, threads=s.finetune_threads)
            heldout_pairs = [load_pair(self.corrections_dir, c["id"]) for c in holdout]
            result = gate(
                current,
                candidate,
                load_bank(s.baseline_dir / "holdout.npz"),
                ([p[0] for p in heldout_pairs], [p[1] for p in heldout_pairs]),
                margin=s.gate_margin,
                min_heldout=s.gate_min_heldout,
            )
            result["duration_s"] = round(time.time() - t0, 1)
            card["metrics"] = {**card.get("metrics", {}), "gate": dict(result)}
            (final / "card.json").write_text(json.dumps(card, indent=2))
        except InterruptedError:
            self.store.end_run(run["id"], "failed", candidate=None, metrics={}, reason="runner stopped mid-run")
            return "failed"
        except Exception as exc:  # noqa: BLE001 - recorded on the run, the loop continues
            log.exception("fine-tune run %s failed", run["id"])
            self.store.end_run(
                run["id"], "failed", candidate=None, metrics={}, reason=f"{type(exc).__name__}: {exc}"[:300]
            )
            return "failed"
        status = "promoted" if result.passed else "rejected"
        reason = None if result.passed else "; ".join(result["reasons"])
        self.store.register_version(  # a passing candidate is 'candidate' until the pointer really moved
            {
                "version": version,
                "parent": parent,
                "sha256": sha,
                "path": str(final),
                "status": "candidate" if result.passed else "rejected",
                "reason": reason,
                "metrics": dict(result),
                "corrections": used,
            },
            actor="runner",
        )
        if result.passed:
            if self.store.move_pointer(version, action="promote", actor="runner", expect=parent):
                self.store.set_version_status(version, "promoted", None, actor="runner")
                enqueue_rescoring(self.store, self.settings, version, "runner")
            else:
                status, reason = "rejected", "the current version changed during the run; not promoted over it"
                self.store.set_version_status(version, "rejected", reason, actor="runner")
        self.store.end_run(run["id"], status, candidate=version, metrics=dict(result), reason=reason)
        log.info("run %s: %s %s (%s)", run["id"], status, version, reason or "gate passed")
        return status


def check(settings: Settings, stale_s: float = 600.0) -> tuple[bool, str]:
    """Liveness for Kubernetes: the store opens and a running run has a recent heartbeat."""
    try:
        store = Store(settings.data_dir)
        running = [r for r in store.runs(5) if r["state"] == "running"]
    except Exception as exc:  # noqa: BLE001
        return False, f"store unavailable: {exc}"
    for r in running:
        if time.time() - (r["heartbeat_at"] or 0) > stale_s:
            return False, f"run {r['id']} has no heartbeat for {stale_s:.0f}s"
    return True, "ok"


def main(settings: Settings, once: bool = False) -> int:
    # before torch loads: no busy-waiting OpenMP threads (measured 3-5x slower fine-tunes next to serving)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.nice(5)
    runner = Runner(settings)
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    if once:
        runner.startup()
        run = runner.next_run()
        return 0 if run is None or runner.execute(run) in ("promoted", "rejected") else 1
    runner.serve_forever()
    return 0
