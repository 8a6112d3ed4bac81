"""Model registry: atomic pointer, rollback, a version that fails to load, and the promotion gate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from models.bank import load_bank
from service.loop.registry import ModelHolder, Registry, read_card
from service.loop.runner import gate
from service.store import Store
from tests.conftest import REPO

BASELINE = REPO / "models" / "baseline"


@pytest.fixture()
def registry(tmp_path):
    store = Store(tmp_path / "data")
    reg = Registry(store, tmp_path / "data", BASELINE)
    reg.ensure_baseline()
    return reg


def _register_copy(reg: Registry, version: str, *, corrupt: bool = False) -> str:
    d = reg.models_dir / version
    shutil.copytree(BASELINE, d)
    card = {**read_card(BASELINE), "version": version, "parent": reg.store.current_version()}
    (d / "card.json").write_text(json.dumps(card))
    if corrupt:
        (d / "ensemble.onnx").write_bytes(b"definitely not onnx")
    reg.store.register_version(
        {"version": version, "parent": card["parent"], "sha256": "x" * 64, "path": str(d), "status": "promoted"}
    )
    return version


def test_baseline_is_registered_once_and_current(registry):
    base = read_card(BASELINE)["version"]
    registry.ensure_baseline()
    assert registry.store.current_version() == base
    assert [v["version"] for v in registry.store.versions()] == [base]


def test_pointer_moves_atomically_with_history_and_rollback(registry):
    base = registry.store.current_version()
    v2 = _register_copy(registry, "v2")
    assert registry.store.move_pointer(v2, action="promote", actor="runner", expect=base)
    assert not registry.store.move_pointer("v2", action="promote", actor="runner", expect=base)  # CAS fails
    assert registry.store.rollback_target() == base
    assert registry.store.move_pointer(base, action="rollback", actor="admin")
    assert [h["action"] for h in registry.store.pointer_history()] == ["rollback", "promote", "init"]
    assert [a["action"] for a in registry.store.audit_log()][:2] == ["pointer.rollback", "pointer.promote"]


def test_hot_swap_follows_the_pointer(registry):
    holder = ModelHolder(registry, threads=1)
    first = holder.load()
    v2 = _register_copy(registry, "v2")
    registry.store.move_pointer(v2, action="promote", actor="t")
    assert holder.sync() is True
    assert holder.current().version == "v2" and first.version != "v2"  # in-flight work kept `first`


def test_a_version_that_fails_to_load_is_never_served_and_the_pointer_moves_back(registry):
    holder = ModelHolder(registry, threads=1)
    served = holder.load().version
    bad = _register_copy(registry, "broken", corrupt=True)
    registry.store.move_pointer(bad, action="promote", actor="t")
    assert holder.sync() is False
    assert holder.current().version == served
    assert registry.store.current_version() == served
    assert (
        registry.store.version(bad)["status"] == "failed" and "failed to load" in registry.store.version(bad)["reason"]
    )
    assert registry.store.pointer_history()[0]["action"] == "auto-rollback"


def test_unregistered_model_dirs_are_swept(registry):
    (registry.models_dir / ".staging-123").mkdir()
    (registry.models_dir / "ft-half-written").mkdir()
    assert sorted(registry.sweep()) == [".staging-123", "ft-half-written"]


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
