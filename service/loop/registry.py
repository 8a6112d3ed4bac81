"""The registry owns model versions: names, cards, immutable committed directories, the pointer.

A version directory (ensemble.onnx, members.pt, card.json) is built in a staging directory, every
file fsynced, then renamed into ``<data>/models/<version>/`` and the parent fsynced; only then is it
registered. Nothing is written into a committed directory again. 'current' moves by compare-and-set.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from service.fsutil import atomic_write_json, durable_dir, fsync_dir, quarantine
from service.inference.ensemble import ModelError, read_card
from service.store import ModelVersion, Store
from service.vocabulary import PointerAction


def finetuned_card(parent_card: dict, *, version: str, sha256: str, parent: str, finetune: dict) -> dict:
    """The card of a version fine-tuned from ``parent`` (the parent's recipe and metrics carried over)."""
    return {
        **parent_card,
        "name": "uga-finetuned",
        "version": version,
        "sha256": sha256,
        "parent": parent,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "finetune": finetune,
    }


class Registry:
    """Versions live in ``<data>/models/<version>/`` (the shipped baseline stays where it is)."""

    def __init__(self, store: Store, data_dir: Path, baseline_dir: Path):
        self.store, self.baseline_dir = store, Path(baseline_dir)
        self.models_dir = Path(data_dir) / "models"
        durable_dir(self.models_dir)

    @property
    def versions(self):
        return self.store.models

    def ensure_baseline(self) -> str:
        """Register the shipped baseline once and point 'current' at it if nothing is current yet."""
        card = read_card(self.baseline_dir)
        if self.versions.get(card["version"]) is None:
            self.versions.register(
                ModelVersion(
                    version=card["version"],
                    sha256=card["sha256"],
                    path=str(self.baseline_dir),
                    status="baseline",
                    created_at=time.time(),
                    metrics=card.get("metrics", {}),
                )
            )
        if self.versions.current() is None:
            self.versions.move_pointer(card["version"], action="init", actor="system")
        return card["version"]

    def path(self, version: str) -> Path:
        row = self.versions.get(version)
        if row is None:
            raise ModelError(f"unknown model version {version!r}")
        return Path(row.path)

    @staticmethod
    def version_name(sha256: str) -> str:
        return f"ft-{datetime.now(UTC):%Y%m%d%H%M%S}-{sha256[:8]}"

    def stage(self) -> Path:
        """A fresh staging directory for a version being built (swept if never committed)."""
        staging = self.models_dir / f".staging-{time.time_ns()}"
        staging.mkdir(parents=True)
        return staging

    def commit(
        self,
        staging: Path,
        card: dict,
        *,
        status: str,
        reason: str | None,
        metrics: dict,
        corrections: dict,
        actor: str,
    ) -> ModelVersion:
        """Write the card, make every file durable, rename into place, then register (immutable from here)."""
        atomic_write_json(staging / "card.json", card)
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staging)
        final = self.models_dir / card["version"]
        staging.rename(final)
        fsync_dir(self.models_dir)
        version = ModelVersion(
            version=card["version"],
            parent=card.get("parent"),
            sha256=card["sha256"],
            path=str(final),
            status=status,
            reason=reason,
            metrics=metrics,
            corrections=corrections,
            created_at=time.time(),
        )
        self.versions.register(version, actor=actor)
        return version

    def commit_gated(self, staging: Path, card: dict, gate: dict, corrections: dict) -> tuple[ModelVersion, str | None]:
        """Commit a gated candidate with the gate's result in its card: 'candidate' when it passed (until
        the pointer has moved to it), 'rejected' with the gate's reasons otherwise."""
        reason = None if gate["passed"] else "; ".join(gate["reasons"])
        card = {**card, "metrics": {**card.get("metrics", {}), "gate": dict(gate)}}
        status = "candidate" if gate["passed"] else "rejected"
        version = self.commit(
            staging, card, status=status, reason=reason, metrics=dict(gate), corrections=corrections, actor="runner"
        )
        return version, reason

    def move_pointer(
        self,
        version: str,
        *,
        action: PointerAction,
        actor: str | None,
        expect: str | None = None,
        status: str | None = None,
        run: str | None = None,
    ) -> bool:
        """Compare-and-set of 'current': moves only if it still is ``expect`` (when given); ``status``
        and the promoting ``run``'s outcome are set in the same transaction."""
        return self.versions.move_pointer(version, action=action, actor=actor, expect=expect, status=status, run=run)

    def discard_staging(self) -> list[str]:
        """Remove staging directories: versions never committed (a failed or crashed run; one runner
        builds at a time, it holds the lease)."""
        removed = []
        for d in self.models_dir.glob(".staging-*"):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
        return removed

    def sweep(self, older_than_s: float = 600.0) -> list[str]:
        """Remove staging directories (crashed runs), and move version directories that the store does
        not know to ``orphans/models`` (a crash before register, or a store that is not this one's).
        A version directory younger than ``older_than_s`` stays: a runner that lost its lease a moment
        ago may be between renaming it into place and registering it."""
        removed = self.discard_staging()
        for d in self.models_dir.iterdir():
            if d.name.startswith(".staging-"):
                continue
            if time.time() - d.stat().st_mtime < older_than_s:
                continue
            if self.versions.get(d.name) is None:
                quarantine(d, self.models_dir.parent, "models")
                removed.append(d.name)
        return removed
