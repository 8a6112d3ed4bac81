"""The baseline recipe's parts (bench/PROTOCOL.md): generic augmentation, diverse members, early
stopping on a validation split, temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.augment import STRENGTHS, augment_image
from models.fit import (
    bake_temperature,
    fit_member,
    fit_temperature,
    member_logits,
    member_training_set,
    validation_loss,
)
from models.net import UNet


def _patches(n: int = 12, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pink background with purple discs: the disc pixels are 'tumour'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    for i in range(n):
        cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, 8))]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        images[i] = np.where(disc[..., None], (120, 60, 150), (230, 150, 190))
        masks[i] = disc
    noise = rng.normal(0, 6, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8), masks


def test_augmentation_keeps_the_image_valid_and_strong_moves_it_further():
    images, _ = _patches(16, 64)
    change = {}
    for name, strength in STRENGTHS.items():
        rng = np.random.default_rng(1)
        out = [augment_image(img, rng, strength) for img in images]
        assert all(o.dtype == np.uint8 and o.shape == img.shape for o, img in zip(out, images, strict=True))
        change[name] = np.mean([np.abs(o.astype(float) - img).mean() for o, img in zip(out, images, strict=True)])
    assert 0 < change["light"] < change["strong"], change


def test_augmentation_is_reproducible_from_the_seed():
    img = _patches(1, 64)[0][0]
    a = augment_image(img, np.random.default_rng(7), STRENGTHS["strong"])
    b = augment_image(img, np.random.default_rng(7), STRENGTHS["strong"])
    assert np.array_equal(a, b)


def test_folds_leave_each_members_own_slides_out():
    slides = np.repeat(np.arange(10), 4)
    recipe = {"folds": 5, "seed": 0}
    seen = set()
    for m in range(5):
        idx = member_training_set(recipe, m, len(slides), slides)
        own = {s for s in range(10) if s % 5 == m}
        assert own.isdisjoint(set(slides[idx].tolist())) and len(idx) == 32
        seen |= set(slides[idx].tolist())
    assert seen == set(range(10))
    boot = member_training_set({"seed": 0}, 0, 40, None)  # no folds: a bootstrap of the same size
    assert len(boot) == 40 and len(set(boot.tolist())) < 40
    with pytest.raises(ValueError, match="records each patch's slide"):
        member_training_set(recipe, 0, 40, None)


def test_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, 200_000)
    truth = rng.random(logits.size) < 1 / (1 + np.exp(-logits / 2.5))  # calibrated at T = 2.5
    assert abs(fit_temperature(logits, truth) - 2.5) < 0.1


def test_baking_the_temperature_divides_the_members_logits():
    torch.manual_seed(0)
    net = UNet(base=4, depth=2, groups=2).eval()
    images, _ = _patches(2, 32)
    before = member_logits(net, images)
    bake_temperature(net, 2.0)
    assert np.allclose(member_logits(net, images), before / 2.0, atol=1e-5)


def test_early_stopping_keeps_the_best_validated_weights():
    images, masks = _patches(12, 32)
    val = _patches(6, 32, seed=1)
    net = UNet(base=4, depth=2, groups=2)
    result = fit_member(net, images, masks, steps=6, batch=4, lr=5e-3, seed=0, validation=val, eval_every=2, crop=24)
    assert result.best_step in (2, 4, 6)
    assert result.val_loss == pytest.approx(validation_loss(net, *val), rel=1e-4)


def test_crops_of_a_correction_with_a_little_tumour_show_that_tumour():
    from models.finetune import crop_bank

    image = np.full((512, 512, 3), 200, np.uint8)
    mask = np.zeros((512, 512), np.uint8)
    mask[460:480, 20:40] = 1  # a small focus near a corner
    crops, crop_masks = crop_bank([image], [mask], patch=128, per_image=32, seed=0)
    with_tumour = int((crop_masks.reshape(32, -1).sum(axis=1) > 0).sum())
    assert with_tumour >= 16  # half the crops are centred on it; random crops alone find it rarely
    assert all(int(m.sum()) == 400 for m in crop_masks[0::2])  # and those show all of it, not a sliver


def test_fine_tune_steps_grow_with_the_corrected_area_within_their_bounds():
    from models.finetune import FinetuneBudget, planned_steps

    patch = np.zeros((256, 256), np.uint8)  # 256 µm at 1 µm/px: 0.0655 mm²
    fixed = FinetuneBudget(steps=40)
    assert planned_steps(fixed, [patch] * 50) == 40
    by_area = FinetuneBudget(steps=40, steps_per_mm2=60, max_steps=200)
    assert planned_steps(by_area, [patch] * 2) == 40  # never below the fixed steps
    assert planned_steps(by_area, [patch] * 25) == round(60 * 25 * 0.065536)
    assert planned_steps(by_area, [patch] * 100) == 200  # capped
    assert planned_steps(by_area, [patch] * 100, mpp=0.5) == round(60 * 25 * 0.065536)  # 0.5 µm/px: a quarter


def test_the_fine_tune_counts_corrected_area_at_the_corrections_resolution(monkeypatch, tmp_path):
    import models.finetune as ft

    recipe = {"base": 4, "depth": 2, "folds": 1, "seed": 0}
    monkeypatch.setattr(ft, "load_members", lambda _p: ([UNet(base=4, depth=2, groups=2)], {"recipe": recipe}))
    steps = []
    monkeypatch.setattr(ft, "fit_member", lambda member, *a, **kw: steps.append(kw["steps"]))
    corrections = tuple(list(x) for x in _patches(40, 256, seed=3))  # 40 patches of 256² px
    budget = ft.FinetuneBudget(steps=10, patch=64, steps_per_mm2=100, max_steps=1000)
    for mpp in (1.0, 1.5):
        ft.finetune_members(tmp_path / "m.pt", corrections, _patches(4, 64), budget, mpp=mpp)
    assert steps == [round(100 * 40 * 0.065536), round(100 * 40 * 0.065536 * 2.25)]


def test_every_nth_correction_is_held_out_and_none_when_there_are_too_few():
    from models.finetune import split_holdout

    images, masks = list(range(10)), [f"m{i}" for i in range(10)]
    (train_i, train_m), (held_i, held_m) = split_holdout((images, masks), 5)
    assert held_i == [4, 9] and held_m == ["m4", "m9"]
    assert train_i == [0, 1, 2, 3, 5, 6, 7, 8] and len(train_m) == 8
    assert split_holdout((images[:4], masks[:4]), 5) == ((images[:4], masks[:4]), None)
    assert split_holdout((images, masks), 0)[1] is None


def test_symmetric_replay_is_augmented_like_the_corrections(monkeypatch):
    """With ``replay_augment`` the replay goes through the member's own augmentation strength."""
    import models.fit as fit

    seen: list[str | None] = []
    real = fit.augment

    def spy(images, masks, rng, *, stain=False, strength=None):
        seen.append(strength.name if strength else None)
        return real(images, masks, rng, stain=stain, strength=strength)

    monkeypatch.setattr(fit, "augment", spy)
    images, masks = _patches(8, 32)
    replay = _patches(8, 32, seed=2)
    for replay_augment in (False, True):
        seen.clear()
        net = UNet(base=4, depth=2, groups=2)
        fit.fit_member(
            net,
            images,
            masks,
            steps=2,
            batch=4,
            lr=1e-3,
            seed=0,
            strength=STRENGTHS["strong"],
            replay=replay,
            replay_share=0.5,
            replay_augment=replay_augment,
        )
        assert seen[0::2] == ["strong", "strong"]  # the corrections' half of each batch
        assert seen[1::2] == (["strong", "strong"] if replay_augment else [None, None])


