"""/queue: the ranked review patches, their images and predicted masks, skipping one."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Response
from PIL import Image

from service.http.deps import Annotator, Base, Rt, Viewer
from service.http.schemas import QueueItemView, QueueView, errors, item_view
from service.loop.overlays import item_uncertainty_png
from service.loop.review import claim_item, get_item, item_image, item_mask, pending_queue, release_item, skip_item
from service.vocabulary import Measure

router = APIRouter(tags=["queue"])


def png_response(array: np.ndarray) -> Response:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


@router.get("/queue", response_model=QueueView)
def get_queue(
    rt: Rt,
    base: Base,
    who: Viewer,
    slide: str | None = None,
    k: Annotated[int, Query(ge=1, le=500)] = 10,
    measure: Measure | None = None,
) -> QueueView:
    """Pending review patches in the selection's order: for one slide, or, when slide is omitted, pooled
    across slides in turn (every slide's rank 1, then rank 2, …); for an annotator, without the patches
    another reviewer has open (claimed)."""
    reviewer = who.name if who.allows("annotator") else None  # a viewer takes none: sees them all
    items = pending_queue(rt.store, slide, k, measure, rt.settings, reviewer=reviewer)
    return QueueView(slide=slide, items=[item_view(i, base) for i in items])


@router.get("/queue/items/{item_id}", response_model=QueueItemView)
def get_queue_item(item_id: str, rt: Rt, base: Base, _: Viewer) -> QueueItemView:
    return item_view(get_item(rt.store, item_id), base)


PNG = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}


@router.get("/queue/items/{item_id}/image.png", responses=PNG)
def queue_item_image(item_id: str, rt: Rt, _: Viewer):
    """The patch as the model saw it (RGB at the job's µm/px)."""
    return png_response(item_image(rt.store, rt.settings, item_id))


@router.get("/queue/items/{item_id}/mask.png", responses={**PNG, **errors(410)})
def queue_item_mask(item_id: str, rt: Rt, _: Viewer):
    """The model's predicted tumour mask for the patch (0/255, same size as image.png)."""
    return png_response(item_mask(rt.store, item_id))


@router.get("/queue/items/{item_id}/uncertainty.png", responses={**PNG, **errors(410)})
def queue_item_uncertainty(item_id: str, rt: Rt, _: Viewer, measure: str | None = None):
    """The patch's uncertainty as a translucent heat map (RGBA, same size as image.png); default: the
    measure that ranked it. Colours and their meaning: the job's overlay legends."""
    return Response(item_uncertainty_png(rt.store, item_id, measure), media_type="image/png")


@router.post("/queue/items/{item_id}/skip", response_model=QueueItemView, responses=errors(409))
def skip_queue_item(item_id: str, rt: Rt, base: Base, who: Annotator) -> QueueItemView:
    """Take the patch out of the queue without a correction."""
    return item_view(skip_item(rt.store, item_id, who.name), base)


@router.post("/queue/items/{item_id}/claim", responses=errors(409))
def claim_queue_item(item_id: str, rt: Rt, who: Annotator) -> dict:
    """Hold the patch while you review it (UGA_REVIEW_CLAIM_S; claim again to renew; one patch at a
    time: claiming lets go of the one you held): other reviewers' queues leave it out and their
    decisions on it are refused (409 claimed_by_another)."""
    return claim_item(rt.store, rt.settings, item_id, who.name)


@router.delete("/queue/items/{item_id}/claim", status_code=204)
def release_queue_item(item_id: str, rt: Rt, who: Annotator) -> Response:
    """Let go of your hold on the patch; an admin lets go of anyone's (a reviewer who walked away)."""
    release_item(rt.store, item_id, who.name, anyones=who.allows("admin"))
    return Response(status_code=204)
