"""What every router needs from a request: the process's runtime, the caller, the base URL."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.http.auth import AuthFailure, Principal
from service.http.errors import HttpError
from service.http.runtime import Runtime


def runtime(request: Request) -> Runtime:
    rt = getattr(request.app.state, "uga", None)
    if rt is None:
        raise HttpError(503, "not_ready", "service is starting; retry shortly")
    return rt


def require(role: str):
    def dependency(request: Request) -> Principal:
        try:
            principal = runtime(request).auth.authenticate(request.headers.get("authorization"))
        except AuthFailure as exc:  # a refused JWT (401), no mapped role (403), keys unreachable (503)
            raise HttpError(exc.status, exc.code, exc.message) from None
        if principal is None:
            raise HttpError(401, "unauthenticated", "missing or unknown bearer token (Authorization: Bearer <token>)")
        if not principal.allows(role):
            raise HttpError(403, "forbidden", f"this action needs the {role} role; your token has {principal.role}")
        return principal

    return dependency


def base_url(request: Request) -> str:
    """Where the API is mounted (``/v1``), for links in responses."""
    return request.scope.get("root_path", "") or "/v1"


Rt = Annotated[Runtime, Depends(runtime)]
Base = Annotated[str, Depends(base_url)]
Viewer = Annotated[Principal, Depends(require("viewer"))]
Annotator = Annotated[Principal, Depends(require("annotator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