def test_a_larger_replay_bank_is_windowed_and_every_batch_keeps_a_correction(monkeypatch):
    """The retrain arm's source patches are bigger than the correction crops: each batch takes a
    window of them of the crops' size, and a share near 1 still leaves one correction per batch."""
    import models.fit as fit

    batches: list[tuple[int, int]] = []
    real = fit.augment

    def spy(images, masks, rng, *, stain=False, strength=None):
        batches.append((len(images), images.shape[1]))
        return real(images, masks, rng, stain=stain, strength=strength)

    monkeypatch.setattr(fit, "augment", spy)
    images, masks = _patches(4, 24)
    source = _patches(20, 48, seed=3)
    fit.fit_member(
        UNet(base=4, depth=2, groups=2),
        images,
        masks,
        steps=3,
        batch=4,
        lr=1e-3,
        seed=0,
        replay=source,
        replay_share=0.99,
    )
    assert batches == [(1, 24), (3, 24)] * 3  # one correction, three source windows of 24 px


def test_retrain_arm_gives_each_member_its_own_source_folds_in_proportion(monkeypatch, tmp_path):
    """``FinetuneBudget.retrain``: member m continues on the source patches of every fold but its own,
    plus the corrections, each patch equally likely (the source's share of the union)."""
    import models.finetune as ft

    members = [UNet(base=4, depth=2, groups=2) for _ in range(2)]
    parent = tmp_path / "members.pt"
    recipe = {"base": 4, "depth": 2, "folds": 2, "augment": ["light", "strong"], "seed": 0}
    monkeypatch.setattr(ft, "load_members", lambda _p: (members, {"recipe": recipe}))
    calls = []
    monkeypatch.setattr(ft, "fit_member", lambda member, *a, **kw: calls.append(kw))
    src_images, src_masks = _patches(12, 32, seed=4)
    slides = np.repeat(np.arange(4), 3)  # 4 slides, 3 patches each: folds {0, 2} and {1, 3}
    corrections = tuple(list(x) for x in _patches(10, 32, seed=5))
    budget = ft.FinetuneBudget(steps=2, patch=16, holdout_every=5, symmetric=True, retrain=True)
    with pytest.raises(ValueError, match="source training bank"):
        ft.finetune_members(parent, corrections, None, budget)
    ft.finetune_members(parent, corrections, None, budget, source=(src_images, src_masks, slides))
    assert len(calls) == 2
    for m, kw in enumerate(calls):
        own = np.flatnonzero(slides % 2 != m)
        np.testing.assert_array_equal(kw["replay"][0], src_images[own])
        assert kw["replay_share"] == pytest.approx(6 / (6 + 8))  # 8 corrections trained on, 2 held out
        assert kw["replay_augment"] is True and kw["validation"] is not None
    calls.clear()  # two 512² px corrections weigh as eight 256² px source patches
    big = tuple(list(x) for x in _patches(2, 512, seed=7))
    ft.finetune_members(
        parent, big, None, ft.FinetuneBudget(steps=2, patch=16, retrain=True), source=(src_images, src_masks, slides)
    )
    assert [kw["replay_share"] for kw in calls] == [pytest.approx(6 / (6 + 8))] * 2


