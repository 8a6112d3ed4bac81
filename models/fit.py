"""Optimisation of one ensemble member (torch only; CPU or CUDA). Shared by training and fine-tuning."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from models.augment import STRENGTHS, Strength, augment_batch
from models.bank import load_bank, load_bank_slides, save_bank
from models.net import UNet, to_input


def augment(
    images: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    *,
    stain: bool = False,
    strength: Strength | None = None,
):
    """Random flips / 90° rotations per batch, then per image either the generic photometric
    augmentation at ``strength`` (models/augment.py) or, with ``stain``, HED jitter alone (uint8 in/out)."""
    k = int(rng.integers(4))
    images, masks = np.rot90(images, k, axes=(1, 2)), np.rot90(masks, k, axes=(1, 2))
    if rng.random() < 0.5:
        images, masks = images[:, :, ::-1], masks[:, :, ::-1]
    images = np.ascontiguousarray(images)
    if strength is not None:
        images = augment_batch(images, rng, strength)
    elif stain:
        from models.stain import stain_shift  # skimage; only needed with stain augmentation

        out = np.empty_like(images)
        for i, img in enumerate(images):
            scale = tuple(rng.uniform(0.7, 1.4, 3))
            offset = tuple(rng.uniform(-0.03, 0.03, 3))
            out[i] = stain_shift(img, scale, offset)
        images = out
    return images, np.ascontiguousarray(masks)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (tumour class)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    soft_dice = (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + (1 - soft_dice)


@dataclass
class FitResult:
    """How a member's optimisation ended."""

    loss: float  # mean training loss of the last 20 steps
    best_step: int  # the step whose weights were kept (the last one without validation)
    val_loss: float | None = None  # validation loss at best_step


def validation_loss(model: UNet, images: np.ndarray, masks: np.ndarray, device: str = "cpu", batch: int = 16) -> float:
    """The training loss on a fixed set (no augmentation), pixel-weighted over batches."""
    model.eval()
    dev = torch.device(device)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = model(to_input(images[i : i + batch], dev))
            target = torch.from_numpy(masks[i : i + batch]).to(dev).float().unsqueeze(1)
            total += float(loss_fn(logits, target)) * len(logits)
    return total / max(1, len(images))


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
    strength: Strength | None = None,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
    replay_share: float = 0.0,
    replay_augment: bool = False,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    eval_every: int = 100,
    crop: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    device: str = "cpu",
) -> FitResult:
    """Optimise ``model`` in place for ``steps`` AdamW steps (cosine schedule).

    With ``validation``, the loss on it is measured every ``eval_every`` steps and the best weights
    are kept (early stopping without cutting the schedule short). ``crop`` > 0 trains on a random
    ``crop``-sized window of each batch (a quarter of the cost at half the side; the net is fully
    convolutional, so it still serves whole tiles).
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    model.to(dev)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    model.train()
    recent: list[float] = []
    best: tuple[float, int, dict] | None = None
    n_replay = min(batch - 1, int(round(batch * replay_share))) if replay is not None else 0  # one new at least
    for step in range(steps):
        idx = rng.integers(len(images), size=batch - n_replay)
        bi, bm = images[idx], masks[idx]
        if crop and crop < bi.shape[1]:
            y, x = (int(v) for v in rng.integers(0, bi.shape[1] - crop + 1, size=2))
            bi, bm = bi[:, y : y + crop, x : x + crop], bm[:, y : y + crop, x : x + crop]
        bi, bm = augment(bi, bm, rng, stain=stain_augment, strength=strength)
        if n_replay:  # replay keeps its own colours (it anchors the source) unless ``replay_augment``
            ridx = rng.integers(len(replay[0]), size=n_replay)
            ri, rm = replay[0][ridx], replay[1][ridx]
            side = bi.shape[1]
            if ri.shape[1] > side:  # a larger replay bank (the source's own patches): a random window
                y, x = (int(v) for v in rng.integers(0, ri.shape[1] - side + 1, size=2))
                ri, rm = ri[:, y : y + side, x : x + side], rm[:, y : y + side, x : x + side]
            if replay_augment:
                ri, rm = augment(ri, rm, rng, stain=stain_augment, strength=strength)
            else:
                ri, rm = augment(ri, rm, rng)
            bi, bm = np.concatenate([bi, ri]), np.concatenate([bm, rm])
        logits = model(to_input(bi, dev))
        loss = loss_fn(logits, torch.from_numpy(bm).to(dev).float().unsqueeze(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        recent = (recent + [value])[-20:]
        if validation is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            val = validation_loss(model, *validation, device=device)
            if best is None or val < best[0]:
                best = (val, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            model.train()
        if progress:
            progress(step + 1, steps, value)
    if best is not None:
        model.load_state_dict(best[2])
    model.eval().cpu()
    last = float(np.mean(recent)) if recent else float("nan")
    return FitResult(last, best[1], best[0]) if best is not None else FitResult(last, steps)


def member_logits(model: UNet, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """(N, H, W) float32 logits of an eval-mode member on CPU."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(model(to_input(images[i : i + batch], torch.device("cpu")))[:, 0].numpy())
    return np.concatenate(out).astype(np.float32)


