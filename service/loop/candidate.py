"""Build a candidate version: corrections -> fine-tune every member -> export ONNX -> card, staged.

The one place the loop calls the training side (torch, imported lazily: serving never loads it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from service.config import Settings
from service.inference.ensemble import input_mpp, read_card
from service.loop.corrections import load_pair
from service.loop.registry import Registry, finetuned_card
from service.store import Correction


@dataclass
class Candidate:
    """A fine-tuned version in its staging directory, not yet gated, committed or registered."""

    staging: Path
    card: dict

    @property
    def version(self) -> str:
        return self.card["version"]


UNSET = ("seed", "retrain")  # FinetuneBudget fields with no setting of their own


def finetune_budget(settings: Settings, seed: int):
    """The runner's fine-tune budget: each field from the setting ``finetune_<field>``; the paper's
    retrain arm (the one the protocol validated) when the operator gives the source training bank."""
    from models.finetune import FinetuneBudget

    values = {f.name: getattr(settings, f"finetune_{f.name}") for f in fields(FinetuneBudget) if f.name not in UNSET}
    return FinetuneBudget(**values, seed=seed, retrain=settings.finetune_source_bank is not None)


def source_bank_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as the retrain arm's source training bank, or None when it can. Reads
    the arrays' headers only (a bank of gigabytes is not decompressed to check it; damage inside an
    array shows at the first run, which then fails with the reason)."""
    try:
        arrays = _npz_headers(path)
    except Exception as exc:  # noqa: BLE001 - whatever makes it unreadable (no file, not a zip, a .npy): one line
        return f"cannot read {path} as an npz bank: {exc}"
    missing = {"images", "masks", "slides"} - set(arrays)
    if missing:
        return f"{path} lacks {', '.join(sorted(missing))} (write it with `python -m models.train`)"
    (images, image_type), (masks, mask_type), (slides, slide_type) = (arrays[k] for k in ("images", "masks", "slides"))
    n = images[0] if images else 0
    if len(images) != 4 or images[3] != 3 or masks != images[:3] or slides != (n,) or not n:
        return f"{path}: images (N, H, W, 3), masks (N, H, W) and slides (N,) do not fit together"
    if image_type != np.uint8 or mask_type != np.uint8 or slide_type.kind not in "iu":
        kinds = f"{image_type}, {mask_type}, {slide_type}"
        return f"{path}: images and masks must be uint8 and slides integers, not {kinds}"
    return None


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{array name: (shape, dtype)} of an ``.npz`` from each array's ``.npy`` header."""
    import zipfile

    from numpy.lib import format as npy

    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    arrays = {}
    with zipfile.ZipFile(path) as bank:
        for name in bank.namelist():
            if name.endswith(".npy"):
                with bank.open(name) as f:
                    version = npy.read_magic(f)
                    if version not in readers:
                        raise ValueError(f"{name} is .npy format {version[0]}.{version[1]} (1.0 or 2.0 expected)")
                    shape, _, dtype = readers[version](f)
                    arrays[name.removesuffix(".npy")] = (shape, dtype)
    return arrays


def corrections_used(settings: Settings, train: list[Correction], holdout: list[Correction]) -> dict[str, list[str]]:
    """A run's corrections by role: trained on; kept out of training to early-stop it (so not learned:
    a later run trains on them); held out for the gate."""
    from models.finetune import held_indices

    early = set(held_indices(len(train), settings.finetune_holdout_every))
    return {
        "train": [c.id for i, c in enumerate(train) if i not in early],
        "early_stop": [c.id for i, c in enumerate(train) if i in early],
        "holdout": [c.id for c in holdout],
    }


def pairs(corrections_dir: Path, corrections: list[Correction], mpp: float, max_side: int) -> tuple[list, list]:
    """(images, masks) of stored corrections at ``mpp`` µm/px, the model's: a correction made on a job
    run at another resolution is resampled, so the model is trained and gated at the scale it sees
    (at most ``max_side`` px a side: see ``at_mpp``)."""
    loaded = [at_mpp(*load_pair(corrections_dir, c.id), c.mpp, mpp, max_side) for c in corrections]
    return [p[0] for p in loaded], [p[1] for p in loaded]