def test_a_larger_correction_gets_crops_in_proportion_to_its_area_up_to_a_cap():
    from models.finetune import MAX_AREA_UNITS, crop_bank

    def n_crops(side: int) -> int:
        image = np.full((side, side, 3), 200, np.uint8)
        return len(crop_bank([image], [np.zeros((side, side), np.uint8)], patch=64, per_image=4, seed=0)[0])

    assert n_crops(128) == 4 and n_crops(256) == 4  # up to 256² px: per_image
    assert n_crops(512) == 16  # four times the area
    assert n_crops(2048) == 4 * MAX_AREA_UNITS  # 64 times the area, capped


def test_without_corrections_each_member_trains_on_its_replay_alone(monkeypatch, tmp_path):
    """The experiment's control: no corrections, so no held-out set and no replay share; the source
    part (or the replay) is the whole batch, cropped like the baseline's training."""
    import models.finetune as ft

    members = [UNet(base=4, depth=2, groups=2) for _ in range(2)]
    recipe = {"base": 4, "depth": 2, "folds": 2, "augment": ["light", "strong"], "seed": 0}
    monkeypatch.setattr(ft, "load_members", lambda _p: (members, {"recipe": recipe}))
    calls = []
    monkeypatch.setattr(ft, "fit_member", lambda member, *a, **kw: calls.append((a, kw)))
    src_images, src_masks = _patches(8, 32, seed=6)
    slides = np.repeat(np.arange(4), 2)
    budget = ft.FinetuneBudget(steps=7, patch=16, holdout_every=5, symmetric=True, retrain=True)
    ft.finetune_members(tmp_path / "m.pt", ([], []), None, budget, source=(src_images, src_masks, slides))
    for m, (args, kw) in enumerate(calls):
        np.testing.assert_array_equal(args[0], src_images[slides % 2 != m])
        assert kw["steps"] == 7 and kw["crop"] == 16 and "replay" not in kw and "validation" not in kw
    with pytest.raises(ValueError, match="nothing to train on"):
        ft.finetune_members(tmp_path / "m.pt", ([], []), None, ft.FinetuneBudget(steps=2))


def test_the_runner_takes_every_budget_field_from_its_settings_but_the_seed_and_the_retrain_arm(tmp_path):
    from dataclasses import fields

    from models.finetune import FinetuneBudget
    from service.config import Settings
    from service.loop.candidate import UNSET, finetune_budget

    settings = Settings(data_dir=tmp_path, finetune_lr=1e-3, finetune_max_steps=800, finetune_symmetric=True)
    budget = finetune_budget(settings, seed=3)
    assert budget.seed == 3 and budget.lr == 1e-3 and budget.max_steps == 800 and budget.symmetric
    assert budget.retrain is False  # the service ships no source training bank
    assert {f.name for f in fields(FinetuneBudget)} - set(UNSET) <= {
        name.removeprefix("finetune_") for name in Settings.model_fields
    }


def test_batchnorm_members_fold_into_their_convolutions_and_serve_the_same_probabilities(tmp_path):
    import onnx
    import onnxruntime as ort

    from models.export import export_ensemble

    torch.manual_seed(0)
    members = [UNet(base=4, depth=2, norm="batch") for _ in range(2)]
    images, masks = _patches(8, 32)
    for net in members:  # a few steps in train mode, so the running statistics are not the identity
        fit_member(net, images, masks, steps=3, batch=4, lr=5e-3, seed=0)
        net.eval()
    path = tmp_path / "bn.onnx"
    export_ensemble(members, path, tile=32)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"BatchNormalization", "InstanceNormalization", "GroupNormalization"}  # folded away
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": images})[0]
    expected = np.stack([torch.sigmoid(torch.from_numpy(member_logits(m, images))).numpy() for m in members], axis=1)
    assert np.abs(got - expected).max() < 1e-4


def test_a_checkpoint_remembers_its_normalisation(tmp_path):
    from models.fit import load_members

    net = UNet(base=4, depth=2, norm="batch").eval()
    torch.save({"recipe": {"base": 4, "depth": 2, "norm": "batch"}, "members": [net.state_dict()]}, tmp_path / "m.pt")
    loaded, _ = load_members(tmp_path / "m.pt")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded[0].modules())
    with pytest.raises(ValueError, match="norm must be one of"):
        UNet(base=4, depth=2, norm="layer")