def fit_temperature(logits: np.ndarray, truth: np.ndarray) -> float:
    """The temperature T minimising the binary cross-entropy of sigmoid(logits / T) (Guo et al. 2017),
    by golden-section search over log T in [1/8, 8]."""
    z = logits.ravel().astype(np.float64)
    y = truth.ravel().astype(np.float64)

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0, s) - y * s))

    lo, hi = np.log(1 / 8), np.log(8)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return float(np.exp((lo + hi) / 2))


def bake_temperature(model: UNet, temperature: float) -> None:
    """Divide the member's logits by ``temperature`` for good: the 1x1 head's weight and bias scale."""
    with torch.no_grad():
        model.head.weight.div_(temperature)
        model.head.bias.div_(temperature)


def member_training_set(recipe: dict, m: int, n: int, slides: np.ndarray | None) -> np.ndarray:
    """Indices member ``m`` trains on: every fold of slides but its own with ``recipe["folds"]``,
    otherwise a bootstrap resample (the seed decides)."""
    folds = int(recipe.get("folds") or 0)
    if folds:
        if slides is None:
            raise ValueError("a fold split needs a bank that records each patch's slide")
        return np.flatnonzero(slides % folds != m % folds)
    return np.random.default_rng(recipe["seed"] + 100 + m).integers(n, size=n)


def fit_ensemble(
    recipe: dict,
    bank: Path,
    out: Path,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    validation: Path | None = None,
) -> Path:
    """Train every member on the bank; write members.pt + replay.npz.

    Members differ by seed, by their training set (fold or bootstrap, ``member_training_set``) and,
    with ``recipe["augment"]`` (strength names, cycled over members), by augmentation strength. With
    a ``validation`` bank each member keeps its best weights and, with ``recipe["calibrate"]``, gets
    its temperature fitted there and baked into its head.
    """
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    images, masks = load_bank(bank)
    slides = load_bank_slides(bank)
    val = load_bank(validation) if validation is not None else None
    strengths = [STRENGTHS[name] for name in recipe.get("augment") or []]
    log(f"{len(images)} patches, tumour pixel share {masks.mean():.2f}, device {device}")
    members, info = [], []
    for m in range(recipe["members"]):
        torch.manual_seed(recipe["seed"] + m)
        net = UNet(base=recipe["base"], depth=recipe["depth"], norm=recipe.get("norm", "group"))
        idx = member_training_set(recipe, m, len(images), slides)
        strength = strengths[m % len(strengths)] if strengths else None
        result = fit_member(
            net,
            images[idx],
            masks[idx],
            steps=recipe["steps"],
            batch=recipe["batch"],
            lr=recipe["lr"],
            seed=recipe["seed"] + m,
            strength=strength,
            validation=val,
            eval_every=int(recipe.get("eval_every") or 100),
            crop=int(recipe.get("crop") or 0),
            device=device,
        )
        temperature = 1.0
        if val is not None and recipe.get("calibrate"):
            temperature = fit_temperature(member_logits(net, val[0]), val[1])
            bake_temperature(net, temperature)
        info.append(
            {
                "augment": strength.name if strength else None,
                "patches": int(len(idx)),
                "best_step": result.best_step,
                "val_loss": result.val_loss,
                "temperature": round(temperature, 4),
            }
        )
        log(f"member {m + 1}/{recipe['members']}: {info[-1]}, final loss {result.loss:.3f} ({time.time() - t0:.0f}s)")
        members.append(net)
    weights = out / "members.pt"
    tmp = weights.with_name("members.pt.part")
    torch.save(
        {
            "recipe": recipe,
            "members": [m.state_dict() for m in members],
            "members_info": info,
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
        net = UNet(base=r["base"], depth=r["depth"], norm=r.get("norm", "group"))
        net.load_state_dict(sd)
        members.append(net.eval())
    return members, ckpt


def main(argv: list[str] | None = None) -> None:
    """Fit stage alone (no OpenSlide needed), e.g. on a GPU machine."""
    ap = argparse.ArgumentParser(description="train every ensemble member on a patch bank")
    ap.add_argument("--recipe", type=Path, required=True)
    ap.add_argument("--bank", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--validation", type=Path, default=None, help="validation bank (early stopping, temperature)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    fit_ensemble(json.loads(args.recipe.read_text()), args.bank, args.out, args.device, validation=args.validation)


if __name__ == "__main__":
    main()
