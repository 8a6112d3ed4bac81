"""Model registry: atomic pointer, rollback, a version that fails to load, and the promotion gate."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from models.bank import load_bank
from service.inference.ensemble import read_card
from service.loop.gate import gate
from service.loop.model_holder import ModelHolder
from service.loop.registry import Registry, finetuned_card
from service.store import ModelVersion, Store
from tests.conftest import REPO

BASELINE = REPO / "models" / "baseline"


@pytest.fixture()
def registry(tmp_path):
    store = Store(tmp_path / "data")
    reg = Registry(store, tmp_path / "data", BASELINE)
    reg.ensure_baseline()
    return reg


def _register_copy(reg: Registry, version: str, *, corrupt: bool = False, truncate: bool = False) -> str:
    d = reg.models_dir / version
    shutil.copytree(BASELINE, d)
    card = {**read_card(BASELINE), "version": version, "parent": reg.store.models.current()}
    (d / "card.json").write_text(json.dumps(card))
    onnx = d / "ensemble.onnx"
    if corrupt:
        onnx.write_bytes(b"definitely not onnx")
    if truncate:  # another host's copy not fully written yet, as this host sees the shared volume
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    reg.store.models.register(
        ModelVersion(
            version=version,
            parent=card["parent"],
            sha256=card["sha256"],
            path=str(d),
            status="promoted",
            created_at=0.0,
        )
    )
    return version


def test_baseline_is_registered_once_and_current(registry):
    base = read_card(BASELINE)["version"]
    registry.ensure_baseline()
    assert registry.store.models.current() == base
    assert [v.version for v in registry.store.models.list()] == [base]


def test_pointer_moves_atomically_with_history_and_rollback(registry):
    base = registry.store.models.current()
    v2 = _register_copy(registry, "v2")
    assert registry.store.models.move_pointer(v2, action="promote", actor="runner", expect=base)
    assert not registry.store.models.move_pointer("v2", action="promote", actor="runner", expect=base)  # CAS fails
    assert registry.store.models.rollback_target() == base
    assert registry.store.models.move_pointer(base, action="rollback", actor="admin")
    assert [h["action"] for h in registry.store.models.pointer_history()] == ["rollback", "promote", "init"]
    assert [a["action"] for a in registry.store.audit_log()][:2] == ["pointer.rollback", "pointer.promote"]


def test_rolling_back_twice_goes_back_twice_and_a_retry_naming_its_version_rolls_back_once(registry):
    from service.config import Settings
    from service.errors import Conflict
    from service.loop.promotion import rollback

    settings = Settings(data_dir=registry.models_dir.parent)
    base = registry.store.models.current()
    v2, v3 = _register_copy(registry, "v2"), _register_copy(registry, "v3")
    registry.store.models.move_pointer(v2, action="promote", actor="runner", expect=base)
    registry.store.models.move_pointer(v3, action="promote", actor="runner", expect=v2)
    assert rollback(registry, settings, actor="dr.admin", from_version=v3).version == v2
    with pytest.raises(Conflict) as retried:  # the same request again (its answer was lost): refused, not v2 -> base
        rollback(registry, settings, actor="dr.admin", from_version=v3)
    assert retried.value.code == "pointer_moved" and registry.store.models.current() == v2
    assert rollback(registry, settings, actor="dr.admin").version == base  # back again, not forward to v3
    with pytest.raises(Conflict) as bottom:
        rollback(registry, settings, actor="dr.admin")
    assert bottom.value.code == "nothing_to_roll_back" and registry.store.models.current() == base


def test_a_candidate_with_non_finite_outputs_is_rejected_by_the_gate_and_kept_with_the_reason(registry, monkeypatch):
    import service.loop.gate as gate_module
    from service.config import Settings
    from service.inference.ensemble import ModelError
    from service.loop.candidate import Candidate

    def nan_outputs(ensemble):
        raise ModelError(f"model {ensemble.version} produces non-finite or out-of-range outputs")

    monkeypatch.setattr(gate_module, "check_outputs_finite", nan_outputs)
    staging = registry.stage()
    shutil.copy(BASELINE / "ensemble.onnx", staging / "ensemble.onnx")
    card = finetuned_card(read_card(BASELINE), version="ft-nan", sha256="n" * 64, parent="p", finetune={"run": "r"})
    settings = Settings(data_dir=registry.models_dir.parent, baseline_dir=BASELINE)
    result = gate_module.gate_candidate(registry, settings, Candidate(staging, card), parent="p", holdout=[])
    assert not result.passed and result["finite"] is False and "non-finite" in result["reasons"][0]
    version, reason = registry.commit_gated(staging, card, result, {"train": ["c"], "holdout": []})
    assert version.status == "rejected" and "non-finite" in reason


def test_hot_swap_follows_the_pointer(registry):
    holder = ModelHolder(registry, threads=1)
    first = holder.load()
    v2 = _register_copy(registry, "v2")
    registry.store.models.move_pointer(v2, action="promote", actor="t")
    assert holder.sync() is True
    assert holder.current().version == "v2" and first.version != "v2"  # in-flight work kept `first`


class Clock:
    """A monotonic clock moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _a_broken_version_promoted(registry, retry_s: float):
    """(clock, holder serving the current version, that version, a corrupt version now promoted)."""
    clock = Clock()
    holder = ModelHolder(registry, threads=1, load_retry_s=retry_s, clock=clock)
    served = holder.load().version
    bad = _register_copy(registry, "broken", corrupt=True)
    registry.store.models.move_pointer(bad, action="promote", actor="t")
    return clock, holder, served, bad


