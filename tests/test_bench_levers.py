"""bench/bench_levers.py: the fused variants compute the members' probabilities, and the equivalence table tells
identical outputs from different ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import bench_levers as bl
from models.net import FusedEnsemble


def _outputs(seed: int = 0, batch: int = 2, side: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "member_probs": rng.uniform(0, 1, (batch, 5, side, side)).astype(np.float32),
        "novelty": rng.uniform(0, 2, (batch, 1, side // 8, side // 8)).astype(np.float32),
        "embedding": rng.normal(size=(batch, 8, side // 8, side // 8)).astype(np.float32),
    }


def test_equivalence_of_identical_outputs_is_exact():
    ref = _outputs()
    masks = ref["member_probs"].mean(axis=1) > 0.5
    row = bl.equivalence(ref, {k: v.copy() for k, v in ref.items()}, masks)
    assert set(row) >= {"member probs", "probability", "uga", "novelty", "embedding", "label flips", "Δ Dice"}
    assert all(row[k] == "0.0000 / 0.0000" for k in row if k not in ("label flips", "Δ Dice"))
    assert row["label flips"] == "0.000 %" and row["Δ Dice"] == "+0.00000"


def test_equivalence_reports_differences_and_missing_outputs():
    ref = _outputs()
    masks = ref["member_probs"].mean(axis=1) > 0.5  # the reference is perfect, so flips can only lose Dice
    got = {"member_probs": np.clip(ref["member_probs"] + _outputs(seed=1)["member_probs"] * 0.3 - 0.15, 0, 1)}
    row = bl.equivalence(ref, got, masks)
    assert float(row["member probs"].split(" / ")[0]) > 0.1
    assert float(row["probability"].split(" / ")[0]) > 0
    assert row["novelty"] == row["embedding"] == "–"  # a member_probs-only variant
    assert float(row["label flips"].rstrip(" %")) > 0 and float(row["Δ Dice"]) < 0


def test_grouped_module_reproduces_the_members():
    members = bl.members()
    grouped = bl.grouped_ensemble(members)
    convs = [m for m in grouped.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert convs[0].groups == 1 and all(c.groups == len(members) for c in convs[1:])  # RGB input is shared
    images = torch.from_numpy(np.load(bl.MODEL / "holdout.npz")["images"][:3])
    with torch.no_grad():
        ref = FusedEnsemble(members).eval()(images)  # what probs-only exports
        got = grouped(images)
    assert got.shape == ref.shape == (3, len(members), 256, 256)
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.slow
def test_probs_only_variants_build_and_match_the_shipped_graph(tmp_path, capsys):
    import onnx

    names = ["probs-only", "groupnorm-op", "grouped"]
    paths = bl.build_variants(names, tmp_path)
    ops = {name: [n.op_type for n in onnx.load(str(paths[name])).graph.node] for name in names}
    norms = 5 * 14  # five members, seven blocks of two GroupNorms each
    assert (
        ops["groupnorm-op"].count("GroupNormalization") == norms and "InstanceNormalization" not in ops["groupnorm-op"]
    )
    assert ops["probs-only"].count("InstanceNormalization") == norms
    assert ops["grouped"].count("InstanceNormalization") == norms // 5  # one normalisation per fused layer
    images = np.load(bl.MODEL / "holdout.npz")["images"][:4]
    shipped = bl.outputs(bl.session(bl.MODEL / "ensemble.onnx"), images)
    got = {name: bl.outputs(bl.session(paths[name]), images) for name in names}
    assert all(set(g) == {"member_probs"} for g in got.values())
    assert np.array_equal(got["probs-only"]["member_probs"], shipped["member_probs"])
    for name in ("groupnorm-op", "grouped"):
        assert np.abs(got[name]["member_probs"] - shipped["member_probs"]).max() < 5e-3

    assert bl.main(["--rounds", "1", "--variants", "probs-only", "grouped", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| probs-only | 0.0000 / 0.0000 |" in printed and "| – | – |" in printed
    assert "speed reference for the member_probs-only variants" in printed


def test_batchnorm_probe_swaps_every_groupnorm_and_leaves_the_members_alone():
    members = bl.members()
    probes = bl.batchnorm_members(members)
    for member, probe in zip(members, probes, strict=True):
        norms = [m for m in member.modules() if isinstance(m, torch.nn.GroupNorm)]
        swapped = [m for m in probe.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and len(swapped) == len(norms)
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in probe.modules())
        assert not probe.training  # BatchNorm in eval: its running statistics, never the batch's
        for gn, bn in zip(norms, swapped, strict=True):  # the same affine parameters, unit statistics
            assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
            assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        convs = [
            (a.weight, b.weight)
            for a, b in zip(member.modules(), probe.modules(), strict=True)
            if isinstance(a, torch.nn.Conv2d)
        ]
        assert convs and all(torch.equal(a, b) for a, b in convs)


@pytest.mark.slow
def test_the_probe_model_directory_serves_and_loads_as_batchnorm_members(tmp_path):
    from models.fit import load_members
    from service.inference.ensemble import load_ensemble

    out = bl.write_probe_model(tmp_path / "probe")
    ensemble = load_ensemble(out)  # the card's digest matches the new graph
    tiles = np.load(out / "holdout.npz")["images"][:2]
    outputs = ensemble.predict_outputs(tiles)  # the service runs it, novelty and embedding too
    assert outputs["member_probs"].shape == (2, 5, 256, 256) and {"novelty", "embedding"} <= set(outputs)
    loaded, ckpt = load_members(out / "members.pt")  # what bench_monai.py runs in torch
    assert ckpt["recipe"]["norm"] == "batch" and all(
        any(isinstance(m, torch.nn.BatchNorm2d) for m in member.modules()) for member in loaded
    )


@pytest.mark.slow  # 4 s: a benchmark lever, not the product
def test_frozen_norm_takes_its_statistics_from_the_calibration_tiles_layer_by_layer():
    members = bl.members()[:1]
    images = np.load(bl.MODEL / "replay.npz")["images"][:8]
    (frozen,) = bl.frozen_norm_members(members, images)
    norms = [m for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not frozen.training and all(n.num_batches_tracked.item() == 1 for n in norms)
    # the first norm sees the first convolution's output on the calibration tiles: its per-channel moments
    from models.net import to_input

    with torch.no_grad():
        first = frozen.down[0][0](to_input(images))
    assert torch.allclose(norms[0].running_mean, first.mean(dim=(0, 2, 3)), rtol=1e-3, atol=1e-3)
    assert torch.allclose(norms[0].running_var, first.var(dim=(0, 2, 3)), rtol=1e-3)
