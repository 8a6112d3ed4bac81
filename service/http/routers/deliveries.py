"""/deliveries: the callbacks a job's end sent (or is still sending), and an admin's retry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.http.deps import Admin, Rt, Viewer
from service.http.schemas import DeliveryList, DeliveryView, delivery_view, errors
from service.loop.jobs import get_job
from service.vocabulary import DeliveryState

router = APIRouter(tags=["callbacks"])


@router.get("/jobs/{job_id}/deliveries", response_model=DeliveryList, responses=errors(404))
def job_deliveries(job_id: str, rt: Rt, _: Viewer) -> DeliveryList:
    """The callback events of one job: state, attempts, the receiver's last answer, the body sent."""
    get_job(rt.store, job_id)
    return DeliveryList(deliveries=[delivery_view(d) for d in rt.store.deliveries.for_job(job_id)])


@router.get("/deliveries", response_model=DeliveryList)
def list_deliveries(
    rt: Rt,
    _: Admin,
    state: DeliveryState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeliveryList:
    """Every job's callback events, newest first (``state=failed``: what gave up)."""
    return DeliveryList(deliveries=[delivery_view(d) for d in rt.store.deliveries.list(state, limit)])


@router.post("/deliveries/{delivery_id}/retry", response_model=DeliveryView, responses=errors(404, 409))
def retry_delivery(delivery_id: str, rt: Rt, who: Admin) -> DeliveryView:
    """Send a failed delivery again, with a fresh attempt budget."""
    return delivery_view(rt.store.deliveries.retry(delivery_id, who.name))