def at_mpp(
    image: np.ndarray, mask: np.ndarray, mpp: float, target_mpp: float, max_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (RGB uint8) and ``mask`` (0/1) of ``mpp`` µm/px resampled to ``target_mpp``.

    The image is smoothed as it shrinks; a mask pixel is tumour where tumour covers at least half of
    it, and a tumour too thin to cover half of any pixel keeps its best-covered pixels (a clinician's
    "tumour here" never turns into "all benign"). A correction that would exceed ``max_side`` px a
    side is used through its window of that size around its tumour (the fine-tune samples at most
    ``MAX_AREA_UNITS`` × 256² px of any correction anyway), so memory stays bounded."""
    scale = mpp / target_mpp
    if abs(scale - 1) < 1e-6:
        return image, mask
    window = max(1, int(max_side / scale))  # the most source px whose resampled side fits max_side
    image, mask = _window(image, mask, window)
    rows, cols = mask.shape
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))  # PIL: (width, height)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    cover = np.asarray(Image.fromarray(mask.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    tumour = cover >= 0.5
    if mask.any() and not tumour.any():
        tumour = cover >= cover.max() * 0.999
    return resized, tumour.astype(np.uint8)


def _window(image: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``side`` px a side of the pair, centred on the mask's tumour (its centre when none)."""
    rows, cols = mask.shape
    if rows <= side and cols <= side:
        return image, mask

    def start(weights: np.ndarray, n: int) -> int:
        centre = (np.arange(n) * weights).sum() / weights.sum() if weights.any() else n / 2
        return int(np.clip(round(centre - side / 2), 0, max(0, n - side)))

    y, x = start(mask.sum(axis=1), rows), start(mask.sum(axis=0), cols)
    return image[y : y + side, x : x + side], mask[y : y + side, x : x + side]


def build_candidate(
    registry: Registry,
    settings: Settings,
    *,
    parent: str,
    train: list[Correction],
    used: dict,
    run_id: str,
    seed: int,
    progress: Callable[[int, int], None],
    device: str,
) -> Candidate:
    """Fine-tune every member of ``parent`` on ``train`` plus source replay (or, with the source
    training bank, retrain each on its part of it plus ``train``); export into a staging dir."""
    from models.bank import load_bank, load_bank_slides
    from models.export import export_ensemble
    from models.finetune import finetune_members, save_members

    parent_dir = registry.path(parent)
    budget = finetune_budget(settings, seed)
    replay = load_bank(settings.baseline_dir / "replay.npz")
    source = None
    if budget.retrain:
        bank = settings.finetune_source_bank
        source = (*load_bank(bank), load_bank_slides(bank))
    parent_card = read_card(parent_dir)
    members, ckpt = finetune_members(
        parent_dir / "members.pt",
        pairs(settings.data_dir / "corrections", train, input_mpp(parent_card), settings.max_correction_px),
        replay,
        budget,
        progress=progress,
        device=device,
        source=source,
        mpp=input_mpp(parent_card),
    )
    stats = None
    if parent_card.get("novelty"):  # the members' features moved: refit their source statistics on the replay
        from models.novelty import novelty_for

        stats, novelty = novelty_for(members, replay[0])
        parent_card = {**parent_card, "novelty": novelty}
    staging = registry.stage()
    sha = export_ensemble(members, staging / "ensemble.onnx", features=stats)
    save_members(members, ckpt["recipe"], staging / "members.pt", {"parent": parent})
    card = finetuned_card(
        parent_card,
        version=registry.version_name(sha),
        sha256=sha,
        parent=parent,
        finetune={"budget": budget.__dict__, "corrections": used, "run": run_id},
    )
    return Candidate(staging, card)
