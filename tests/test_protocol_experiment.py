"""bench/protocol_experiment.py: per-centre quotas through the service's registry, paired statistics
with the protocol's verdicts, the sanity gate, and a resumable run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import protocol_experiment as px
from bench.experiment import SlideRef
from service.inference.queue import CellStats


def _pool_slide(key: str, centre: str, error: np.ndarray, uga: np.ndarray) -> px.PoolSlide:
    tissue = np.full(error.shape, 64.0)  # 8 x 8 px cells, wholly tissue
    prob = np.zeros(error.shape)
    stats = {
        "uga": CellStats(8, tissue, uga * 64, prob, np.zeros(error.shape)),
        "error": CellStats(8, tissue, error * 64, prob, np.zeros(error.shape)),
    }
    audit = {"tissue": tissue, "tumour": np.zeros(error.shape), "fp": error * 64, "fn": np.zeros(error.shape)}
    return px.PoolSlide(SlideRef(key, centre, "pool", Path(key), Path(key), {}), stats, audit)


def test_every_centre_gets_its_quota_and_the_oracle_finds_the_worst_patch():
    rng = np.random.default_rng(0)
    pool = []
    for centre in ("blur", "stain"):
        for i in range(2):
            error = rng.random((12, 12)) * 0.1
            pool.append(_pool_slide(f"{centre}-pool{i}", centre, error, rng.random((12, 12))))
    pool[3].stats["error"].uncertainty[6:10, 2:6] = 64.0  # stain-pool1: a wholly wrong 4 x 4-cell patch
    picked = px.choose(pool, "oracle", 3, 4, seed=0, centres=["blur", "stain"])
    assert [p.centre for p in picked].count("blur") == 3 and [p.centre for p in picked].count("stain") == 3
    stain = [p for p in picked if p.centre == "stain"]
    assert (stain[0].slide, stain[0].row, stain[0].col) == ("stain-pool1", 6, 2)
    for p in picked:  # rows are back on the slide's own grid, and patches of one slide never overlap
        assert 0 <= p.row <= 8 and 0 <= p.col <= 8
        same = [q for q in picked if q.slide == p.slide and q != p]
        assert all(abs(p.row - q.row) >= 4 or abs(p.col - q.col) >= 4 for q in same)
    again = px.choose(pool, "random", 3, 4, seed=1, centres=["blur", "stain"])
    assert again == px.choose(pool, "random", 3, 4, seed=1, centres=["blur", "stain"])  # a fixed draw per seed
    assert again != px.choose(pool, "random", 3, 4, seed=2, centres=["blur", "stain"])


def test_the_bootstrap_interval_and_its_verdict():
    sure = [np.full((5, 4), 0.03), np.full((5, 4), 0.01)]
    point, lo, hi = px.bootstrap_mean(sure, 500)
    assert point == pytest.approx(0.02) and lo == pytest.approx(0.02) and hi == pytest.approx(0.02)
    assert px.verdict(lo, hi) == "beats random"
    noise = [np.random.default_rng(1).normal(0, 0.05, (5, 4))]
    _, lo, hi = px.bootstrap_mean(noise, 2000)
    assert lo < 0 < hi and px.verdict(lo, hi) == "no evidence either way"
    assert px.verdict(-0.03, -0.01) == "loses to random"


def _runs(dice: dict[str, dict[int, float]], centres: dict[str, str]) -> list[dict]:
    """Runs of budget 10 with the same Dice on every slide of a centre; dice[strategy][centre_index]."""

    def per_slide(values):
        return {k: values[list(dict.fromkeys(centres.values())).index(c)] for k, c in centres.items()}

    runs = [{"key": "baseline", "strategy": "baseline", "dice": per_slide(dice["baseline"]), "centres": centres}]
    for strategy in ("random", "oracle"):
        for seed in range(2):
            runs.append(
                {
                    "key": px.run_key(strategy, 10, 256, seed),
                    "strategy": strategy,
                    "budget": 10,
                    "patch_um": 256,
                    "seed": seed,
                    "dice": per_slide(dice[strategy]),
                    "patches": [{"centre": "blur"}],
                }
            )
    return runs


def test_the_sanity_gate_asks_order_where_patches_went_and_the_floor_everywhere():
    centres = {"source-eval0": "source", "source-eval1": "source", "blur-eval0": "blur", "blur-eval1": "blur"}
    good = _runs({"baseline": [0.90, 0.70], "random": [0.88, 0.75], "oracle": [0.87, 0.80]}, centres)
    ok, rows = px.sanity_gate(good)
    assert ok and [r["centre"] for r in rows] == ["source", "blur"] and not rows[0]["corrected"]
    disorder = _runs({"baseline": [0.90, 0.70], "random": [0.88, 0.82], "oracle": [0.87, 0.80]}, centres)
    assert not px.sanity_gate(disorder)[0]  # random above the oracle where patches went
    collateral = _runs({"baseline": [0.90, 0.70], "random": [0.80, 0.75], "oracle": [0.87, 0.80]}, centres)
    assert not px.sanity_gate(collateral)[0]  # the source fell 0.10
    deltas = px.paired_deltas(good, "oracle", "random", 10, 256, ["blur-eval0", "blur-eval1"])
    assert deltas.shape == (2, 2) and np.allclose(deltas, 0.05)
    assert np.allclose(px.paired_deltas(good, "random", "baseline", 10, 256, ["source-eval0"]), -0.02)


def test_negative_transfer_is_each_strategy_against_the_baseline_on_centres_that_gave_no_patches():
    centres = {"source-eval0": "source", "source-eval1": "source", "blur-eval0": "blur", "blur-eval1": "blur"}
    runs = _runs({"baseline": [0.90, 0.70], "random": [0.88, 0.75], "oracle": [0.93, 0.80]}, centres)
    cfg = px.Config(quota_centres=["blur"], bootstrap=200, verdict_seeds=2)
    rows = px.negative_transfer(runs, cfg, px.Stage(["oracle", "random"], [10], seeds=2))
    assert [(r["strategy"], r["centre"]) for r in rows] == [("oracle", "source"), ("random", "source")]
    oracle, random = rows
    assert oracle["delta"] == pytest.approx(0.03) and oracle["verdict"] == "above baseline"
    assert random["delta"] == pytest.approx(-0.02) and random["verdict"] == "below baseline"
    cfg.verdict_seeds = 5
    assert {r["verdict"] for r in px.negative_transfer(runs, cfg, px.Stage(["random"], [10]))} == {
        "pending (2 of 5 seeds)"
    }


def test_larger_patches_are_compared_with_256_um_ones_of_the_same_area_paired_by_seed():
    centres = {"blur-eval0": "blur", "blur-eval1": "blur"}
    runs = [{"key": "baseline", "strategy": "baseline", "dice": dict.fromkeys(centres, 0.7), "centres": centres}]
    for strategy, budget, patch, dice in [
        ("uga_topk", 1, 1024, 0.80),
        ("random", 1, 1024, 0.78),
        ("uga_topk", 16, 256, 0.75),
        ("random", 16, 256, 0.79),
    ]:
        for seed in range(3):
            runs.append(
                {
                    "key": px.run_key(strategy, budget, patch, seed),
                    "strategy": strategy,
                    "budget": budget,
                    "patch_um": patch,
                    "seed": seed,
                    "dice": dict.fromkeys(centres, dice + 0.01 * seed),
                }
            )
    cfg = px.Config(quota_centres=["blur"], bootstrap=200, verdict_seeds=3)
    rows = px.comparisons(runs, cfg, px.Stage(["uga_topk", "random"], [1], patch_um=1024, seeds=3))
    by = {(r["strategy"], r["against"], r["centre"]): r for r in rows}
    assert by[("uga_topk", "random", "blur")]["delta"] == pytest.approx(0.02)
    assert by[("random", "baseline", "blur")]["delta"] == pytest.approx(0.09)
    same_area = by[("uga_topk", "uga_topk @ 256 µm × 16", "blur")]
    assert same_area["delta"] == pytest.approx(0.05) and same_area["verdict"] == "larger patches better"
    assert by[("random", "random @ 256 µm × 16", "blur")]["verdict"] == "smaller patches better"
    assert same_area["area_mm2"] == pytest.approx(1.049, abs=1e-3)
    # the protocol's 5 seeds, 3 of them in (whatever --seeds ran): estimates, but no verdict yet
    cfg.verdict_seeds = 5
    pending = px.comparisons(runs, cfg, px.Stage(["uga_topk", "random"], [1], patch_um=1024, seeds=3))
    assert {r["verdict"] for r in pending} == {"pending (3 of 5 seeds)"}
    assert [r["delta"] for r in pending] == [r["delta"] for r in rows]


def test_the_control_takes_the_steps_a_run_of_its_budget_would_take():
    cfg = px.Config()  # five quota centres, every 5th correction held out, 240 steps per mm² up to 800
    assert px.control_steps(cfg, 10, 256) == round(240 * 40 * 0.256**2)  # 50 patches, 40 trained on
    assert px.control_steps(cfg, 20, 256) == 800  # capped
    assert px.control_steps(cfg, 10, 256) == px.planned_steps(cfg.recipe, [np.zeros((256, 256))] * 40)


@pytest.mark.slow
def test_quick_run_reports_and_resumes_without_refitting(tmp_path, capsys):
    out = tmp_path / "out"
    assert px.main(["--quick", "--out", str(out)]) == 0
    first = capsys.readouterr()
    runs = px.load_runs(out / "runs.jsonl")
    assert [r["key"] for r in runs][:2] == ["baseline", "random/2/256/0"] and len(runs) == 7
    assert all(len(r["patches"]) == 4 for r in runs[1:])  # 2 per quota centre, 2 centres
    assert "## Sanity gate (budget 2)" in first.out and "| uga_topk | random | 2 (0.131) |" in first.out
    result = json.loads((out / "results-sanity.json").read_text())
    assert {r["centre"] for r in result["comparisons"]} == {"source", "blur", "nonhed", "pooled (covered)"}
    assert (out / "delta-sanity.png").stat().st_size > 0
    assert px.main(["--quick", "--out", str(out)]) == 0
    assert "0 fine-tunes to run" in capsys.readouterr().err and len(px.load_runs(out / "runs.jsonl")) == 7
    # the report alone, from the runs on file: the same tables, nothing run
    (out / "results-sanity.md").unlink()
    assert px.main(["--quick", "--report", "--out", str(out)]) == 0
    again = capsys.readouterr()
    assert "fine-tunes to run" not in again.err and len(px.load_runs(out / "runs.jsonl")) == 7
    assert "| uga_topk | random | 2 (0.131) |" in again.out and (out / "results-sanity.md").is_file()
    assert px.main(["--quick", "--report", "--out", str(tmp_path / "empty")]) == 2
    assert "no runs in" in capsys.readouterr().out
    # the paper's retrain arm: its runs are its own (the recipe differs), beside the fine-tune arm's
    retrain = ["--quick", "--arm", "retrain", "--strategies", "random", "--seeds", "1", "--out", str(out)]
    with pytest.raises(SystemExit):
        px.main([*retrain, "--source-bank", str(tmp_path / "missing.npz")])
    assert "needs the source training bank" in capsys.readouterr().err
    from models.bank import save_bank

    rng = np.random.default_rng(0)
    bank = tmp_path / "train-bank.npz"
    save_bank(
        bank, rng.integers(0, 255, (6, 160, 160, 3), np.uint8), np.zeros((6, 160, 160), np.uint8), np.arange(6) % 2
    )
    assert px.main([*retrain, "--source-bank", str(bank)]) == 0
    runs = px.load_runs(out / "runs.jsonl")
    assert len(runs) == 8 and runs[-1]["recipe"]["retrain"] and runs[-1]["key"] == "random/2/256/0"
    assert "arm `retrain`" in (out / "results-sanity-retrain.md").read_text()
    # the control: no corrections, as many steps as a run of the budget would take
    assert px.main(["--quick", "--stage", "control", "--seeds", "1", "--out", str(out)]) == 0
    control = px.load_runs(out / "runs.jsonl")[-1]
    assert control["key"] == "source_only/2/256/0" and control["chosen"] == [] and control["steps"] == 2
    assert "| source_only | random | 2 (0.131) |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_same_command_runs_on_a_folder_of_real_slides_with_masks(tmp_path, capsys):
    """DIR/<centre>/<pool|eval>/<name>.tif beside <name>.mask.tif (e.g. Camelyon mounted locally)."""
    import shutil

    cfg = px.Config(
        pool_per_centre=1, eval_per_centre=1, side=1536, pool_side=1536, centres=["blur"], quota_centres=["blur"]
    )
    real = tmp_path / "real"
    for ref in px.local_refs(cfg):  # built slides stand in for a hospital's
        (real / "hospital-a" / ref.role).mkdir(parents=True, exist_ok=True)
        shutil.copy(ref.path, real / "hospital-a" / ref.role / "case.tif")
        shutil.copy(ref.mask, real / "hospital-a" / ref.role / "case.mask.tif")
    out = tmp_path / "out"
    assert px.main(["--quick", "--real", str(real), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    runs = px.load_runs(out / "runs.jsonl")
    assert runs[0]["centres"] == {"hospital-a-eval-case": "hospital-a"}
    assert {p["slide"] for r in runs[1:] for p in r["patches"]} == {"hospital-a-pool-case"}
    assert "| hospital-a | " in printed and "| pooled |" in printed
    # the report of those runs needs no --real: the centres come from the runs on file
    assert px.main(["--quick", "--report", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert "| hospital-a | " in again and "| pooled |" in again and "report of the runs on file" in again


def test_runs_written_before_a_recipe_field_existed_count_as_its_default():
    from dataclasses import asdict

    old = {k: v for k, v in asdict(px.RECIPE).items() if k != "retrain"}  # a run from before the retrain arm
    runs = [
        {"key": "baseline", "strategy": "baseline"},
        {"key": "random/10/256/0", "strategy": "random", "recipe": old},
    ]
    assert len(px.current_runs(runs, px.ARMS["finetune"])) == 2
    assert len(px.current_runs(runs, px.ARMS["retrain"])) == 1  # the baseline only


def test_the_size_stages_hold_no_correction_out_in_either_size():
    assert px.STAGES["size1024"].holdout_every == 0 and px.STAGES["size256"].holdout_every == 0
    assert px.STAGES["size1024"].budgets == [b // 16 for b in px.STAGES["size256"].budgets]  # the same area


def test_the_by_centre_table_puts_pooled_then_untouched_centres_last_and_bolds_only_decided_cells():
    def row(strategy, against, centre, lo, hi, verdict="no evidence either way"):
        delta = (lo + hi) / 2
        return {"strategy": strategy, "against": against, "budget": 5, "centre": centre, "delta": delta} | {
            "lo": lo,
            "hi": hi,
            "verdict": verdict,
        }

    rows = [
        row("uga_topk", "random", "source", 0.001, 0.02, "beats random"),
        row("uga_topk", "random", "blur", -0.01, 0.01),
        row("uga_topk", "random", "pooled (covered)", -0.03, -0.01, "pending (3 of 5 seeds)"),
        row("random", "baseline", "blur", -0.02, -0.005, "below baseline"),
        row("uga_topk", "uga_topk @ 256 µm × 16", "blur", 0.01, 0.02),  # a size comparison: not in this table
        {**row("uga_topk", "random", "blur", 0.1, 0.2), "budget": 10},  # another budget
    ]
    header, _, *body = px.by_centre(rows, 5)
    assert header == "| centre | uga_topk − random | random − baseline |"
    assert [line.split(" | ")[0] for line in body] == ["| blur", "| pooled (covered)", "| source"]
    blur, pooled, source = body
    assert blur == "| blur | +0.000 [−0.010, +0.010] | **−0.013 [−0.020, −0.005]** |"
    assert "**" not in pooled and pooled.endswith("| – |")  # excludes 0, but no verdict before every seed
    assert source.startswith("| source | **+0.011 [+0.001, +0.020]** |")


def test_a_filling_disk_stops_the_experiment_between_runs_with_one_line(tmp_path):
    px.require_free_space(tmp_path, min_bytes=1)
    with pytest.raises(SystemExit, match=r"GiB free under .* run the same command again: it resumes"):
        px.require_free_space(tmp_path, min_bytes=1 << 62)
