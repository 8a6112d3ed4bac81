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


class ModelHolder:
    """The ensemble this process serves; ``current()`` is what a new job pins for its whole run."""

    def __init__(self, model_dir: Path, *, providers: str = "auto", threads: int = 0):
        self.model_dir = Path(model_dir)
        self.providers, self.threads = providers, threads
        self._ensemble: Ensemble | None = None
        self.card: dict = {}

    def load(self) -> Ensemble:
        ens = load_ensemble(self.model_dir, providers=self.providers, threads=self.threads)
        ens.warm_up()
        self.card = read_card(self.model_dir)
        self._ensemble = ens
        return ens

    @property
    def loaded(self) -> bool:
        return self._ensemble is not None

    def current(self) -> Ensemble:
        if self._ensemble is None:
            raise ModelError("no model loaded")
        return self._ensemble

    def versions(self) -> list[dict]:
        """Every version known to this process, newest first (the baseline until the loop adds more)."""
        return [self.card] if self.card else []
