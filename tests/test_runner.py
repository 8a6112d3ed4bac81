"""The runner's scheduling: which run comes next, and what survives a runner crash."""

from __future__ import annotations

from service.config import Settings
from service.loop.runner import Runner
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
