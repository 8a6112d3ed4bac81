"""Build a candidate version: corrections -> fine-tune every member -> export ONNX -> card, staged.

The one place the loop calls the training side (torch, imported lazily: serving never loads it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from service.config import Settings
from service.inference.ensemble import read_card
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


UNSET = ("seed", "retrain")  # FinetuneBudget fields with no setting


def finetune_budget(settings: Settings, seed: int):
    """The runner's fine-tune budget: each field from the setting ``finetune_<field>`` (the experiment's
    retrain arm stays off: it needs the source training bank, which the service does not ship)."""
    from models.finetune import FinetuneBudget

    values = {f.name: getattr(settings, f"finetune_{f.name}") for f in fields(FinetuneBudget) if f.name not in UNSET}
    return FinetuneBudget(**values, seed=seed)


def pairs(corrections_dir: Path, corrections: list[Correction]) -> tuple[list, list]:
    """(images, masks) of stored corrections."""
    loaded = [load_pair(corrections_dir, c.id) for c in corrections]
    return [p[0] for p in loaded], [p[1] for p in loaded]


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
    """Fine-tune every member of ``parent`` on ``train`` plus source replay; export into a staging dir."""
    from models.bank import load_bank
    from models.export import export_ensemble
    from models.finetune import finetune_members, save_members

    parent_dir = registry.path(parent)
    budget = finetune_budget(settings, seed)
    replay = load_bank(settings.baseline_dir / "replay.npz")
    members, ckpt = finetune_members(
        parent_dir / "members.pt",
        pairs(settings.data_dir / "corrections", train),
        replay,
        budget,
        progress=progress,
        device=device,
    )
    parent_card = read_card(parent_dir)
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
