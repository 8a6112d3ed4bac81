"""/health: why this worker is or is not ready (BentoML's /livez and /readyz carry no reasons)."""

from __future__ import annotations

from fastapi import APIRouter

from service.http.deps import Rt, Viewer

router = APIRouter(tags=["health"])


@router.get("/health")
def health(rt: Rt, _: Viewer) -> dict:
    """Readiness with its checks (model loaded, store writable, free disk) and the model served."""
    return rt.health()
