"""The REST surface (FastAPI app mounted under /v1 by the BentoML service). Translation only:
validation, auth, status codes, JSON errors; the work happens in store / jobs / registry / slides.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.http.auth import Principal
from service.http.runtime import Runtime
from service.http.schemas import ErrorBody, JobList, JobSubmit, JobView, ModelList, ModelView, QueueItemView, QueueView
from service.inference.outputs import ARTIFACTS
from service.loop.corrections import (
    CorrectionError,
    Region,
    build_record,
    check_region,
    correction_id,
    decode_png_mask,
    rasterize_geojson,
    read_crop,
    write_correction_files,
)
from service.loop.jobs import enqueue_rescoring, job_key
from service.wsi.slide import RegionReader, SlideError, SlidePathError, open_slide, resolve_slide_path

MEDIA = {".tif": "image/tiff", ".png": "image/png", ".geojson": "application/geo+json", ".json": "application/json"}
ERRORS = {400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details=None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def error_response(status: int, code: str, message: str, details=None, headers=None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse bodies above ``limit`` bytes with 413 before the route reads them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = error_response(
            413, "body_too_large", f"request body exceeds {self.limit} bytes (UGA_MAX_BODY_MB)", {"limit": self.limit}
        )
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _TooLarge:
            return await too_big(scope, receive, send)


class _TooLarge(Exception):
    pass


def rt(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "uga", None)
    if runtime is None:
        raise ApiError(503, "not_ready", "service is starting; retry shortly")
    return runtime


def require(role: str):
    def dependency(request: Request) -> Principal:
        runtime = rt(request)
        principal = runtime.auth.authenticate(request.headers.get("authorization"))
        if principal is None:
            raise ApiError(401, "unauthenticated", "missing or unknown bearer token (Authorization: Bearer <token>)")
        if not principal.allows(role):
            raise ApiError(403, "forbidden", f"this action needs the {role} role; your token has {principal.role}")
        return principal

    return dependency


Viewer = Annotated[Principal, Depends(require("viewer"))]
Annotator = Annotated[Principal, Depends(require("annotator"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def _run_view(run: dict) -> dict:
    done, total = run["progress_done"], run["progress_total"]
    return {**run, "progress": {"done": done, "total": total, "fraction": round(done / total, 4) if total else 0.0}}


def _job_view(job: dict, base: str, deduplicated: bool = False) -> JobView:
    done, total = job["progress_done"], job["progress_total"]
    artifacts = {}
    if job["state"] == "succeeded":
        artifacts = {name: f"{base}/jobs/{job['id']}/artifacts/{name}" for name in ARTIFACTS}
    return JobView(
        id=job["id"],
        slide=job["slide"],
        state=job["state"],
        progress={"done": done, "total": total, "fraction": round(done / total, 4) if total else 0.0},
        options=job["options"],
        model_version=job["model_version"],
        created_at=job["created_at"],
        started_at=job["started_at"],
        finished_at=job["finished_at"],
        error=job["error"],
        summary=job["summary"],
        artifacts=artifacts,
        deduplicated=deduplicated,
    )


def _item_view(item: dict, base: str) -> QueueItemView:
    links = {
        "self": f"{base}/queue/items/{item['id']}",
        "image": f"{base}/queue/items/{item['id']}/image.png",
        "mask": f"{base}/queue/items/{item['id']}/mask.png",
        "skip": f"{base}/queue/items/{item['id']}/skip",
    }
    return QueueItemView(**{**item, "links": links})


def _resolve(runtime: Runtime, slide: str) -> Path:
    try:
        return resolve_slide_path(runtime.settings.slide_root, slide)
    except SlidePathError as exc:
        raise ApiError(400, "invalid_slide_path", str(exc)) from None
    except SlideError as exc:
        raise ApiError(404, "slide_not_found", str(exc)) from None


def _png(array: np.ndarray) -> Response:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


def create_app(max_body_bytes: int) -> FastAPI:
    app = FastAPI(
        title="UGA Serve",
        version="0.1.0",
        description="Uncertainty-guided annotation for whole-slide segmentation",
        responses=ERRORS,
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "request body is not valid JSON", None)
        details = [{"loc": list(e.get("loc", [])), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
        return error_response(422, "invalid_request", "request does not match the schema", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None)

    def base(request: Request) -> str:
        return request.scope.get("root_path", "") or "/v1"

    # -- jobs ---------------------------------------------------------------------------
    @app.post("/jobs", status_code=202, response_model=JobView, tags=["jobs"])
    def submit_job(body: JobSubmit, request: Request, who: Annotator, response: Response) -> JobView:
        """Submit a slide (path relative to the slide root) for asynchronous segmentation."""
        runtime = rt(request)
        path = _resolve(runtime, body.slide)
        options = body.options.model_dump()
        try:
            open_slide(path, options.get("slide_mpp")).close()
        except SlideError as exc:
            raise ApiError(422, "unusable_slide", str(exc)) from None
        rel = path.relative_to(runtime.settings.slide_root.resolve()).as_posix()
        version = runtime.models.current().version
        key = job_key(runtime.settings, path, rel, options, version)
        job, created = runtime.store.submit_job(
            slide=rel, options=options, model_version=version, dedup_key=key, actor=who.name
        )
        response.headers["Location"] = f"{base(request)}/jobs/{job['id']}"
        if not created:
            response.status_code = 200
        return _job_view(job, base(request), deduplicated=not created)

    @app.get("/jobs", response_model=JobList, tags=["jobs"])
    def list_jobs(
        request: Request, _: Viewer, state: str | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50
    ) -> JobList:
        if state is not None and state not in ("queued", "running", "succeeded", "failed"):
            raise ApiError(400, "invalid_state", f"unknown state {state!r}")
        return JobList(jobs=[_job_view(j, base(request)) for j in rt(request).store.list_jobs(state, limit)])

    def _job(request: Request, job_id: str) -> dict:
        job = rt(request).store.get_job(job_id)
        if job is None:
            raise ApiError(404, "job_not_found", f"no job {job_id!r}")
        return job

    @app.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"])
    def get_job(job_id: str, request: Request, _: Viewer) -> JobView:
        """State, progress (tiles done / total), and when finished the summary and artifact links."""
        return _job_view(_job(request, job_id), base(request))

    @app.get("/jobs/{job_id}/artifacts/{name}", tags=["jobs"])
    def get_artifact(job_id: str, name: str, request: Request, _: Viewer):
        job = _job(request, job_id)
        if name not in ARTIFACTS:
            raise ApiError(404, "artifact_not_found", f"unknown artifact {name!r}", {"known": list(ARTIFACTS)})
        if job["state"] != "succeeded":
            raise ApiError(409, "job_not_finished", f"job is {job['state']}; artifacts exist once it succeeded")
        path = rt(request).store.job_dir(job_id) / ARTIFACTS[name]
        if not path.exists():
            raise ApiError(404, "artifact_missing", f"{ARTIFACTS[name]} is missing from the job directory")
        return FileResponse(
            path, media_type=MEDIA.get(path.suffix, "application/octet-stream"), filename=f"{job_id}-{path.name}"
        )

    # -- queue --------------------------------------------------------------------------
    @app.get("/queue", response_model=QueueView, tags=["queue"])
    def get_queue(
        request: Request,
        _: Viewer,
        slide: str | None = None,
        k: Annotated[int, Query(ge=1, le=500)] = 10,
        measure: str | None = None,
    ) -> QueueView:
        """Pending review patches, best first: for one slide, or pooled across slides when slide is omitted."""
        runtime = rt(request)
        if slide is not None and runtime.store.latest_job_for_slide(slide) is None:
            raise ApiError(404, "slide_not_segmented", f"no finished segmentation of {slide!r}; submit a job first")
        items = runtime.store.pending_queue(slide, k, measure)
        return QueueView(slide=slide, items=[_item_view({**i, "status": "pending"}, base(request)) for i in items])

    def _item(request: Request, item_id: str) -> dict:
        item = rt(request).store.queue_item(item_id)
        if item is None:
            raise ApiError(404, "queue_item_not_found", f"no queue item {item_id!r}")
        return item

    @app.get("/queue/items/{item_id}", response_model=QueueItemView, tags=["queue"])
    def get_item(item_id: str, request: Request, _: Viewer) -> QueueItemView:
        return _item_view(_item(request, item_id), base(request))

    def _item_region(runtime: Runtime, item: dict) -> tuple[int, int, int, float]:
        job = runtime.store.get_job(item["job_id"])
        mpp = job["summary"]["mpp"]
        f = mpp / job["summary"]["slide_mpp"]
        b = item["bbox_level0"]
        return math.floor(b["y"] / f), math.floor(b["x"] / f), max(1, round(b["width"] / f)), mpp

    @app.get("/queue/items/{item_id}/image.png", tags=["queue"])
    def item_image(item_id: str, request: Request, _: Viewer):
        """The patch as the model saw it (RGB at the job's µm/px)."""
        runtime = rt(request)
        item = _item(request, item_id)
        y, x, size, mpp = _item_region(runtime, item)
        slide = open_slide(
            _resolve(runtime, item["slide"]), runtime.store.get_job(item["job_id"])["options"].get("slide_mpp")
        )
        try:
            return _png(RegionReader(slide, mpp).read(y, x, size, size))
        finally:
            slide.close()

    @app.get("/queue/items/{item_id}/mask.png", tags=["queue"])
    def item_mask(item_id: str, request: Request, _: Viewer):
        """The model's predicted tumour mask for the patch (0/255, same size as image.png)."""
        runtime = rt(request)
        item = _item(request, item_id)
        y, x, size, mpp = _item_region(runtime, item)
        mask = open_slide(runtime.store.job_dir(item["job_id"]) / ARTIFACTS["mask"])
        try:
            return _png(np.where(RegionReader(mask, mpp).read(y, x, size, size)[..., 0] > 127, 255, 0).astype(np.uint8))
        finally:
            mask.close()

    @app.post("/queue/items/{item_id}/skip", response_model=QueueItemView, tags=["queue"])
    def skip_item(item_id: str, request: Request, who: Annotator) -> QueueItemView:
        """Take the patch out of the queue without a correction."""
        runtime = rt(request)
        item = _item(request, item_id)
        if item["status"] == "corrected":
            raise ApiError(409, "already_corrected", "this patch already has a correction; it cannot be skipped")
        runtime.store.set_item_status(item["slide"], item_id, "skipped", who.name)
        return _item_view(_item(request, item_id), base(request))

    # -- corrections --------------------------------------------------------------------------
    async def _ingest(
        request: Request, who: Principal, slide: str, region: Region, *, item: dict | None, coords: str
    ) -> JSONResponse:
        runtime = rt(request)
        body = await request.body()
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype not in ("image/png", "application/geo+json", "application/json"):
            raise ApiError(
                415, "unsupported_media_type", "send the mask as image/png or GeoJSON polygons as application/geo+json"
            )
        path = _resolve(runtime, slide)
        slide = path.relative_to(runtime.settings.slide_root.resolve()).as_posix()  # one name per slide file
        proposed = item["model_version"] if item else runtime.models.current().version

        def work() -> tuple[dict, bool]:
            handle = open_slide(path)
            try:
                check_region(region, handle.dimensions)
                shape = region.mask_shape(handle.mpp)
                if ctype == "image/png":
                    mask = decode_png_mask(body, shape)
                else:
                    f = region.mpp / handle.mpp
                    origin, scale = ((region.x, region.y), 1 / f) if coords == "level0" else ((0, 0), 1.0)
                    mask = rasterize_geojson(body, shape, origin, scale)
                cid = correction_id(slide, region, mask)
                existing = runtime.store.correction(cid)
                if existing is not None:
                    return existing, False
                image = read_crop(handle, region, shape)
            finally:
                handle.close()
            write_correction_files(runtime.settings.data_dir / "corrections", cid, image, mask)
            record = build_record(
                cid,
                slide,
                region,
                mask,
                annotator=who.name,
                queue_item_id=item["id"] if item else None,
                proposed_by=proposed,
                holdout_every=runtime.settings.holdout_every,
            )
            created = runtime.store.add_correction(record, who.name)
            return (record if created else runtime.store.correction(cid)), created

        try:
            record, created = await run_in_threadpool(work)
        except CorrectionError as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.details) from None
        except SlideError as exc:
            raise ApiError(422, "unusable_slide", str(exc)) from None
        body_out = {
            **record,
            "duplicate": not created,
            "links": {n: f"{base(request)}/corrections/{record['id']}/{n}.png" for n in ("image", "mask")},
        }
        return JSONResponse(
            body_out,
            status_code=201 if created else 200,
            headers={"Location": f"{base(request)}/corrections/{record['id']}"},
        )

    @app.post("/queue/items/{item_id}/correction", status_code=201, tags=["corrections"])
    async def correct_item(
        item_id: str,
        request: Request,
        who: Annotator,
        coords: Annotated[str, Query(pattern="^(region|level0)$")] = "region",
    ):
        """Corrected mask for a queue patch: PNG (0/255, the patch's size at its µm/px) or GeoJSON polygons
        (in patch pixel coordinates, or level-0 coordinates with coords=level0 as QuPath exports)."""
        item = await run_in_threadpool(_item, request, item_id)
        runtime = rt(request)
        job = runtime.store.get_job(item["job_id"])
        b = item["bbox_level0"]
        region = Region(b["x"], b["y"], b["width"], b["height"], job["summary"]["mpp"])
        return await _ingest(request, who, item["slide"], region, item=item, coords=coords)

    @app.post("/corrections", status_code=201, tags=["corrections"])
    async def correct_region(
        request: Request,
        who: Annotator,
        slide: str,
        x: int,
        y: int,
        width: Annotated[int, Query(gt=0)],
        height: Annotated[int, Query(gt=0)],
        mpp: Annotated[float, Query(ge=0.25, le=16)] = 1.0,
        coords: Annotated[str, Query(pattern="^(region|level0)$")] = "region",
    ):
        """Corrected mask for any region (x, y, width, height in level-0 pixels; mask at ``mpp``)."""
        return await _ingest(request, who, slide, Region(x, y, width, height, mpp), item=None, coords=coords)

    @app.get("/corrections", tags=["corrections"])
    def list_corrections(request: Request, _: Viewer, limit: Annotated[int, Query(ge=1, le=5000)] = 500):
        return {"corrections": rt(request).store.list_corrections(limit)}

    def _correction(request: Request, cid: str) -> dict:
        rec = rt(request).store.correction(cid)
        if rec is None:
            raise ApiError(404, "correction_not_found", f"no correction {cid!r}")
        return rec

    @app.get("/corrections/{cid}", tags=["corrections"])
    def get_correction(cid: str, request: Request, _: Viewer):
        return _correction(request, cid)

    @app.get("/corrections/{cid}/{name}.png", tags=["corrections"])
    def correction_file(cid: str, name: str, request: Request, _: Viewer):
        _correction(request, cid)
        if name not in ("image", "mask"):
            raise ApiError(404, "not_found", "use image.png or mask.png")
        return FileResponse(rt(request).settings.data_dir / "corrections" / cid / f"{name}.png", media_type="image/png")

    # -- fine-tuning --------------------------------------------------------------------------
    @app.post("/finetune", status_code=202, tags=["finetune"])
    def request_finetune(request: Request, who: Admin, response: Response):
        """Ask the runner for a fine-tune run now (whatever the number of new corrections)."""
        run, created = rt(request).store.request_run("admin", who.name)
        if not created:
            response.status_code = 200
        return {**run, "existing": not created}

    @app.get("/finetune/runs", tags=["finetune"])
    def list_runs(request: Request, _: Viewer):
        return {"runs": [_run_view(r) for r in rt(request).store.runs(100)]}

    @app.get("/finetune/runs/{run_id}", tags=["finetune"])
    def get_run(run_id: str, request: Request, _: Viewer):
        run = rt(request).store.run(run_id)
        if run is None:
            raise ApiError(404, "run_not_found", f"no fine-tune run {run_id!r}")
        return _run_view(run)

    # -- models -------------------------------------------------------------------------------
    def _model_view(v: dict, current: str) -> ModelView:
        return ModelView(
            version=v["version"],
            current=v["version"] == current,
            status=v["status"],
            reason=v.get("reason"),
            parent=v.get("parent"),
            created_at=v["created_at"],
            metrics=v.get("metrics") or {},
            corrections=v.get("corrections") or {},
        )

    @app.get("/models", response_model=ModelList, tags=["models"])
    def list_models(request: Request, _: Viewer) -> ModelList:
        runtime = rt(request)
        current = runtime.store.current_version()
        return ModelList(
            current=current,
            served_by_this_worker=runtime.models.version,
            models=[_model_view(v, current) for v in runtime.store.versions()],
            history=runtime.store.pointer_history(20),
        )

    @app.get("/models/current", response_model=ModelView, tags=["models"])
    def current_model(request: Request, _: Viewer) -> ModelView:
        runtime = rt(request)
        current = runtime.store.current_version()
        view = _model_view(runtime.store.version(current), current)
        view.served_by_this_worker = runtime.models.version
        return view

    def _move(request: Request, who: Principal, version: str, action: str) -> ModelView:
        runtime = rt(request)
        target = runtime.store.version(version)
        if target is None:
            raise ApiError(404, "model_not_found", f"no model version {version!r}")
        if target["status"] == "failed":
            raise ApiError(409, "model_failed", f"{version} failed to load before: {target['reason']}")
        if not runtime.store.move_pointer(version, action=action, actor=who.name):
            raise ApiError(409, "already_current", f"{version} is already the current version")
        enqueue_rescoring(runtime.store, runtime.settings, version, who.name)
        return _model_view(runtime.store.version(version), version)

    @app.post("/models/{version}/promote", response_model=ModelView, tags=["models"])
    def promote(version: str, request: Request, who: Admin) -> ModelView:
        """Make ``version`` current (any registered version, including a rejected candidate)."""
        return _move(request, who, version, "manual-promote")

    @app.post("/models/rollback", response_model=ModelView, tags=["models"])
    def rollback(request: Request, who: Admin) -> ModelView:
        """Move the pointer back to the version that was current before this one."""
        target = rt(request).store.rollback_target()
        if target is None:
            raise ApiError(409, "nothing_to_roll_back", "the current version has no predecessor")
        return _move(request, who, target, "rollback")

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    def unknown_route(path: str):
        raise ApiError(404, "not_found", f"no such endpoint /v1/{path}; see /v1/docs")

    return app
