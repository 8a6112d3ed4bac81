"""The multiplicity check of the protocol's comparison: its family and its relabelling null."""

from __future__ import annotations

import numpy as np

from bench import protocol_experiment as px
from bench import protocol_multiplicity as pm

CENTRES = {f"{c}-{i}": c for c in ("stain", "blur", "jpeg", "lowres", "nonhed", "source") for i in range(2)}


def _runs(effect: dict[str, float], budgets=(5, 10)) -> list[dict]:
    """Every arm at every budget and seed; Dice = 0.8 + the arm's effect + seed and slide noise."""
    rng = np.random.default_rng(0)
    runs = [{"key": "baseline", "strategy": "baseline", "dice": dict.fromkeys(CENTRES, 0.8), "centres": CENTRES}]
    for budget in budgets:
        for arm, shift in effect.items():
            for seed in range(pm.SEEDS):
                dice = {k: 0.8 + shift + rng.normal(0, 0.01) for k in CENTRES}
                key = px.run_key(arm, budget, pm.PATCH_UM, seed)
                runs.append(
                    {"key": key, "strategy": arm, "budget": budget, "patch_um": 256, "seed": seed, "dice": dice}
                )
    return runs


ARMS = ["uga_topk", "class_balanced", "uncertainty_diversity", "representative", "random"]


def test_only_budgets_with_every_seed_of_every_arm_enter_the_family():
    runs = _runs(dict.fromkeys(ARMS, 0.0))
    assert pm.complete_budgets(runs, ARMS) == [5, 10]
    assert pm.complete_budgets([r for r in runs if r["key"] != "random/10/256/4"], ARMS) == [5]
    family = pm.family(runs, ARMS[:-1], [5, 10], 200)
    assert len(family) == 4 * 7 * 2  # strategies × (6 centres + pooled) × budgets


def test_a_real_effect_is_found_and_the_relabelled_null_loses_it():
    runs = _runs({**dict.fromkeys(ARMS, 0.0), "uga_topk": 0.05})
    observed = pm.family(runs, ["uga_topk"], [5, 10], 500)
    assert all(lo > 0 for *_, lo, _hi in observed)
    shuffled = pm.relabelled(runs, ARMS, [5, 10], np.random.default_rng(3))
    for budget in (5, 10):  # each (budget, seed) holds the same runs, under shuffled names
        for seed in range(pm.SEEDS):
            names = [px.run_key(a, budget, 256, seed) for a in ARMS]
            before = sorted(next(r for r in runs if r["key"] == k)["dice"]["blur-0"] for k in names)
            after = sorted(next(r for r in shuffled if r["key"] == k)["dice"]["blur-0"] for k in names)
            assert before == after
    assert np.mean([r[3] for r in pm.family(shuffled, ["uga_topk"], [5, 10], 200)]) < 0.04