def test_a_version_that_fails_to_load_is_never_served_and_the_pointer_moves_back(registry):
    clock, holder, served, bad = _a_broken_version_promoted(registry, retry_s=60)
    for clock.now in (1000.0, 1059.0):  # this worker's own trouble, perhaps: the deployment keeps the version
        assert holder.sync() is False and holder.current().version == served
        assert registry.store.models.current() == bad and registry.store.models.get(bad).status != "failed"
    clock.now = 1060.0
    assert holder.sync() is False
    assert holder.current().version == served
    assert registry.store.models.current() == served
    assert (
        registry.store.models.get(bad).status == "failed" and "failed to load" in registry.store.models.get(bad).reason
    )
    assert registry.store.models.pointer_history()[0]["action"] == "auto-rollback"


def test_marking_a_version_failed_and_moving_the_pointer_back_is_one_change(registry, monkeypatch):
    """A crash (here: an error) at the pointer move must not leave the current version 'failed' with
    nothing moving the pointer back: neither happens, and the next sync does both."""
    clock, holder, served, bad = _a_broken_version_promoted(registry, retry_s=0)

    def crash(*args, **kwargs):
        raise RuntimeError("process killed here")

    monkeypatch.setattr("service.store.models._move_pointer", crash)
    with pytest.raises(RuntimeError):
        holder.sync()
    assert registry.store.models.current() == bad and registry.store.models.get(bad).status != "failed"
    monkeypatch.undo()
    assert holder.sync() is False
    assert registry.store.models.current() == served and registry.store.models.get(bad).status == "failed"


def test_a_worker_that_fails_once_to_load_a_good_version_tries_again_and_fails_it_for_no_one(registry, monkeypatch):
    holder = ModelHolder(registry, threads=1, load_retry_s=30)
    served = holder.load().version
    good = _register_copy(registry, "v2")
    registry.store.models.move_pointer(good, action="promote", actor="t")
    real_load, failures = holder._load, iter([MemoryError("cannot allocate 1.2 GB")])

    def load_once_short_of_memory(version):
        if (fault := next(failures, None)) is not None:
            raise fault
        return real_load(version)

    monkeypatch.setattr(holder, "_load", load_once_short_of_memory)
    assert holder.sync() is False and holder.current().version == served
    assert holder.sync() is True and holder.current().version == good
    assert registry.store.models.current() == good and registry.store.models.get(good).status != "failed"
    assert [h["action"] for h in registry.store.models.pointer_history()][0] == "promote"


def test_a_version_promoted_again_after_a_rollback_gets_its_whole_retry_time_again(registry):
    clock, holder, served, bad = _a_broken_version_promoted(registry, retry_s=60)
    assert holder.sync() is False  # fails here at t = 1000 ...
    registry.store.models.move_pointer(served, action="rollback", actor="admin")  # ... an admin goes back
    clock.now = 1030.0
    assert holder.sync() is False
    registry.store.models.move_pointer(bad, action="promote", actor="admin")  # and tries it once more
    clock.now = 1100.0  # 100 s after the first failure, but the first of this promotion
    assert holder.sync() is False and registry.store.models.get(bad).status != "failed"
    clock.now = 1160.0
    assert holder.sync() is False and registry.store.models.get(bad).status == "failed"


