"""Withdraw a correction: kept for the record, never trained on or gated with again."""

from __future__ import annotations

from service.errors import NotAllowed
from service.loop.outcome import get_correction
from service.store import Store
from service.store.corrections import used_ids
from service.store.records import as_dict


def withdraw_correction(store: Store, cid: str, *, actor: str, is_admin: bool, reason: str) -> dict:
    """Withdraw ``cid`` (its annotator or an admin) and say what it already reached: the versions
    fine-tuned on it, whether the current model learned it, and a run training on it now (whose
    candidate will not be promoted). Withdrawing a withdrawn correction changes nothing."""
    c = get_correction(store, cid)
    if c.annotator != actor and not is_admin:
        why = f"correction {cid} was drawn by {c.annotator!r}; only they or an admin may withdraw it"
        raise NotAllowed("not_your_correction", why)
    record = store.corrections.withdraw(cid, actor, reason)
    current = store.models.current()
    learned = cid in store.corrections.trained_into(current)
    running = [r.id for r in store.runs.list(20) if r.state == "running" and cid in used_ids(r.corrections)]
    notes = []
    if learned:
        notes.append(
            f"the current model ({current}) learned from it: a withdrawal does not unlearn; roll back to a version"
            " before it (POST /v1/models/rollback) if its effect must go"
        )
    if running:
        notes.append(f"fine-tune run {running[0]} is training on it: that run's candidate will not be promoted")
    return {
        **as_dict(record),
        "learned_by": store.corrections.learned_by(cid),
        "current_model_learned_it": learned,
        "training_runs": running,
        "notes": notes,
    }
