"""bench/uncertainty_gate.py: the protocol's uncertainty gate computes what it claims."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from bench import uncertainty_gate as gate
from tests.tiny_model import tiny_model_dir


def _slide(centre: str, score: np.ndarray, error: np.ndarray, share: float | None = None) -> gate.SlideResult:
    return gate.SlideResult(
        centre,
        {"uga": score, "error": error},
        {"uga": list(score[:10]), "error": list(error[:10].astype(float))},
        novelty_share=share,
    )


def test_a_measure_that_ranks_every_error_first_scores_one_and_a_blind_one_about_half(monkeypatch):
    monkeypatch.setattr(gate, "BOOTSTRAP", 300)  # enough resamples to place a CI around 0.5 or at 1
    rng = np.random.default_rng(0)
    error = rng.random(2000) < 0.2
    perfect = [_slide("stain", error + rng.random(2000) * 0.5, error) for _ in range(4)]
    point, lo, hi = gate.bootstrap_auroc(perfect, "uga", rng)
    assert point == lo == hi == 1.0
    blind = [_slide("stain", rng.random(2000), error) for _ in range(4)]
    point, lo, hi = gate.bootstrap_auroc(blind, "uga", rng)
    assert abs(point - 0.5) < 0.05 and lo < 0.5 < hi


def test_the_slide_flag_separates_centres_by_their_share_beyond_the_threshold():
    z = np.zeros(10)
    by_centre = {
        "source": [_slide("source", z, z > 0, s) for s in (0.01, 0.02, 0.015)],
        "nonhed": [_slide("nonhed", z, z > 0, s) for s in (0.4, 0.3, 0.005)],
    }
    flags, text = gate.flag_table(by_centre)
    assert abs(flags["nonhed"]["auroc"] - 6 / 9) < 1e-9  # one nonhed slide below every source slide
    assert "| nonhed | 0.400, 0.300, 0.005 | 0.667 | misses |" in text


def test_ensemble_size_table_pools_a_centres_counts_into_dice_and_ranks_each_sizes_own_errors(monkeypatch):
    monkeypatch.setattr(gate, "BOOTSTRAP", 50)
    rng = np.random.default_rng(1)
    slides = []
    for _ in range(2):
        error = rng.random(500) < 0.3
        s = _slide("blur", np.zeros(500), error)
        s.pixels.update({"uga@1": rng.random(500), "error@1": error, "uga@5": error + 0.0, "error@5": error})
        s.size_counts = {1: np.array([8, 2, 2]), 5: np.array([9, 1, 1])}
        slides.append(s)
    sizes, text = gate.size_table({"blur": slides}, rng)
    assert sizes["blur"][1]["dice"] == 0.8 and sizes["blur"][5]["dice"] == 0.9  # 2·16 / (2·16 + 4 + 4), 36/40
    assert sizes["blur"][5]["auroc"] == 1.0 and abs(sizes["blur"][1]["auroc"] - 0.5) < 0.1
    assert "| blur | 5 | 0.900 | 1.000 [1.000, 1.000] |" in text


def test_the_misses_table_ranks_tumour_in_tissue_called_normal_by_each_score(monkeypatch):
    """A region score that is high wherever tumour was missed scores 1; a pixel score blind to them 0.5."""
    monkeypatch.setattr(gate, "BOOTSTRAP", 200)
    rng = np.random.default_rng(2)
    slides = []
    for _ in range(3):
        s = _slide("stain", np.zeros(10), np.zeros(10, bool))
        missed = rng.random(3000) < 0.1
        confidently = missed & (rng.random(3000) < 0.3)
        region = missed + confidently * 1.0  # highest where the miss was confident
        s.misses = {"uga": rng.random(3000), "neg_uga": region, "miss": missed, "confident_miss": confidently}
        slides.append(s)
    rows, text = gate.misses_table({"stain": slides}, rng)
    by_score = {r["score"]: r for r in rows}
    assert set(by_score) == {"uga", "neg_uga"}
    assert by_score["neg_uga"]["miss"]["auroc"] == 1.0 and by_score["neg_uga"]["confident_miss"]["auroc"] == 1.0
    assert abs(by_score["uga"]["miss"]["auroc"] - 0.5) < 0.05
    normal, missed, confidently = by_score["uga"]["sampled"]
    assert normal == 9000 and missed == sum(int(s.misses["miss"].sum()) for s in slides) and 0 < confidently < missed
    assert "| stain | neg_uga | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |" in text


@pytest.mark.slow  # over 5 s on 2 cores: not in make test-fast
def test_quick_run_writes_every_measure_and_the_flag(tmp_path, monkeypatch, capsys):
    model = tiny_model_dir(tmp_path, novelty=True)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["uncertainty_gate", "--model", str(model), "--quick", "--out", str(out)])
    assert gate.main() == 0
    result = json.loads((out / "uncertainty-gate.json").read_text())
    measures = {(r["centre"], r["measure"]) for r in result["measures"]}
    expected = {"uga", "entropy", "mutual_information", "novelty", "neg_uga", "neg_novelty"}
    assert measures == {(c, m) for c in ("source", "nonhed") for m in expected}
    assert result["flags"]["nonhed"]["auroc"] is not None and len(result["flags"]["source"]["shares"]) == 2
    slide_mm2 = (1536 * 0.5 / 1000) ** 2  # --quick: slides of 1536² px at 0.5 µm/px
    assert all(0 < a <= slide_mm2 for c in ("source", "nonhed") for a in result["confident"][c]["tissue_mm2"])
    scored = {(r["centre"], r["score"]) for r in result["misses"]}
    assert scored == {(c, m) for c in ("source", "nonhed") for m in ("uga", "novelty", "neg_uga", "neg_novelty")}
    members = sorted(int(n) for n in result["sizes"]["source"])
    assert members[0] == 1 and all(0 <= v["dice"] <= 1 for v in result["sizes"]["nonhed"].values())
    printed = capsys.readouterr().out
    assert printed.strip() == (out / "uncertainty-gate.md").read_text().strip() and "error-AUROC" in printed
