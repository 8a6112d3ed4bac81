"""Optimisation of one ensemble member (torch only; CPU or CUDA). Shared by training and fine-tuning."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from models.bank import load_bank, save_bank
from models.net import UNet, normalise


def augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, *, stain: bool = False):
    """Random flips / 90° rotations per batch; optional HED stain jitter per image (numpy, uint8 in/out)."""
    k = int(rng.integers(4))
    images, masks = np.rot90(images, k, axes=(1, 2)), np.rot90(masks, k, axes=(1, 2))
    if rng.random() < 0.5:
        images, masks = images[:, :, ::-1], masks[:, :, ::-1]
    images = np.ascontiguousarray(images)
    if stain:
        from models.stain import stain_shift  # skimage; only needed with stain augmentation

        out = np.empty_like(images)
        for i, img in enumerate(images):
            scale = tuple(rng.uniform(0.7, 1.4, 3))
            offset = tuple(rng.uniform(-0.03, 0.03, 3))
            out[i] = stain_shift(img, scale, offset)
        images = out
    return images, np.ascontiguousarray(masks)


def _to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    return normalise(x)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (tumour class)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    soft_dice = (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + (1 - soft_dice)


def fit_member(
    model: UNet,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    stain_augment: bool = False,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
    replay_share: float = 0.0,
    progress: Callable[[int, int, float], None] | None = None,
    device: str = "cpu",
) -> float:
    """Optimise ``model`` in place for ``steps`` Adam steps; returns the mean loss of the last 20 steps."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model.to(dev)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    model.train()
    recent: list[float] = []
    n_replay = int(round(batch * replay_share)) if replay is not None else 0
    for step in range(steps):
        idx = rng.integers(len(images), size=batch - n_replay)
        bi, bm = augment(images[idx], masks[idx], rng, stain=stain_augment)
        if n_replay:  # source replay keeps its own colours: it anchors the source domain
            ridx = rng.integers(len(replay[0]), size=n_replay)
            ri, rm = augment(replay[0][ridx], replay[1][ridx], rng)
            bi, bm = np.concatenate([bi, ri]), np.concatenate([bm, rm])
        logits = model(_to_tensor(bi, dev))
        loss = loss_fn(logits, torch.from_numpy(bm).to(dev).float().unsqueeze(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        recent = (recent + [value])[-20:]
        if progress:
            progress(step + 1, steps, value)
    model.eval().cpu()
    return float(np.mean(recent)) if recent else float("nan")


def fit_ensemble(recipe: dict, bank: Path, out: Path, device: str = "cpu", log: Callable[[str], None] = print) -> Path:
    """Train every member on the bank (bootstrap resample per member); write members.pt + replay.npz."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    images, masks = load_bank(bank)
    log(f"{len(images)} patches, tumour pixel share {masks.mean():.2f}, device {device}")
    members = []
    for m in range(recipe["members"]):
        torch.manual_seed(recipe["seed"] + m)
        net = UNet(base=recipe["base"], depth=recipe["depth"])
        boot = np.random.default_rng(recipe["seed"] + 100 + m).integers(len(images), size=len(images))
        loss = fit_member(
            net,
            images[boot],
            masks[boot],
            steps=recipe["steps"],
            batch=recipe["batch"],
            lr=recipe["lr"],
            seed=recipe["seed"] + m,
            device=device,
        )
        log(f"member {m + 1}/{recipe['members']}: final loss {loss:.3f} ({time.time() - t0:.0f}s)")
        members.append(net)
    weights = out / "members.pt"
    tmp = weights.with_name("members.pt.part")
    torch.save(
        {
            "recipe": recipe,
            "members": [m.state_dict() for m in members],
            "fit_seconds": round(time.time() - t0, 1),
            "device": device,
        },
        tmp,
    )
    tmp.replace(weights)
    replay_idx = np.random.default_rng(recipe["seed"]).choice(len(images), size=min(48, len(images)), replace=False)
    save_bank(out / "replay.npz", images[replay_idx], masks[replay_idx])
    return weights


def load_members(weights: Path) -> tuple[list[UNet], dict]:
    """Members (eval mode, CPU) and the checkpoint's metadata."""
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    r = ckpt["recipe"]
    members = []
    for sd in ckpt["members"]:
        net = UNet(base=r["base"], depth=r["depth"])
        net.load_state_dict(sd)
        members.append(net.eval())
    return members, ckpt


def main(argv: list[str] | None = None) -> None:
    """Fit stage alone (no OpenSlide needed), e.g. on a GPU machine."""
    ap = argparse.ArgumentParser(description="train every ensemble member on a patch bank")
    ap.add_argument("--recipe", type=Path, required=True)
    ap.add_argument("--bank", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    fit_ensemble(json.loads(args.recipe.read_text()), args.bank, args.out, args.device)


if __name__ == "__main__":
    main()
