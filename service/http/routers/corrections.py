"""/corrections: ingest a corrected mask (for a queue item or any region), list and fetch them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse

from service.errors import NotFound
from service.http.deps import Annotator, Base, Rt, Viewer
from service.http.routers.queue import png_response
from service.http.schemas import CORRECTION_BODY, Withdrawal, errors
from service.loop.corrections import Region
from service.loop.ingest import check_media_type, ingest_correction, ingest_item_correction
from service.loop.outcome import get_correction, outcome, outcome_mask
from service.loop.withdrawal import withdraw_correction
from service.store import Correction
from service.store.records import as_dict

router = APIRouter(tags=["corrections"])
Coords = Annotated[str, Query(pattern="^(region|level0)$")]
INGEST = {
    "status_code": 201,
    "responses": {200: {"description": "the same correction exists (duplicate: true)"}, **errors(415)},
    "openapi_extra": CORRECTION_BODY,
}


def media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower()


def created_response(record: Correction, created: bool, base: str) -> JSONResponse:
    body = {
        **as_dict(record),
        "duplicate": not created,
        "links": {n: f"{base}/corrections/{record.id}/{n}.png" for n in ("image", "mask")},
    }
    return JSONResponse(
        body, status_code=201 if created else 200, headers={"Location": f"{base}/corrections/{record.id}"}
    )


async def ingest(request: Request, base: str, use_case, *args, **kwargs) -> JSONResponse:
    """Check the media type before the body is read, then run the ingest use case in a thread."""
    kind = media_type(request)
    check_media_type(kind)
    body = await request.body()
    record, created = await run_in_threadpool(use_case, *args, body=body, media_type=kind, **kwargs)
    return created_response(record, created, base)


@router.post("/queue/items/{item_id}/correction", **INGEST)
async def correct_item(item_id: str, request: Request, rt: Rt, base: Base, who: Annotator, coords: Coords = "region"):
    """Corrected mask for a queue patch: PNG (0/255, the patch's size at its µm/px) or GeoJSON polygons
    (in patch pixel coordinates, or level-0 coordinates with coords=level0 as QuPath exports)."""
    return await ingest(
        request, base, ingest_item_correction, rt.store, rt.settings, item_id, coords=coords, annotator=who.name
    )


@router.post("/corrections", **INGEST)
async def correct_region(
    request: Request,
    rt: Rt,
    base: Base,
    who: Annotator,
    slide: str,
    x: int,
    y: int,
    width: Annotated[int, Query(gt=0)],
    height: Annotated[int, Query(gt=0)],
    mpp: Annotated[float, Query(ge=0.25, le=16)] = 1.0,
    coords: Coords = "region",
):
    """Corrected mask for any region (x, y, width, height in level-0 pixels; mask at ``mpp``)."""
    return await ingest(
        request,
        base,
        ingest_correction,
        rt.store,
        rt.settings,
        slide=slide,
        region=Region(x, y, width, height, mpp),
        coords=coords,
        annotator=who.name,
        proposed_by=rt.models.current().version,
    )


@router.get("/corrections")
def list_corrections(rt: Rt, _: Viewer, limit: Annotated[int, Query(ge=1, le=5000)] = 500):
    return {"corrections": [as_dict(c) for c in rt.store.corrections.list(limit)]}


@router.get("/corrections/{cid}")
def get_correction_view(cid: str, rt: Rt, _: Viewer):
    return as_dict(get_correction(rt.store, cid))


@router.get("/corrections/{cid}/outcome", responses=errors(404))
def correction_outcome(cid: str, rt: Rt, base: Base, _: Viewer):
    """Dice of the model's mask against the correction: the proposing model's (before) and, once a
    promoted model has re-segmented the slide, the newest (after); links to both masks."""
    body = outcome(rt.store, rt.settings, cid)
    body["links"] = {n: f"{base}/corrections/{cid}/{n}.png" for n in ("image", "mask", "before", "after")}
    return body


@router.post("/corrections/{cid}/withdraw", responses=errors(403, 404))
def withdraw(cid: str, body: Withdrawal, rt: Rt, who: Annotator):
    """Withdraw a correction (its annotator, or an admin): kept for the record, never trained on or
    gated with again; its queue patch returns to the queue. Sending the same mask again reinstates it."""
    return withdraw_correction(rt.store, cid, actor=who.name, is_admin=who.allows("admin"), reason=body.reason)


PNG = {200: {"content": {"image/png": {}}, "description": "PNG"}, **errors(410)}


@router.get("/corrections/{cid}/{name}.png", responses=PNG)
def correction_file(cid: str, name: str, rt: Rt, _: Viewer):
    """image.png and mask.png as stored; before.png / after.png: the model's mask then and now (0/255)."""
    if name in ("before", "after"):  # looks the correction up itself
        return png_response(outcome_mask(rt.store, rt.settings, cid, name))
    get_correction(rt.store, cid)
    if name not in ("image", "mask"):
        raise NotFound("not_found", "use image.png, mask.png, before.png or after.png")
    return FileResponse(rt.settings.data_dir / "corrections" / cid / f"{name}.png", media_type="image/png")


UPLOADS = (correct_item, correct_region)  # the routes whose body is a mask: their own body limits
