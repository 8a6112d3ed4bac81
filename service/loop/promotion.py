"""Moving 'current' — by the runner after a passed gate, or by an admin — followed by rescoring."""

from __future__ import annotations

from service.config import Settings
from service.errors import Conflict, NotFound
from service.loop.jobs import enqueue_rescoring
from service.loop.registry import Registry
from service.store import ModelVersion
from service.vocabulary import PointerAction


def promote_candidate(
    registry: Registry, settings: Settings, version: str, *, parent: str, run: str | None = None
) -> str | None:
    """Make a gated candidate current if ``parent`` still is (and mark ``run`` promoted with it).
    Returns None, or why it was not promoted."""
    if not registry.move_pointer(version, action="promote", actor="runner", expect=parent, status="promoted", run=run):
        reason = (
            "the current version changed during the run, another runner ended it, or one of its corrections"
            " was withdrawn; not promoted"
        )
        registry.versions.set_status(version, "rejected", reason, actor="runner")
        return reason
    enqueue_rescoring(registry.store, settings, version, "runner")  # redone at the runner's start if cut short
    return None


def move_current(
    registry: Registry,
    settings: Settings,
    version: str,
    *,
    action: PointerAction,
    actor: str,
    expect: str | None = None,
) -> ModelVersion:
    """Admin promote / rollback to any registered version that has not failed to load (only from
    ``expect`` when given: a pointer that moved meanwhile is a 409, not silently undone)."""
    target = registry.versions.get(version)
    if target is None:
        raise NotFound("model_not_found", f"no model version {version!r}")
    if target.status == "failed":
        raise Conflict("model_failed", f"{version} failed to load before: {target.reason}")
    if not registry.move_pointer(version, action=action, actor=actor, expect=expect):
        now = registry.versions.current()
        if now == version:
            raise Conflict("already_current", f"{version} is already the current version")
        raise Conflict("pointer_moved", f"the current version changed to {now} meanwhile; look again and retry")
    enqueue_rescoring(registry.store, settings, version, actor)
    return registry.versions.get(version)


def rollback(registry: Registry, settings: Settings, *, actor: str, from_version: str | None = None) -> ModelVersion:
    """Move 'current' back to the version it replaced when it was promoted (compare-and-set on the
    current version it was computed from, so a promotion landing meanwhile is not undone by it).
    With ``from_version`` only from that version: a retried request does not roll back twice."""
    current = registry.versions.current()
    if from_version is not None and current != from_version:
        raise Conflict(
            "pointer_moved", f"the current version is {current}, not {from_version}: nothing rolled back; look again"
        )
    target = registry.versions.rollback_target()
    if target is None:
        raise Conflict("nothing_to_roll_back", "the current version has no predecessor")
    return move_current(registry, settings, target, action="rollback", actor=actor, expect=current)
