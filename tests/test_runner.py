"""The runner's scheduling: which run comes next, and what survives a runner crash."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import service.loop.runner as runner_module
from models.bank import save_bank
from service.config import Settings
from service.loop.candidate import build_candidate, corrections_used, finetune_budget
from service.loop.corrections import write_correction_files
from service.loop.runner import Runner
from service.store import Correction, ModelVersion, Store
from tests.conftest import REPO


def _runner(tmp_path) -> Runner:
    settings = Settings(data_dir=tmp_path / "data", baseline_dir=REPO / "models" / "baseline")
    runner = Runner(settings)
    runner.registry.ensure_baseline()
    return runner


def test_an_admin_run_killed_mid_run_is_requested_again(tmp_path):
    runner = _runner(tmp_path)
    run, _ = runner.store.runs.request("admin", "dr.admin")
    runner.store.runs.start(run.id, runner.store.models.current(), {}, total=10)  # ... and the runner dies
    assert runner.next_run() is None  # running, not requested: nothing new to pick up
    runner.startup()  # the restarted runner
    assert runner.store.runs.get(run.id).state == "failed"
    redo = runner.next_run()
    assert redo is not None and redo.id != run.id
    assert redo.state == "requested" and redo.trigger == "admin" and redo.requested_by == "dr.admin"


def test_a_threshold_run_killed_mid_run_waits_for_the_threshold_again(tmp_path):
    runner = _runner(tmp_path)
    run, _ = runner.store.runs.request("threshold", "runner")
    runner.store.runs.start(run.id, runner.store.models.current(), {}, total=10)
    runner.startup()
    assert runner.store.runs.get(run.id).state == "failed"
    assert runner.next_run() is None  # no unseen corrections: nothing to redo yet


def _correction(i: int, holdout: int = 0):
    return Correction(
        id=f"{i:032d}",
        slide="a.tif",
        x=64 * i,  # one region each
        y=0,
        width=8,
        height=8,
        mpp=1.0,
        queue_item_id=None,
        proposed_by_version=None,
        annotator="dr.a",
        tumour_fraction=0.5,
        holdout=holdout,
        created_at=time.time() + i,
        model_dice=None,
    )


def _register(store, version: str, status: str, corrections: dict | None = None, reason: str | None = None) -> None:
    """A registered fine-tune of the current version (no files: the store's view alone)."""
    parent = store.models.current()
    store.models.register(
        ModelVersion(
            version=version,
            parent=parent,
            sha256="x",
            path="/nowhere",
            status=status,
            reason=reason,
            corrections=corrections,
            created_at=time.time(),
        )
    )


def test_held_out_corrections_alone_start_one_run_not_an_endless_row_of_them(tmp_path):
    runner = _runner(tmp_path)
    runner.settings.finetune_min_corrections = 1
    runner.settings.holdout_every = 1  # every region held out, as this one was drawn
    runner.store.corrections.add(_correction(1, holdout=1), "dr.a")
    run = runner.next_run()
    assert run is not None and runner.execute(run) == "rejected"  # nothing to train on
    assert runner.next_run() is None  # the same held-out correction does not start another
    runner.store.corrections.add(_correction(2), "dr.a")
    assert runner.next_run() is not None  # a new one does


def test_a_rejected_candidates_corrections_are_trained_on_again_until_the_model_learns_them(tmp_path):
    runner = _runner(tmp_path)
    store, base = runner.store, runner.store.models.current()
    store.corrections.add(_correction(1), "dr.a")
    rejected = {"train": [_correction(1).id], "holdout": []}
    _register(store, "ft-rejected", "rejected", rejected, reason="worse on the holdout")
    assert [c.id for c in store.corrections.unused_for_training(base)] == [_correction(1).id]
    assert store.corrections.unused_for_training("ft-rejected") == []  # that version did learn it


def test_corrections_that_only_early_stopped_a_run_are_trained_on_by_the_next(tmp_path):
    runner = _runner(tmp_path)
    runner.settings.finetune_holdout_every = 2
    store, base = runner.store, runner.store.models.current()
    for i in range(1, 5):
        store.corrections.add(_correction(i), "dr.a")
    used = corrections_used(runner.settings, store.corrections.unused_for_training(base), [])
    assert used == {
        "train": [_correction(1).id, _correction(3).id],
        "early_stop": [_correction(2).id, _correction(4).id],  # split_holdout's every 2nd: never trained on
        "holdout": [],
    }
    _register(store, "ft-1", "promoted", used)
    store.models.move_pointer("ft-1", action="promote", actor="runner", expect=base)
    assert [c.id for c in store.corrections.unused_for_training("ft-1")] == used["early_stop"]
    assert store.corrections.unseen() == []  # used by a run: they do not start another on their own


def test_corrections_no_run_has_used_take_the_current_hold_out_rule_at_the_runners_start(tmp_path):
    from service.loop.corrections import gate_role, region_of

    runner = _runner(tmp_path)
    store = runner.store
    runner.settings.holdout_every = 2
    stored = [_correction(i) for i in range(12)]  # drawn by an earlier rule: all trained on
    for c in stored:
        store.corrections.add(c, "dr.a")
    _register(store, "ft-old", "rejected", {"train": [stored[0].id], "holdout": []})  # one already used
    runner.startup()
    roles = {c.id: c.holdout for c in store.corrections.list()}
    assert roles[stored[0].id] == 0  # a used correction keeps the role it was used in
    assert all(roles[c.id] == gate_role(c.slide, region_of(c), [], 2) for c in stored[1:])
    assert 0 < sum(roles.values()) < 11  # some held out now, not all


def test_an_unused_correction_over_an_earlier_ones_tissue_takes_its_role_at_the_runners_start(tmp_path):
    """A later queue's patch shifted over a corrected one: whatever the hash says, it is gated on if the
    first was, trained on if the first was (no tissue on both sides of the gate)."""
    from dataclasses import replace

    from service.loop.corrections import held_out_for_gate, region_of

    runner = _runner(tmp_path)
    runner.settings.holdout_every = 2
    first = _correction(0)
    shifted = next(
        c
        for dx in range(1, 8)
        if held_out_for_gate("a.tif", region_of(c := replace(_correction(1), id="s" * 32, x=dx)), 2)
        != held_out_for_gate("a.tif", region_of(first), 2)
    )  # overlaps `first`, and its own hash would give it the other role
    apart = _correction(5)
    for c in (first, shifted, apart):
        runner.store.corrections.add(c, "dr.a")
    runner.startup()
    roles = {c.id: c.holdout for c in runner.store.corrections.list()}
    assert roles[shifted.id] == roles[first.id] == int(held_out_for_gate("a.tif", region_of(first), 2))
    assert roles[apart.id] == int(held_out_for_gate("a.tif", region_of(apart), 2))


def test_overlapping_corrections_ingested_side_by_side_share_one_role_before_a_run_uses_them(tmp_path, monkeypatch):
    """Two replicas ingest overlapping corrections at once: each drew its own role. The run's start
    redraws them before it reads which to train on and which to gate on."""
    from dataclasses import replace

    from service.loop.corrections import held_out_for_gate, region_of

    runner, run = _runner_with_one_run(tmp_path, monkeypatch, RuntimeError("stop after the redraw"))
    runner.settings.holdout_every = 2
    first = replace(_correction(0), id="f" * 32)
    first = replace(first, holdout=int(held_out_for_gate("a.tif", region_of(first), 2)))
    shifted = replace(_correction(2), id="s" * 32, x=4, created_at=first.created_at)  # the same instant
    shifted = replace(shifted, holdout=1 - first.holdout)  # its own draw: the other role
    for c in (first, shifted):
        runner.store.corrections.add(c, "dr.a")
    runner.execute(run)
    roles = {c.id: c.holdout for c in runner.store.corrections.list()}
    assert roles[shifted.id] == roles[first.id] == first.holdout


def test_a_run_that_fails_fast_is_retried_after_a_growing_pause(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise FileNotFoundError("corrections/abc/image.png")

    monkeypatch.setattr(runner_module, "build_candidate", broken)
    runner = _runner(tmp_path)
    runner.settings.runner_poll_s = 0.2
    for i in range(5):
        runner.store.corrections.add(_correction(i), "dr.a")
    thread = threading.Thread(target=runner.serve_forever, daemon=True)
    thread.start()
    time.sleep(2.0)  # pauses 0.4, 0.8, 1.6 s: three runs at most, not hundreds
    runner.stop()
    thread.join(10)
    failed = runner.store.runs.counts()["failed"]
    assert 1 <= failed <= 3 and runner.failures == failed


def _runner_with_one_run(tmp_path, monkeypatch, fault: BaseException, trigger: str = "admin"):
    """A runner whose build stages a version, then meets ``fault``; one ``trigger`` run requested."""
    runner = _runner(tmp_path)

    def build_then_fail(registry, *args, **kwargs):
        (registry.stage() / "ensemble.onnx").write_bytes(b"half an export")
        raise fault

    monkeypatch.setattr(runner_module, "build_candidate", build_then_fail)
    runner.store.corrections.add(_correction(1), "dr.a")
    run, _ = runner.store.runs.request(trigger, "dr.admin")
    return runner, run


def test_a_failed_run_leaves_no_staged_files_behind(tmp_path, monkeypatch):
    runner, run = _runner_with_one_run(tmp_path, monkeypatch, OSError(28, "No space left on device"))
    assert runner.execute(run) == "failed"
    assert list(runner.registry.models_dir.glob(".staging-*")) == []  # its space is back before the retry
    assert "No space left" in runner.store.runs.get(run.id).reason


def test_an_admin_run_stopped_by_sigterm_is_requested_again(tmp_path, monkeypatch):
    runner, run = _runner_with_one_run(tmp_path, monkeypatch, InterruptedError("runner stopping"))
    assert runner.execute(run) == "failed"
    assert list(runner.registry.models_dir.glob(".staging-*")) == []
    assert runner.store.runs.get(run.id).state == "failed"
    redo = runner.next_run()
    assert redo is not None and redo.id != run.id and (redo.trigger, redo.requested_by) == ("admin", "dr.admin")


@pytest.mark.e2e
def test_a_real_runner_sent_sigterm_mid_training_exits_cleanly_and_its_admin_run_is_asked_again(tmp_path):
    """What Kubernetes does on every rollout: SIGTERM to `uga runner` while it trains. The process
    ends by itself within a progress report (exit 0, not killed by the signal), registers nothing,
    and an admin's run is requested again for the next runner."""
    runner = _runner(tmp_path)
    store, base = runner.store, runner.store.models.current()
    rng = np.random.default_rng(2)
    for i in range(2):
        write_correction_files(
            runner.settings.data_dir / "corrections",
            _correction(i).id,
            rng.integers(0, 255, (96, 96, 3), dtype=np.uint8),
            rng.random((96, 96)) > 0.5,
        )
        store.corrections.add(_correction(i), "dr.a")
    run, _ = store.runs.request("admin", "dr.admin")
    env = {
        **os.environ,
        "UGA_DATA_DIR": str(runner.settings.data_dir),
        "UGA_RUNNER_METRICS_PORT": "0",
        "UGA_FINETUNE_STEPS": "100000",  # far longer than the test waits
        "UGA_FINETUNE_MAX_STEPS": "100000",
        "UGA_RUNNER_POLL_S": "0.5",
    }
    log = tmp_path / "runner.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "runner"], env=env, stdout=out, stderr=out)
    try:
        deadline = time.time() + 180
        while not ((r := store.runs.get(run.id)).state == "running" and (r.progress_done or 0) > 0):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"no progress before SIGTERM:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    stopped = store.runs.get(run.id)
    assert (stopped.state, stopped.reason) == ("failed", "runner stopped mid-run")
    assert store.models.current() == base and [v.version for v in store.models.list()] == [base]
    redo = runner.next_run()
    assert redo is not None and redo.id != run.id and (redo.trigger, redo.requested_by) == ("admin", "dr.admin")


def test_a_run_ended_by_another_runner_keeps_that_outcome(tmp_path):
    runner = _runner(tmp_path)
    run, _ = runner.store.runs.request("threshold", "runner")
    runner.store.runs.start(run.id, runner.store.models.current(), {}, total=1)
    runner.store.runs.fail_interrupted()  # a second runner took over (a lost lease) and failed it
    runner.store.runs.end(run.id, "rejected", candidate="ft-1", metrics={}, reason="late")
    assert runner.store.runs.get(run.id).state == "failed"


def test_a_second_runner_is_refused_while_one_holds_the_lease(tmp_path):
    runner = _runner(tmp_path)
    lease = runner.store.try_lease(runner_module.LEASE)
    assert lease is not None
    env = {**os.environ, "UGA_DATA_DIR": str(tmp_path / "data"), "UGA_RUNNER_METRICS_PORT": "0"}
    once = subprocess.run(
        [sys.executable, "-m", "service.cli", "runner", "--once"], env=env, capture_output=True, text=True, timeout=120
    )
    assert once.returncode == 2 and once.stderr.strip().splitlines() == [
        "uga: error: another runner is running (it holds the runner lease); let it work"
    ]
    lease.release()


def test_a_runner_that_lost_its_lease_stops_and_touches_nothing(tmp_path, monkeypatch):
    from service.store import Lease

    runner, run = _runner_with_one_run(tmp_path, monkeypatch, AssertionError("never built"))
    monkeypatch.setattr(runner_module, "build_candidate", lambda *a, **k: pytest.fail("a run started"))
    still = [True]
    runner.lease = Lease(release=lambda: None, held=lambda: still[0])
    assert runner.holds_lease()
    still[0] = False  # the database connection that held it is gone
    runner.serve_forever()  # returns at once: no run taken
    assert runner.lost_lease and runner.store.runs.get(run.id).state == "requested"


def _runner_with_a_slide(tmp_path, source_slide) -> Runner:
    """A runner on the shipped baseline, with slide ``a.tif`` in its slide root."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(source_slide, slides / "a.tif")
    runner = Runner(Settings(data_dir=tmp_path / "data", baseline_dir=REPO / "models" / "baseline", slide_root=slides))
    runner.registry.ensure_baseline()
    return runner


def test_a_rescoring_cut_short_by_a_crash_is_queued_at_the_runners_start(tmp_path, source_slide):
    runner = _runner_with_a_slide(tmp_path, source_slide)
    store, current = runner.store, runner.store.models.current()
    old, _ = store.jobs.submit(
        slide="a.tif", options={"patch_um": 256}, resolved={}, model_version="older", dedup_key="k", actor="t"
    )
    store.jobs.claim("w")
    assert store.jobs.finish(old.id, "w", {"model_version": "older"}, [])  # the slide's latest is not current's
    runner.startup()  # e.g. after a crash between the promotion and its rescoring
    [new] = store.jobs.list("queued", 10)
    assert new.slide == "a.tif" and new.model_version == current and new.options == {"patch_um": 256}
    assert new.origin == "rescoring" and old.origin == "client"  # the per-slide metrics count only arrivals
    runner.startup()  # a second start queues nothing more
    assert len(store.jobs.list("queued", 10)) == 1


def test_an_admins_rescoring_cut_short_by_a_store_outage_is_finished_by_the_running_runner(
    tmp_path, source_slide, monkeypatch
):
    """The pointer moved, then the store went away before every slide was queued: the slide is not
    skipped as if it were unusable, and the runner queues it on its next poll, not at its next start."""
    from service.errors import Unavailable
    from service.loop import jobs as jobs_module
    from service.loop.promotion import move_current

    runner = _runner_with_a_slide(tmp_path, source_slide)
    settings = runner.settings
    store, baseline = runner.store, runner.store.models.current()
    runner.startup()
    job, _ = store.jobs.submit(
        slide="a.tif", options={"patch_um": 256}, resolved={}, model_version=baseline, dedup_key="k", actor="t"
    )
    store.jobs.claim("w")
    assert store.jobs.finish(job.id, "w", {"model_version": baseline}, [])
    newer = "v2"
    _register(store, newer, "candidate")
    real_submit = jobs_module.submit_segmentation

    def store_gone(*args, **kwargs):
        raise Unavailable("store_unavailable", "the database is unreachable; retry shortly")

    monkeypatch.setattr(jobs_module, "submit_segmentation", store_gone)
    with pytest.raises(Unavailable):
        move_current(runner.registry, settings, newer, action="manual-promote", actor="admin")
    assert store.models.current() == newer and store.jobs.list("queued", 10) == []
    monkeypatch.setattr(jobs_module, "submit_segmentation", real_submit)
    runner.keep_queues_current()  # what its loop does between runs
    [queued] = store.jobs.list("queued", 10)
    assert queued.slide == "a.tif" and queued.model_version == newer and queued.origin == "rescoring"


def test_the_liveness_probe_fails_when_the_runners_loop_stops_beating(tmp_path):
    runner = _runner(tmp_path)
    assert runner_module.check(runner.settings) == (True, "ok")  # not started yet: nothing to judge
    runner.beat()
    assert runner_module.check(runner.settings) == (True, "ok")
    stuck = time.time() - 3600
    os.utime(runner.settings.data_dir / runner_module.ALIVE, (stuck, stuck))  # the loop hangs for an hour
    ok, why = runner_module.check(runner.settings, stale_s=600)
    assert not ok and "has not beaten" in why


def _run_with_a_gated_candidate(tmp_path):
    """A runner, its store, the baseline, and a running run whose candidate ft-1 passed its gate."""
    runner = _runner(tmp_path)
    store, base = runner.store, runner.store.models.current()
    run, _ = store.runs.request("threshold", "runner")
    store.runs.start(run.id, base, {"train": [], "holdout": []}, total=10)
    _register(store, "ft-1", "candidate")
    return runner, store, base, run


def test_a_crash_right_after_a_promotion_leaves_the_run_promoted_not_failed(tmp_path):
    runner, store, base, run = _run_with_a_gated_candidate(tmp_path)
    store.runs.gated(run.id, "ft-1", {"passed": True, "duration_s": 12.5})
    assert runner_module.promote_candidate(runner.registry, runner.settings, "ft-1", parent=base, run=run.id) is None
    runner.startup()  # the runner died before recording the run's end
    after = store.runs.get(run.id)
    assert (after.state, after.candidate, after.metrics) == ("promoted", "ft-1", {"passed": True, "duration_s": 12.5})
    assert store.models.current() == "ft-1" and store.models.get("ft-1").status == "promoted"


def test_a_crash_between_the_gate_and_the_promotion_redoes_the_run(tmp_path):
    runner = _runner(tmp_path)
    store, base = runner.store, runner.store.models.current()
    store.corrections.add(_correction(1), "dr.a")
    run, _ = store.runs.request("threshold", "runner")
    used = {"train": [_correction(1).id], "holdout": []}
    store.runs.start(run.id, base, used, total=10)
    _register(store, "ft-1", "candidate", used)  # commit_gated registered the passed candidate; the runner died
    assert runner.next_run() is None  # its corrections count as used: nothing would redo the run
    runner.startup()
    assert store.models.get("ft-1").status == "rejected" and "stopped" in store.models.get("ft-1").reason
    assert store.models.current() == base
    redo = runner.next_run()
    assert redo is not None and redo.trigger == "recovery"
    assert [c.id for c in store.corrections.unused_for_training(base)] == [_correction(1).id]  # trained again


def _staged_baseline_candidate(base: str):
    """A stand-in for build_candidate: the baseline's ONNX staged as candidate ft-x (no training)."""
    from service.inference.ensemble import read_card
    from service.loop.candidate import Candidate
    from service.loop.registry import finetuned_card

    def build(registry, settings, **kw):
        staging = registry.stage()
        shutil.copy(REPO / "models" / "baseline" / "ensemble.onnx", staging / "ensemble.onnx")
        baseline = read_card(settings.baseline_dir)
        card = finetuned_card(baseline, version="ft-x", sha256="f" * 64, parent=base, finetune={"run": kw["run_id"]})
        return Candidate(staging, card)

    return build


def test_a_runner_that_loses_its_lease_during_the_gate_registers_and_promotes_nothing(tmp_path, monkeypatch):
    from service.loop.gate import GateResult
    from service.store import Lease

    runner = _runner(tmp_path)
    store, base = runner.store, runner.store.models.current()
    held = [True]
    runner.lease = Lease(release=lambda: None, held=lambda: held[0])

    def gate_while_the_connection_goes(*args, **kwargs):
        held[0] = False
        return GateResult(passed=True, reasons=[])

    monkeypatch.setattr(runner_module, "build_candidate", _staged_baseline_candidate(base))
    monkeypatch.setattr(runner_module, "gate_candidate", gate_while_the_connection_goes)
    store.corrections.add(_correction(1), "dr.a")
    run, _ = store.runs.request("admin", "dr.admin")
    assert runner.execute(run) == "failed" and runner.lost_lease
    assert store.models.current() == base and store.models.get("ft-x") is None
    assert store.runs.get(run.id).state == "running"  # left to the runner that took over: its startup fails it
    assert len(list(runner.registry.models_dir.glob(".staging-*"))) == 1  # and sweeps this


def test_a_runner_that_loses_its_lease_mid_training_stops_at_its_next_progress_report(tmp_path, monkeypatch):
    from service.store import Lease

    runner = _runner(tmp_path)
    held = [True]
    runner.lease = Lease(release=lambda: None, held=lambda: held[0])

    def train(registry, settings, *, progress, **kwargs):
        (registry.stage() / "members.pt").write_bytes(b"half a checkpoint")
        held[0] = False  # the database connection goes while the members train
        progress(1, 10)
        pytest.fail("training went on without the lease")

    monkeypatch.setattr(runner_module, "build_candidate", train)
    runner.store.corrections.add(_correction(1), "dr.a")
    run, _ = runner.store.runs.request("admin", "dr.admin")
    assert runner.execute(run) == "failed" and runner.lost_lease
    assert runner.store.runs.get(run.id).state == "running"  # the new runner's to fail and redo
    assert len(list(runner.registry.models_dir.glob(".staging-*"))) == 1  # nor removed: maybe the new one's


def test_a_run_another_runner_has_ended_promotes_nothing(tmp_path):
    runner, store, base, run = _run_with_a_gated_candidate(tmp_path)
    store.runs.fail_interrupted()  # the runner that took over failed it
    reason = runner_module.promote_candidate(runner.registry, runner.settings, "ft-1", parent=base, run=run.id)
    assert reason is not None and "another runner" in reason
    assert store.models.current() == base and store.runs.get(run.id).state == "failed"


def test_a_candidate_an_admin_promoted_and_rolled_back_is_not_taken_for_a_stranded_one(tmp_path):
    runner = _runner(tmp_path)
    store, base = runner.store, runner.store.models.current()
    _register(store, "ft-1", "candidate")
    store.models.move_pointer("ft-1", action="manual-promote", actor="dr.admin")
    store.models.move_pointer(base, action="rollback", actor="dr.admin")
    runner.startup()
    assert store.models.get("ft-1").status == "candidate" and runner.next_run() is None


def _bank(path, n: int = 10, slides=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 256, 256, 3), dtype=np.uint8)
    masks = (rng.random((n, 256, 256)) > 0.7).astype(np.uint8)
    save_bank(path, images, masks, np.arange(n) if slides else None)
    return path


def _misfit_bank(path, image_type=np.uint8):
    """Masks one pixel wider than their images; with another ``image_type``, the same size but that type."""
    width = 9 if image_type == np.uint8 else 8
    images, masks = np.zeros((2, 8, 8, 3), image_type), np.zeros((2, 8, width), np.uint8)
    np.savez_compressed(path, images=images, masks=masks, slides=np.arange(2))
    return path


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p / "nowhere.npz", "cannot read"),
        (lambda p: _bank(p / "noslides.npz", slides=False), "lacks slides"),
        (lambda p: (p / "junk.npz").write_bytes(b"not a zip") and p / "junk.npz", "cannot read"),
        (lambda p: _misfit_bank(p / "misfit.npz"), "do not fit together"),
        (lambda p: _misfit_bank(p / "float.npz", image_type=np.float32), "must be uint8"),
    ],
)
def test_an_unusable_source_bank_stops_the_runner_in_one_line(tmp_path, make, needle):
    bank = make(tmp_path)
    Store(tmp_path / "data").close()  # the deployment's store (`--once` refuses a data directory without one)
    env = {**os.environ, "UGA_DATA_DIR": str(tmp_path / "data"), "UGA_FINETUNE_SOURCE_BANK": str(bank)}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "runner", "--once"], env=env, capture_output=True, text=True, timeout=120
    )
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith("uga: error: UGA_FINETUNE_SOURCE_BANK: ") and needle in line


