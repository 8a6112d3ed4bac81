"""/models: versions, the current one, admin promote and rollback."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.http.deps import Admin, Rt, Viewer
from service.http.schemas import ModelList, ModelView, errors, model_view
from service.loop.promotion import move_current, rollback

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList)
def list_models(rt: Rt, _: Viewer) -> ModelList:
    current = rt.store.models.current()
    return ModelList(
        current=current,
        served_by_this_worker=rt.models.version,
        models=[model_view(v, current) for v in rt.store.models.list()],
        history=rt.store.models.pointer_history(20),
    )


@router.get("/models/current", response_model=ModelView)
def current_model(rt: Rt, _: Viewer) -> ModelView:
    current = rt.store.models.current()
    return model_view(rt.store.models.get(current), current, served=rt.models.version)


@router.post("/models/{version}/promote", response_model=ModelView, responses=errors(409))
def promote(version: str, rt: Rt, who: Admin) -> ModelView:
    """Make ``version`` current (any registered version, including a rejected candidate)."""
    return model_view(move_current(rt.registry, rt.settings, version, action="manual-promote", actor=who.name), version)


@router.post("/models/rollback", response_model=ModelView, responses=errors(409))
def rollback_model(
    rt: Rt,
    who: Admin,
    from_version: Annotated[str | None, Query(alias="from", max_length=128)] = None,
) -> ModelView:
    """Move the pointer back to the version the current one replaced (``?from=``: only from that one)."""
    target = rollback(rt.registry, rt.settings, actor=who.name, from_version=from_version)
    return model_view(target, target.version)
