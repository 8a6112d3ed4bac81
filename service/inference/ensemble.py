"""The model seam: a ``Predictor`` protocol, its ONNX Runtime implementation, and reading a model
directory (ensemble.onnx + card.json). Never torch."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from service.errors import Unavailable

log = logging.getLogger("uga.engine")


class Predictor(Protocol):
    """What inference needs of a model: member probabilities for a batch of RGB tiles."""

    version: str
    members: int

    @property
    def providers(self) -> list[str]: ...

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) RGB -> float32 (B, M, H, W) member tumour probabilities."""
        ...


class Ensemble:
    """One ONNX Runtime session holding every ensemble member in one graph."""

    def __init__(
        self,
        onnx_path: Path,
        version: str,
        *,
        providers: list[str] | None = None,
        threads: int = 0,
        model_bytes: bytes | None = None,
    ):
        self.path, self.version = Path(onnx_path), version
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between ops: the reader and stitcher threads need the cores too
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = providers or default_providers()
        if "CUDAExecutionProvider" in wanted:
            preload_cuda()
        source = model_bytes if model_bytes is not None else str(self.path)  # bytes: exactly what was verified
        self.session = ort.InferenceSession(source, opts, providers=wanted)
        missing = [p for p in wanted if p not in self.session.get_providers()]
        if missing:
            log.warning("ONNX Runtime is not using %s (running on %s)", ", ".join(missing), self.providers)
        self.input_name = self.session.get_inputs()[0].name
        self.members = int(self.session.get_outputs()[0].shape[1])
        # a graph exported with feature statistics (models/novelty.py) also outputs novelty and an embedding
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_names = list(outputs)
        self.novelty = "novelty" in outputs
        self.embedding_dims = int(outputs["embedding"].shape[1]) if "embedding" in outputs else 0
        self.novelty_threshold: float | None = None  # the source's high quantile, from the model card
        self.novelty_flag_share: float | None = None  # tissue share beyond it that flags a slide
        # pixels per cell of the per-cell outputs (0: none); the graph states it only symbolically
        self.cell_px = self._cell_side() if self.novelty or self.embedding_dims else 0

    @property
    def providers(self) -> list[str]:
        """The providers that really run (read back from the session)."""
        return list(self.session.get_providers())

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) RGB -> float32 (B, M, H, W) member tumour probabilities."""
        return self.predict_outputs(tiles)["member_probs"]

    def predict_outputs(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph by name: ``member_probs`` and, where the graph has them,
        ``novelty`` (B, 1, H / 8, W / 8; squared Mahalanobis distance per feature from the source,
        about 1 in domain) and ``embedding`` (B, E, H / 8, W / 8)."""
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(tiles, np.uint8)})
        return dict(zip(self.output_names, out, strict=True))

    def _cell_side(self, probe: int = 64) -> int:
        """Pixels per cell of ``novelty`` / ``embedding``, read off one run on a blank probe tile."""
        out = self.predict_outputs(np.zeros((1, probe, probe, 3), np.uint8))
        return probe // int(out["novelty" if self.novelty else "embedding"].shape[-1])

    def warm_up(self, tile: int = 256) -> None:
        self.predict(np.full((1, tile, tile, 3), 230, np.uint8))


def preload_cuda() -> None:
    """Load the CUDA/cuDNN libraries the onnxruntime-gpu wheels bring (no-op on the CPU build)."""
    if "CUDAExecutionProvider" in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class ModelError(Unavailable):
    """A model directory that cannot be served."""

    def __init__(self, message: str):
        super().__init__("unusable_model", message)


def read_card(model_dir: Path) -> dict:
    path = Path(model_dir) / "card.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"no model card at {path}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"model card {path} is not valid JSON: {exc}") from None


def input_mpp(card: dict) -> float:
    """The µm/px a version was trained at (its card's ``input_mpp``; 1.0, the paper's, when unnamed)."""
    return float(card.get("input_mpp") or 1.0)


def load_ensemble(
    model_dir: Path, *, providers: str = "auto", threads: int = 0, expect_sha256: str | None = None
) -> Ensemble:
    """Open the version's fused ONNX ensemble, named by its card's version.

    With ``expect_sha256`` (the registry's record) the file is read whole, hashed, and the session is
    made from those very bytes: a model another host has not finished writing is never served.
    """
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    onnx_path = model_dir / "ensemble.onnx"
    if not onnx_path.exists():
        raise ModelError(f"no ensemble.onnx in {model_dir}")
    data = None
    if expect_sha256 is not None:
        data = onnx_path.read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != expect_sha256:
            raise ModelError(
                f"{onnx_path} has sha256 {got[:12]}..., the registry recorded {expect_sha256[:12]}...: "
                "incomplete or changed on this host's view of the volume; not served"
            )
    ensemble = Ensemble(
        onnx_path, card["version"], providers=PROVIDERS.get(providers), threads=threads, model_bytes=data
    )
    if ensemble.novelty:
        entry = card.get("novelty") or {}
        threshold, share = entry.get("threshold"), entry.get("flag_share")
        if not all(isinstance(v, int | float) and v > 0 for v in (threshold, share)):
            raise ModelError(
                f"{model_dir}: the graph computes novelty but card.json has no novelty.threshold and flag_share > 0"
            )
        ensemble.novelty_threshold, ensemble.novelty_flag_share = float(threshold), float(share)
    return ensemble


def check_outputs_finite(ensemble: Ensemble, tile: int = 128) -> None:
    """Warm the session up on a synthetic H&E-like tile and refuse NaN/inf or out-of-range outputs."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal((200, 150, 200), 30, (1, tile, tile, 3)), 0, 255).astype(np.uint8)
    out = ensemble.predict(img)
    if not np.isfinite(out).all() or out.min() < 0 or out.max() > 1:
        raise ModelError(f"model {ensemble.version} produces non-finite or out-of-range outputs")