def test_a_lagging_worker_that_fails_to_load_moves_the_pointer_to_the_version_replaced_not_to_its_own(registry):
    holder = ModelHolder(registry, threads=1, load_retry_s=0)
    served = holder.load().version
    good = _register_copy(registry, "v2")
    registry.store.models.move_pointer(good, action="promote", actor="t")  # the other workers load v2 ...
    bad = _register_copy(registry, "broken", corrupt=True)
    registry.store.models.move_pointer(bad, action="promote", actor="t")  # ... this one had not yet
    assert holder.sync() is False and holder.current().version == served
    assert registry.store.models.current() == good  # not back past v2 to what this worker served


def test_commit_makes_a_durable_registered_version_that_is_never_written_again(registry):
    base = registry.store.models.current()
    staging = registry.stage()
    shutil.copy(BASELINE / "ensemble.onnx", staging / "ensemble.onnx")
    card = finetuned_card(read_card(BASELINE), version="ft-1", sha256="y" * 64, parent=base, finetune={"run": "r"})
    card["metrics"] = {"gate": {"passed": True}}
    v = registry.commit(
        staging, card, status="candidate", reason=None, metrics={"passed": True}, corrections={}, actor="runner"
    )
    final = registry.models_dir / "ft-1"
    assert not staging.exists() and v.path == str(final) and registry.path("ft-1") == final
    assert read_card(final)["metrics"]["gate"] == {"passed": True} and read_card(final)["parent"] == base
    assert registry.store.models.get("ft-1").status == "candidate"
    before = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    assert registry.move_pointer("ft-1", action="promote", actor="runner", expect=base)
    registry.versions.set_status("ft-1", "promoted", None)
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == before  # promotion writes only rows


def test_unregistered_model_dirs_are_swept(registry):
    (registry.models_dir / ".staging-123").mkdir()
    (registry.models_dir / "ft-half-written").mkdir()
    (registry.models_dir / "ft-just-renamed").mkdir()  # another runner may register it any moment now
    old = time.time() - 3600
    os.utime(registry.models_dir / "ft-half-written", (old, old))
    assert sorted(registry.sweep()) == [".staging-123", "ft-half-written"]
    assert (registry.models_dir / "ft-just-renamed").is_dir()
    assert [p.name.rsplit("-", 1)[0] for p in (registry.models_dir.parent / "orphans" / "models").iterdir()] == [
        "ft-half-written"  # an unknown version is moved aside (the store may be the wrong one); staging goes
    ]


class Saturated:
    """Stands in for a broken candidate: calls everything tumour."""

    version, members = "bad", 5

    def predict(self, tiles):
        return np.full((len(tiles), 5, *tiles.shape[1:3]), 0.99, np.float32)


def test_gate_passes_an_equal_model_and_rejects_a_worse_one_with_reasons(baseline):
    bank = load_bank(BASELINE / "holdout.npz")
    bank = (bank[0][:6], bank[1][:6])
    heldout = ([bank[0][0], bank[0][1]], [bank[1][0], bank[1][1]])
    ok = gate(baseline, baseline, bank, heldout, margin=0.0, min_heldout=2)
    assert ok.passed and ok["heldout_dice"]["candidate"] == ok["heldout_dice"]["current"]
    bad = gate(baseline, Saturated(), bank, heldout, margin=0.02, min_heldout=2)
    assert not bad.passed
    assert any("source holdout Dice dropped" in r for r in bad["reasons"])
    assert any("worse on held-out corrections" in r for r in bad["reasons"])
    few = gate(baseline, baseline, bank, ([], []), margin=0.0, min_heldout=2)
    assert few.passed and few["heldout_dice"] is None and "fewer than 2" in few["heldout_note"]


class LeaningToNormal:
    """The baseline's probabilities pulled towards 'normal' by ``pull`` (0: the baseline itself)."""

    members = 5

    def __init__(self, inner, pull: float):
        self.inner, self.pull, self.version = inner, pull, f"pull-{pull}"

    def predict(self, tiles):
        return (1 - self.pull) * self.inner.predict(tiles) + self.pull * np.float32(0.01)


