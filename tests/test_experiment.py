"""The paper-experiment harness (bench/experiment.py --quick): structure of its outputs, not the claim."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_on_path(monkeypatch):
    """``bench/`` is a folder of scripts (no ``__init__.py``, not installed): ``bench.experiment`` resolves as
    a namespace package from the repo root. ``python -m pytest`` run there puts the root on sys.path; this
    makes the import independent of the working directory and of how pytest was started."""
    monkeypatch.syspath_prepend(str(REPO))


def test_auroc_and_ece_match_hand_values(repo_on_path):
    from bench.experiment import auroc, expected_calibration_error, pooled_select
    from service.inference.queue import Candidate

    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auroc(np.zeros(6), np.array([0, 1, 0, 1, 0, 1])) == 0.5  # all tied
    # one pair of 4 mis-ordered: 3/4
    assert auroc(np.array([0.1, 0.5, 0.4, 0.9]), np.array([0, 0, 1, 1])) == 0.75
    assert auroc(np.ones(3), np.zeros(3)) is None
    # two bins: p=0.2 (truth rate 0) and p=0.9 (truth rate 1) -> (0.2 * 2 + 0.1 * 2) / 4
    ece = expected_calibration_error(np.array([0.2, 0.2, 0.9, 0.9]), np.array([0, 0, 1, 1]))
    assert math.isclose(ece, 0.15, abs_tol=1e-9)

    def cand(r, c, s):
        return Candidate(r, c, s, s, 0.5, 1.0)

    # slide a: best two overlap (k=4) -> only one of them; slide b's patch ranks between
    picked = pooled_select(
        {"a": [cand(0, 0, 0.9), cand(1, 1, 0.8), cand(8, 8, 0.1)], "b": [cand(0, 0, 0.5)]},
        {"a": "stain", "b": "blur"},
        k=4,
        top=3,
    )
    assert [(p.slide, p.row, p.col) for p in picked] == [("a", 0, 0), ("b", 0, 0), ("a", 8, 8)]


@pytest.mark.slow
def test_quick_experiment_writes_results(tmp_path):
    out = tmp_path / "exp"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "experiment.py"),
            "--quick",
            "--out",
            str(out),
            "--slides",
            str(tmp_path / "slides"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| strategy |" in proc.stdout

    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["quick"] and cfg["strategies"] == ["uga", "random"] and cfg["budgets"] == [0, 5]
    assert len(cfg["centres"]) == 2
    runs = res["runs"]
    assert len(runs) == len(cfg["strategies"]) * len(cfg["budgets"]) * cfg["seeds"]
    seen = {(r["strategy"], r["budget"], r["seed"]) for r in runs}
    assert seen == {(s, b, k) for s in cfg["strategies"] for b in cfg["budgets"] for k in range(cfg["seeds"])}
    for r in runs:
        assert len(r["patches"]) == r["budget"]
        assert 0.0 <= r["dice"]["mean"] <= 1.0
        assert set(r["dice"]["per_centre"]) == set(cfg["centres"])
        assert all(0.0 <= v <= 1.0 for v in r["dice"]["per_centre"].values())
    for s in cfg["strategies"]:
        for b in cfg["budgets"]:
            e = res["summary"][s][str(b)]
            assert 0.0 <= e["mean"] <= 1.0 and e["std"] >= 0.0
    # budget 0 is the baseline for every strategy
    assert {res["summary"][s]["0"]["mean"] for s in cfg["strategies"]} == {res["baseline"]["mean"]}

    uq = res["uncertainty_quality"]
    for m in ("uga", "entropy", "mutual_information"):
        assert 0.0 <= uq["auroc"][m] <= 1.0
    assert 0.0 <= uq["ece"] <= 1.0
    sizes = {e["members"]: e for e in res["ensemble_size"]}
    assert sorted(sizes) == [1, 3, 5]
    assert sizes[1]["auroc"]["mutual_information"] is None
    for e in sizes.values():
        assert 0.0 <= e["dice"]["mean"] <= 1.0 and 0.0 <= e["auroc_ranking_measure"] <= 1.0
        assert 0.0 <= e["ece"] <= 1.0 and e["s_per_tissue_mp"] > 0

    for png in ("dice_vs_budget.png", "dice_per_centre.png"):
        with Image.open(out / png) as im:
            im.load()
            assert im.width > 100 and im.height > 100
    md = (out / "results.md").read_text()
    assert "| strategy | 0 patches | 5 patches |" in md and "| uga |" in md and "| random |" in md


def test_per_centre_selection_takes_turns_between_centres(repo_on_path):
    from bench.experiment import per_centre_select
    from service.inference.queue import Candidate

    def cands(*scores):
        return [Candidate(i * 10, 0, s, s, 0.5, 1.0) for i, s in enumerate(scores)]

    picked = per_centre_select({"a1": cands(0.9, 0.8, 0.7), "b1": cands(0.3, 0.2)}, {"a1": "A", "b1": "B"}, 2, 4)
    assert [(p.centre, p.score) for p in picked] == [("A", 0.9), ("B", 0.3), ("A", 0.8), ("B", 0.2)]


@pytest.mark.e2e
def test_the_experiment_runs_unchanged_on_a_folder_of_slides_with_masks(tmp_path, source_slide, ood_slide):
    """The layout of real data (e.g. Camelyon mounted locally): DIR/<centre>/<pool|eval>/ with masks."""
    import shutil

    real = tmp_path / "real"
    for centre, slide in (("hospital-a", source_slide), ("hospital-b", ood_slide)):
        for role in ("pool", "eval"):
            (real / centre / role).mkdir(parents=True)
            shutil.copy(slide, real / centre / role / "case.tif")
            shutil.copy(slide.with_name(slide.stem + ".mask.tif"), real / centre / role / "case.mask.tif")
    out = tmp_path / "exp"
    cmd = [sys.executable, str(REPO / "bench" / "experiment.py"), "--quick", "--real", str(real), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["centres"] == ["hospital-a", "hospital-b"] and res["config"]["real"] == str(real)
    assert {s["centre"] for s in res["slides"]} == {"hospital-a", "hospital-b"}
    assert all(s["seed"] is None and s["mpp"] == 0.5 for s in res["slides"])
    assert set(res["baseline"]["per_centre"]) == {"hospital-a", "hospital-b"}