@pytest.mark.slow
def test_with_the_source_bank_the_runner_retrains_each_member_on_its_part_plus_the_corrections(tmp_path):
    """The arm the protocol validated (bench/PROTOCOL.md, retrain): a real, tiny fine-tune of every
    member of the shipped baseline, its card saying which arm made it."""
    bank = _bank(tmp_path / "train-bank.npz")
    settings = Settings(
        data_dir=tmp_path / "data",
        baseline_dir=REPO / "models" / "baseline",
        finetune_source_bank=bank,
        finetune_steps=1,
        finetune_max_steps=1,
        finetune_batch=2,
        finetune_patch=64,
    )
    runner = Runner(settings)
    base = runner.registry.ensure_baseline()
    rng = np.random.default_rng(1)
    train = []
    for i in range(2):
        write_correction_files(
            settings.data_dir / "corrections",
            _correction(i).id,
            rng.integers(0, 255, (96, 96, 3), dtype=np.uint8),
            rng.random((96, 96)) > 0.5,
        )
        train.append(_correction(i))
    candidate = build_candidate(
        runner.registry, settings, parent=base, train=train, used={}, run_id="r", seed=1,
        progress=lambda done, total: None, device="cpu",
    )  # fmt: skip
    assert candidate.card["finetune"]["budget"]["retrain"] is True
    assert (candidate.staging / "ensemble.onnx").is_file() and (candidate.staging / "members.pt").is_file()
    without = Settings(data_dir=tmp_path / "data", baseline_dir=REPO / "models" / "baseline")
    assert finetune_budget(without, 0).retrain is False  # no bank: the corrections-plus-replay arm


