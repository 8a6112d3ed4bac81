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

from models.fit import fit_member, load_members
from models.net import UNet


@dataclass
class FinetuneBudget:
    """Bounded work per run (every member gets ``steps`` optimiser steps)."""

    steps: int = 40
    batch: int = 8
    patch: int = 128
    lr: float = 3e-4
    replay_share: float = 0.5
    threads: int = 1
    seed: int = 0


def crop_bank(images: list[np.ndarray], masks: list[np.ndarray], patch: int, per_image: int, seed: int):
    """Random ``patch``-sized crops (with their masks) from variable-size correction images; where a
    correction has tumour, half of its crops are centred on a tumour pixel (so the tumour a
    pathologist drew is seen whole, not only cut at the crop's edge)."""
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
        for i in range(per_image):
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
) -> tuple[list[UNet], dict]:
    """Continue every member of ``parent_weights`` on the corrections (stain-augmented) plus replay."""
    torch.set_num_threads(max(1, budget.threads))
    members, ckpt = load_members(parent_weights)
    images, masks = crop_bank(*corrections, budget.patch, per_image=32, seed=budget.seed)
    if replay is not None:
        replay = center_crop(replay[0], replay[1], budget.patch)
    total = budget.steps * len(members)
    for i, member in enumerate(members):
        fit_member(
            member,
            images,
            masks,
            steps=budget.steps,
            batch=budget.batch,
            lr=budget.lr,
            seed=budget.seed + i,
            stain_augment=True,
            replay=replay,
            replay_share=budget.replay_share,
            progress=(lambda s, _t, _l, i=i: progress(i * budget.steps + s, total)) if progress else None,
            device=device,
        )
    return members, ckpt


def save_members(members: list[UNet], recipe: dict, path: Path, extra: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".part")
    torch.save({"recipe": recipe, "members": [m.state_dict() for m in members], **(extra or {})}, tmp)
    tmp.replace(path)
