"""/me: who the caller is and what their role allows (the review page shows only what it may do)."""

from __future__ import annotations

from fastapi import APIRouter

from service.http.deps import Viewer

router = APIRouter(tags=["auth"])


@router.get("/me")
def whoami(who: Viewer):
    return {
        "name": who.name,
        "role": who.role,
        "can_correct": who.allows("annotator"),
        "can_administer": who.allows("admin"),
    }
