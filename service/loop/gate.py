"""The promotion gate: may a candidate replace the current version?"""

from __future__ import annotations

import numpy as np

from service.config import Settings
from service.inference.ensemble import (
    Ensemble,
    ModelError,
    Predictor,
    check_outputs_finite,
    input_mpp,
    load_ensemble,
    read_card,
)
from service.inference.evaluation import pairs_overlap
from service.loop.candidate import Candidate, pairs
from service.loop.registry import Registry
from service.store import Correction

Pairs = tuple[list[np.ndarray], list[np.ndarray]] | tuple[np.ndarray, np.ndarray]


class GateResult(dict):
    @property
    def passed(self) -> bool:
        return bool(self["passed"])


def gate(
    current: Predictor,
    candidate: Predictor,
    holdout_bank: Pairs,
    heldout_pairs: Pairs,
    *,
    margin: float,
    min_heldout: int,
    baseline: Predictor | None = None,
) -> GateResult:
    """Promotion rule: finite outputs; source-holdout Dice drop <= margin from the current version and,
    when ``current`` is a fine-tune, from the shipped ``baseline`` (drops do not add up over
    promotions; a current version already below that must not drop at all); not worse on held-out
    corrections."""
    images, masks = holdout_bank
    cur_src, cur_ok = pairs_overlap(current, images, masks)
    cand_src, cand_ok = pairs_overlap(candidate, images, masks)
    source = {"current": round(cur_src.dice, 4), "candidate": round(cand_src.dice, 4)}
    base_src = pairs_overlap(baseline, images, masks)[0] if baseline is not None else None
    if base_src is not None:
        source["baseline"] = round(base_src.dice, 4)
    result = GateResult(
        finite=cand_ok, source_holdout_dice=source, margin=margin, heldout_corrections=len(heldout_pairs[0])
    )
    reasons = []
    if not cand_ok:
        reasons.append("candidate outputs are not finite")
    if cand_src.dice < cur_src.dice - margin:
        reasons.append(f"source holdout Dice dropped {cur_src.dice:.3f} -> {cand_src.dice:.3f} (margin {margin})")
    # within the margin of the baseline; a current version already below that may not drop further
    if base_src is not None and cand_src.dice < min(base_src.dice - margin, cur_src.dice):
        reasons.append(
            f"source holdout Dice {cand_src.dice:.3f} is more than {margin} below the baseline's {base_src.dice:.3f}"
        )
    if len(heldout_pairs[0]) >= min_heldout:
        cur_h, _ = pairs_overlap(current, *heldout_pairs)
        cand_h, _ = pairs_overlap(candidate, *heldout_pairs)
        result["heldout_dice"] = {"current": round(cur_h.dice, 4), "candidate": round(cand_h.dice, 4)}
        if cand_h.dice < cur_h.dice:
            reasons.append(f"worse on held-out corrections: {cur_h.dice:.3f} -> {cand_h.dice:.3f}")
    else:
        result["heldout_dice"] = None
        result["heldout_note"] = f"fewer than {min_heldout} held-out corrections: not gated on them yet"
    result["passed"] = not reasons
    result["reasons"] = reasons
    return result


def gate_candidate(
    registry: Registry, settings: Settings, candidate: Candidate, *, parent: str, holdout: list[Correction]
) -> GateResult:
    """Gate the staged candidate against ``parent`` on the frozen source holdout and held-out corrections."""
    from models.bank import load_bank

    threads = settings.finetune_threads
    staged = Ensemble(candidate.staging / "ensemble.onnx", candidate.version, threads=threads)
    try:
        check_outputs_finite(staged)
    except ModelError as exc:  # a model that cannot be served is the gate's "no", kept with its reason
        return GateResult(finite=False, heldout_corrections=len(holdout), passed=False, reasons=[str(exc)])
    current = load_ensemble(registry.path(parent), threads=threads)
    current_card = read_card(registry.path(parent))
    baseline = None
    if read_card(settings.baseline_dir)["version"] != parent:  # a fine-tune's fine-tune: also against the root
        baseline = load_ensemble(settings.baseline_dir, threads=threads)
    return gate(
        current,
        staged,
        load_bank(settings.baseline_dir / "holdout.npz"),
        pairs(settings.data_dir / "corrections", holdout, input_mpp(current_card), settings.max_correction_px),
        margin=settings.gate_margin,
        min_heldout=settings.gate_min_heldout,
        baseline=baseline,
    )
