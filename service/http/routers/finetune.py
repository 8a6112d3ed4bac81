"""/finetune: ask the runner for a run now, follow runs."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.errors import NotFound
from service.http.deps import Admin, Rt, Viewer
from service.http.schemas import run_view
from service.store.records import as_dict

router = APIRouter(tags=["finetune"])


@router.post("/finetune", status_code=202, responses={200: {"description": "a run is already requested or running"}})
def request_finetune(rt: Rt, who: Admin, response: Response):
    """Ask the runner for a fine-tune run now (whatever the number of new corrections)."""
    run, created = rt.store.runs.request("admin", who.name)
    if not created:
        response.status_code = 200
    return {**as_dict(run), "existing": not created}


@router.get("/finetune/runs")
def list_runs(rt: Rt, _: Viewer):
    return {"runs": [run_view(r) for r in rt.store.runs.list(100)]}


@router.get("/finetune/runs/{run_id}")
def get_run(run_id: str, rt: Rt, _: Viewer):
    run = rt.store.runs.get(run_id)
    if run is None:
        raise NotFound("run_not_found", f"no fine-tune run {run_id!r}")
    return run_view(run)
