"""/jobs/{id}/overlays: a finished job's maps as images a viewer lays over the slide."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.http.deps import Base, Rt, Viewer
from service.http.routers.slides import TILE_CACHE
from service.http.schemas import errors
from service.loop.overlays import overlay_index, overlay_png

router = APIRouter(tags=["jobs"])
PNG = {200: {"content": {"image/png": {}}, "description": "an RGBA PNG over the whole slide"}, **errors(409, 410)}


@router.get("/jobs/{job_id}/overlays", responses=errors(409, 410))
def list_overlays(job_id: str, rt: Rt, base: Base, _: Viewer):
    """The job's overlays (predicted tumour outline, each uncertainty heat map): size, µm/px, the slide
    extent they cover in level-0 pixels, legends in words, links."""
    return overlay_index(rt.store, rt.settings, job_id, base)


@router.get("/jobs/{job_id}/overlays/{name}.png", responses=PNG)
def get_overlay(job_id: str, name: str, rt: Rt, _: Viewer):
    data = overlay_png(rt.store, rt.settings, rt.tiles.cache, job_id, name)
    return Response(data, media_type="image/png", headers={"Cache-Control": TILE_CACHE})
