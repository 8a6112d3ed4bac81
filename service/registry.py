"""Model versions on disk: a version directory holds ensemble.onnx + card.json (+ members.pt, replay.npz)."""

from __future__ import annotations

import json
from pathlib import Path

from service.engine import Ensemble

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class ModelError(RuntimeError):
    """A model directory that cannot be served."""


def read_card(model_dir: Path) -> dict:
    path = Path(model_dir) / "card.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"no model card at {path}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"model card {path} is not valid JSON: {exc}") from None


def load_ensemble(model_dir: Path, *, providers: str = "auto", threads: int = 0) -> Ensemble:
    """Open the version's fused ONNX ensemble, named by its card's version."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    onnx_path = model_dir / "ensemble.onnx"
    if not onnx_path.exists():
        raise ModelError(f"no ensemble.onnx in {model_dir}")
    return Ensemble(onnx_path, card["version"], providers=PROVIDERS.get(providers), threads=threads)