def test_a_correction_withdrawn_during_a_run_keeps_its_candidate_out_and_the_others_train_next(tmp_path, monkeypatch):
    from service.loop.gate import GateResult

    runner = _runner(tmp_path)
    store, base = runner.store, runner.store.models.current()

    def gate_while_a_pathologist_withdraws(*args, **kwargs):
        store.corrections.withdraw(_correction(1).id, "dr.a", "wrong gland")
        return GateResult(passed=True, reasons=[])

    monkeypatch.setattr(runner_module, "build_candidate", _staged_baseline_candidate(base))
    monkeypatch.setattr(runner_module, "gate_candidate", gate_while_a_pathologist_withdraws)
    for i in (1, 2):
        store.corrections.add(_correction(i), "dr.a")
    run, _ = store.runs.request("admin", "dr.admin")
    assert runner.execute(run) == "rejected"
    ended = store.runs.get(run.id)
    assert ended.state == "rejected" and _correction(1).id in ended.reason and ended.candidate is None
    assert store.models.current() == base and store.models.get("ft-x") is None
    assert not list(runner.registry.models_dir.glob(".staging-*"))
    redo = runner.next_run()
    assert redo is not None and redo.trigger == "withdrawal"
    assert [c.id for c in store.corrections.unused_for_training(base)] == [_correction(2).id]


