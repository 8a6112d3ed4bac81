"""Fine-tune every ensemble member from a parent version on clinician corrections + source replay.

Used by the background runner (service/loop/candidate.py) and the paper experiment (bench/). torch lives here,
never in the serving path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.augment import STRENGTHS
from models.fit import fit_member, load_members, member_training_set
from models.net import UNet


@dataclass
class FinetuneBudget:
    """Bounded work per run (every member gets ``steps`` optimiser steps, or more with the area rule).

    ``steps_per_mm2`` > 0 scales the steps with the corrected area (at least ``steps``, at most
    ``max_steps``); ``holdout_every`` > 0 holds every n-th correction out and keeps each member's
    weights that did best on them (early stopping); ``symmetric`` gives the replay the same
    augmentation as the corrections (the parent's own strengths when its recipe names them), so
    colour never tells corrections from replay. ``retrain`` is the paper's arm: each member goes on
    training on its own share of the source training set together with the corrections, every
    patch equally likely (``source`` replaces the replay; ``replay_share`` is then the source's
    share of the union), instead of half of every batch being corrections."""

    steps: int = 40
    batch: int = 8
    patch: int = 128
    lr: float = 3e-4
    replay_share: float = 0.5
    threads: int = 1
    seed: int = 0
    steps_per_mm2: float = 0.0
    max_steps: int = 400
    holdout_every: int = 0
    symmetric: bool = False
    retrain: bool = False


def planned_steps(budget: FinetuneBudget, masks: list[np.ndarray], mpp: float = 1.0) -> int:
    """Steps per member: ``budget.steps``, or by corrected area when ``steps_per_mm2`` is set."""
    if budget.steps_per_mm2 <= 0:
        return budget.steps
    area_mm2 = sum(m.size for m in masks) * (mpp / 1000) ** 2
    return int(np.clip(round(budget.steps_per_mm2 * area_mm2), budget.steps, max(budget.steps, budget.max_steps)))


def held_indices(n: int, every: int) -> list[int]:
    """Which of ``n`` corrections early stopping holds out: every ``every``-th (none when ``every`` is 0
    or there are fewer than ``every``)."""
    if every <= 0 or n < every:
        return []
    return [i for i in range(n) if i % every == every - 1]


def split_holdout(corrections: tuple[list, list], every: int) -> tuple[tuple[list, list], tuple[list, list] | None]:
    """(trained, held out for early stopping) of ``corrections``; None for the second when none is held."""
    images, masks = corrections
    held = set(held_indices(len(images), every))
    if not held:
        return corrections, None
    keep = [i for i in range(len(images)) if i not in held]
    return ([images[i] for i in keep], [masks[i] for i in keep]), (
        [images[i] for i in sorted(held)],
        [masks[i] for i in sorted(held)],
    )


MAX_AREA_UNITS = 16  # a correction of 1024² px or more gets 16 times the crops of a 256² one


def area_units(shape: tuple[int, ...]) -> int:
    """How many 256² px areas a correction covers (at least 1, at most ``MAX_AREA_UNITS``)."""
    return int(np.clip(round(shape[0] * shape[1] / (256 * 256)), 1, MAX_AREA_UNITS))


def crop_bank(images: list[np.ndarray], masks: list[np.ndarray], patch: int, per_image: int, seed: int):
    """Random ``patch``-sized crops (with their masks) from variable-size correction images,
    ``per_image`` for each 256² px of a correction (``area_units``: a 1024 µm patch is sampled as
    densely as sixteen 256 µm ones). Where a correction has tumour, half of its crops are centred on
    a tumour pixel (so the tumour a pathologist drew is seen whole, not only cut at the crop's edge)."""
    rng = np.random.default_rng(seed)
    out_i, out_m = [], []
    for img, m in zip(images, masks, strict=True):
        h, w = m.shape
        if h < patch or w < patch:
            pad = ((0, max(0, patch - h)), (0, max(0, patch - w)))
            img = np.pad(img, pad + ((0, 0),), mode="reflect")
            m = np.pad(m, pad, mode="reflect")
            h, w = m.shape
        tumour = np.argwhere(m > 0)
        for i in range(per_image * area_units(m.shape)):
            if len(tumour) and i % 2 == 0:
                cy, cx = tumour[rng.integers(len(tumour))]
                y = int(np.clip(cy - patch // 2, 0, h - patch))
                x = int(np.clip(cx - patch // 2, 0, w - patch))
            else:
                y, x = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
            out_i.append(img[y : y + patch, x : x + patch])
            out_m.append(m[y : y + patch, x : x + patch])
    return np.stack(out_i), (np.stack(out_m) > 0).astype(np.uint8)


def center_crop(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = masks.shape[1:]
    if h <= size and w <= size:
        return images, masks
    y, x = (h - size) // 2, (w - size) // 2
    return images[:, y : y + size, x : x + size], masks[:, y : y + size, x : x + size]


def finetune_members(
    parent_weights: Path,
    corrections: tuple[list[np.ndarray], list[np.ndarray]],
    replay: tuple[np.ndarray, np.ndarray] | None,
    budget: FinetuneBudget,
    *,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
    source: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    mpp: float = 1.0,
) -> tuple[list[UNet], dict]:
    """Continue every member of ``parent_weights`` on the corrections (augmented) plus replay, or,
    with ``budget.retrain``, on the corrections plus its own part of ``source`` (the training bank:
    images, masks, slide of each patch), randomly cropped as the baseline was trained, every 256² px
    of either equally likely. Without corrections (the experiment's control) each member trains on
    that replay or source part alone, for ``budget.steps``. ``mpp``: the corrections' µm/px (their area
    sets the steps)."""
    if budget.retrain and source is None:
        raise ValueError("the retrain arm needs the source training bank (images, masks, slides)")
    torch.set_num_threads(max(1, budget.threads))
    members, ckpt = load_members(parent_weights)
    train, held = split_holdout(corrections, budget.holdout_every)
    steps = planned_steps(budget, train[1], mpp)
    images = masks = None  # no corrections (a control run): each member goes on on its replay alone
    if train[0]:
        images, masks = crop_bank(*train, budget.patch, per_image=32, seed=budget.seed)
    validation = None
    if held is not None:
        validation = crop_bank(*held, budget.patch, per_image=8, seed=budget.seed + 1)
    if replay is not None:
        replay = center_crop(replay[0], replay[1], budget.patch)
    strengths = ckpt.get("recipe", {}).get("augment") or []
    total = steps * len(members)
    for i, member in enumerate(members):
        strength = STRENGTHS[strengths[i % len(strengths)]] if strengths and budget.symmetric else None
        member_replay, share = replay, budget.replay_share
        if budget.retrain:
            own = member_training_set(ckpt.get("recipe", {}), i, len(source[0]), source[2])
            member_replay = (source[0][own], source[1][own])
            corrected = sum(area_units(m.shape) for m in train[1])  # in 256² px, the source patches' size
            share = len(own) / (len(own) + corrected)
        common = {
            "steps": steps,
            "batch": budget.batch,
            "lr": budget.lr,
            "seed": budget.seed + i,
            "stain_augment": True,
            "strength": strength,
            "progress": (lambda s, _t, _l, i=i: progress(i * steps + s, total)) if progress else None,
            "device": device,
        }
        if images is None:
            if member_replay is None:
                raise ValueError("nothing to train on: no corrections and no replay")
            fit_member(member, *member_replay, crop=budget.patch, **common)
        else:
            fit_member(
                member,
                images,
                masks,
                replay=member_replay,
                replay_share=share,
                replay_augment=budget.symmetric,
                validation=validation,
                eval_every=max(1, steps // 5),
                **common,
            )
    return members, ckpt


def save_members(members: list[UNet], recipe: dict, path: Path, extra: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".part")
    torch.save({"recipe": recipe, "members": [m.state_dict() for m in members], **(extra or {})}, tmp)
    tmp.replace(path)
