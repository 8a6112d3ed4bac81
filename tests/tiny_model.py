"""A tiny untrained ensemble exported as a model directory (with or without feature-space novelty),
for tests that need a real ONNX graph but not a trained one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.export import export_ensemble
from models.net import UNet
from models.novelty import novelty_for


def tiny_members(n: int = 2) -> list[UNet]:
    torch.manual_seed(0)
    return [UNet(base=4, depth=3, groups=2).eval() for _ in range(n)]


def noise_tiles(n: int, seed: int = 0, colour=(200, 120, 180), size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(colour, 25, (n, size, size, 3)), 0, 255).astype(np.uint8)


def write_model_dir(root: Path, members, *, features=None, novelty_card=None, version: str = "tiny-1") -> Path:
    """``root/<version>`` with the members exported (with ``features``: novelty and embedding outputs)
    and a card (with ``novelty_card`` as its ``novelty`` entry)."""
    d = Path(root) / version
    d.mkdir(parents=True)
    export_ensemble(members, d / "ensemble.onnx", features=features)
    card = {"version": version, "input_mpp": 1.0, **({"novelty": novelty_card} if novelty_card else {})}
    (d / "card.json").write_text(json.dumps(card))
    return d


def tiny_model_dir(root: Path, *, novelty: bool, version: str = "tiny-1", members=None) -> Path:
    """A tiny model directory; with ``novelty``, statistics fitted on noise tiles."""
    members = members or tiny_members()
    stats, card_entry = novelty_for(members, noise_tiles(16)) if novelty else (None, None)
    return write_model_dir(root, members, features=stats, novelty_card=card_entry, version=version)