def test_a_withdrawal_that_lands_just_before_the_promotion_keeps_the_pointer_where_it_is(tmp_path):
    runner = _runner(tmp_path)
    store, base = runner.store, runner.store.models.current()
    store.corrections.add(_correction(1), "dr.a")
    run, _ = store.runs.request("threshold", "runner")
    used = {"train": [], "holdout": [_correction(1).id]}  # gated on it: a withdrawn gate is no gate
    store.runs.start(run.id, base, used, total=10)
    _register(store, "ft-1", "candidate", used)
    store.corrections.withdraw(_correction(1).id, "dr.admin", "QC")  # after the runner's check, before the move
    reason = runner_module.promote_candidate(runner.registry, runner.settings, "ft-1", parent=base, run=run.id)
    assert reason is not None and "withdrawn" in reason
    assert store.models.current() == base and store.models.get("ft-1").status == "rejected"
    assert store.corrections.held_out() == []


def test_slides_re_segmented_by_a_version_that_then_rolled_back_by_itself_are_rescored(tmp_path, source_slide):
    """A promotion, a replica that re-segmented a slide with it, and an automatic rollback (the version
    failed to load elsewhere), all between two polls of the runner: the slide's queue follows the
    version serving again, not the failed one."""
    runner = _runner_with_a_slide(tmp_path, source_slide)
    store, baseline = runner.store, runner.store.models.current()
    job, _ = store.jobs.submit(
        slide="a.tif", options={"patch_um": 256}, resolved={}, model_version=baseline, dedup_key="k", actor="t"
    )
    store.jobs.claim("w")
    assert store.jobs.finish(job.id, "w", {"model_version": baseline}, [])
    runner.startup()
    _register(store, "v2", "candidate")
    assert store.models.move_pointer("v2", action="promote", actor="runner", expect=baseline)
    served, _ = store.jobs.submit(
        slide="a.tif", options={"patch_um": 256}, resolved={}, model_version="v2", dedup_key="k2", actor="t"
    )
    store.jobs.claim("w2")
    assert store.jobs.finish(served.id, "w2", {"model_version": "v2"}, [])  # one replica served v2
    assert store.models.fail_and_roll_back("v2", "failed to load: bad file", baseline)  # the others could not
    runner.keep_queues_current()
    [queued] = store.jobs.list("queued", 10)
    assert queued.slide == "a.tif" and queued.model_version == baseline and queued.origin == "rescoring"