class Remembering:
    """``inner``'s predictions, each computed once (the gate asks for the same tiles again and again)."""

    def __init__(self, inner):
        self.inner, self.version, self.members, self.seen = inner, inner.version, inner.members, {}

    def predict(self, tiles):
        key = tiles.tobytes()
        if key not in self.seen:
            self.seen[key] = self.inner.predict(tiles)
        return self.seen[key]


def test_source_holdout_drops_do_not_add_up_over_promotions(baseline):
    from service.inference.evaluation import pairs_overlap

    bank = load_bank(BASELINE / "holdout.npz")
    bank = (bank[0][:3], bank[1][:3])
    baseline = Remembering(baseline)
    drifted, further = LeaningToNormal(baseline, 0.3), LeaningToNormal(baseline, 0.45)
    base, cur, cand = (pairs_overlap(m, *bank)[0].dice for m in (baseline, drifted, further))
    assert base > cur > cand
    margin = (cur - cand) + (base - cur) / 2  # within the margin of the current, not of the baseline
    step = gate(drifted, further, bank, ([], []), margin=margin, min_heldout=2)
    assert step.passed
    total = gate(drifted, further, bank, ([], []), margin=margin, min_heldout=2, baseline=baseline)
    assert not total.passed and "below the baseline's" in total["reasons"][0]
    assert total["source_holdout_dice"]["baseline"] == round(base, 4)
    # a current version already below the bound (promoted by hand): the loop goes on, but never lower
    far = margin / 4
    assert gate(further, further, bank, ([], []), margin=far, min_heldout=2, baseline=baseline).passed
    assert not gate(
        further, LeaningToNormal(baseline, 0.5), bank, ([], []), margin=far, min_heldout=2, baseline=baseline
    ).passed


@pytest.mark.slow
def test_a_fine_tune_of_a_fine_tune_is_gated_against_the_baseline_too(registry):
    from service.config import Settings
    from service.loop.candidate import Candidate
    from service.loop.gate import gate_candidate

    settings = Settings(data_dir=registry.models_dir.parent, baseline_dir=BASELINE, finetune_threads=2)
    base = registry.store.models.current()
    v2 = _register_copy(registry, "v2")

    def gated(parent: str) -> dict:
        staging = registry.stage()
        shutil.copy(BASELINE / "ensemble.onnx", staging / "ensemble.onnx")
        card = finetuned_card(read_card(BASELINE), version="c", sha256="c" * 64, parent=parent, finetune={})
        return gate_candidate(registry, settings, Candidate(staging, card), parent=parent, holdout=[])

    assert "baseline" not in gated(base)["source_holdout_dice"]  # the baseline's own fine-tune: once is enough
    against_root = gated(v2)
    assert against_root.passed and against_root["source_holdout_dice"]["baseline"] > 0


def test_a_version_whose_file_is_not_what_the_registry_recorded_is_never_served(registry):
    holder = ModelHolder(registry, threads=1, load_retry_s=0)
    served = holder.load().version
    partial = _register_copy(registry, "partial", truncate=True)
    registry.store.models.move_pointer(partial, action="promote", actor="t")
    assert holder.sync() is False and holder.current().version == served
    record = registry.store.models.get(partial)
    assert record.status == "failed" and "registry recorded" in record.reason
    assert registry.store.models.current() == served  # moved back


def test_a_rollback_never_undoes_a_promotion_that_landed_while_it_was_decided(registry, monkeypatch):
    from service.config import Settings
    from service.errors import Conflict
    from service.loop.promotion import rollback

    base = registry.store.models.current()
    v2, v3 = _register_copy(registry, "v2"), _register_copy(registry, "v3")
    registry.store.models.move_pointer(v2, action="promote", actor="runner", expect=base)
    decided = registry.versions.rollback_target

    def runner_promotes_meanwhile():
        target = decided()  # the admin's rollback computed "back to base" from v2 ...
        registry.store.models.move_pointer(v3, action="promote", actor="runner", expect=v2)  # ... the runner wins
        return target

    monkeypatch.setattr(registry.versions, "rollback_target", runner_promotes_meanwhile)
    with pytest.raises(Conflict) as refused:
        rollback(registry, Settings(data_dir=registry.models_dir.parent), actor="dr.admin")
    assert refused.value.code == "pointer_moved"
    assert registry.store.models.current() == v3  # the runner's promotion stands
