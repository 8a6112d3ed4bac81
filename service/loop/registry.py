"""Model versions: immutable directories (ensemble.onnx, members.pt, card.json) registered in the store,
one atomic 'current' pointer, and a per-process holder that follows the pointer (hot swap).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from service.inference.engine import Ensemble
from service.store import Store

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
log = logging.getLogger("uga.registry")


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


def check_outputs_finite(ensemble: Ensemble, tile: int = 128) -> None:
    """Warm the session up on a synthetic H&E-like tile and refuse NaN/inf or out-of-range outputs."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal((200, 150, 200), 30, (1, tile, tile, 3)), 0, 255).astype(np.uint8)
    out = ensemble.predict(img)
    if not np.isfinite(out).all() or out.min() < 0 or out.max() > 1:
        raise ModelError(f"model {ensemble.version} produces non-finite or out-of-range outputs")


class Registry:
    """Versions live in ``<data>/models/<version>/`` (the shipped baseline stays where it is)."""

    def __init__(self, store: Store, data_dir: Path, baseline_dir: Path):
        self.store, self.baseline_dir = store, Path(baseline_dir)
        self.models_dir = Path(data_dir) / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)

    def ensure_baseline(self) -> str:
        """Register the shipped baseline once and point 'current' at it if nothing is current yet."""
        card = read_card(self.baseline_dir)
        if self.store.version(card["version"]) is None:
            self.store.register_version(
                {
                    "version": card["version"],
                    "parent": None,
                    "sha256": card["sha256"],
                    "path": str(self.baseline_dir),
                    "status": "baseline",
                    "metrics": card.get("metrics", {}),
                }
            )
        if self.store.current_version() is None:
            self.store.move_pointer(card["version"], action="init", actor="system")
        return card["version"]

    def path(self, version: str) -> Path:
        row = self.store.version(version)
        if row is None:
            raise ModelError(f"unknown model version {version!r}")
        return Path(row["path"])

    def staging_dir(self) -> Path:
        return Path(self.models_dir / f".staging-{time.time_ns()}")

    def commit_dir(self, staging: Path, version: str) -> Path:
        final = self.models_dir / version
        staging.rename(final)
        return final

    def sweep(self) -> list[str]:
        """Remove staging directories and version directories that were never registered (crashed runs)."""
        removed = []
        for d in self.models_dir.iterdir():
            if d.name.startswith(".staging-") or self.store.version(d.name) is None:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed


class ModelHolder:
    """The ensemble this process serves. ``current()`` is what a new job pins for its whole run.

    A watcher thread polls the store's pointer; a new version is loaded and warmed *before* the
    reference is switched (between requests: in-flight work keeps its own reference). A version that
    fails to load is marked failed and the pointer is moved back to the version being served.
    """

    def __init__(self, registry: Registry, *, providers: str = "auto", threads: int = 0, on_swap=None):
        self.registry, self.providers, self.threads = registry, providers, threads
        self._ensemble: Ensemble | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_swap = on_swap

    def _load(self, version: str) -> Ensemble:
        ens = load_ensemble(self.registry.path(version), providers=self.providers, threads=self.threads)
        check_outputs_finite(ens)
        return ens

    def load(self) -> Ensemble:
        version = self.registry.store.current_version() or self.registry.ensure_baseline()
        self._ensemble = self._load(version)
        return self._ensemble

    @property
    def loaded(self) -> bool:
        return self._ensemble is not None

    @property
    def version(self) -> str | None:
        return self._ensemble.version if self._ensemble else None

    def current(self) -> Ensemble:
        ens = self._ensemble
        if ens is None:
            raise ModelError("no model loaded")
        return ens

    def sync(self) -> bool:
        """Follow the pointer once. True when this process switched versions."""
        target = self.registry.store.current_version()
        with self._lock:
            served = self.version
            if target is None or target == served:
                return False
            try:
                ens = self._load(target)
            except Exception as exc:  # noqa: BLE001 - any load failure keeps the old model
                reason = f"failed to load: {exc}".splitlines()[0][:300]
                log.error("model %s %s; staying on %s and moving the pointer back", target, reason, served)
                self.registry.store.set_version_status(target, "failed", reason)
                if served:
                    self.registry.store.move_pointer(served, action="auto-rollback", actor="system", expect=target)
                return False
            self._ensemble = ens
        log.info("hot swap: %s -> %s", served, target)
        if self.on_swap:
            self.on_swap(served, target)
        return True

    def start_watch(self, interval_s: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.sync()
                except Exception:  # noqa: BLE001 - keep watching
                    log.exception("model watcher")

        self._thread = threading.Thread(target=loop, name="uga-model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
