"""Errors over HTTP, in one place: domain error kinds -> status, the JSON envelope, the body limit,
and the boundary that turns an unexpected exception (a bug) into a logged 500 with a JSON body."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass
from urllib.parse import unquote_plus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.errors import (
    Conflict,
    DomainError,
    Gone,
    InvalidInput,
    NotAllowed,
    NotFound,
    TooBusy,
    Unavailable,
    Unprocessable,
    UnsupportedMedia,
)

log = logging.getLogger("uga.http")

STATUS: dict[type[DomainError], int] = {
    InvalidInput: 400,
    NotAllowed: 403,
    NotFound: 404,
    Conflict: 409,
    Gone: 410,
    UnsupportedMedia: 415,
    Unprocessable: 422,
    TooBusy: 429,
    Unavailable: 503,
}


def status_of(exc: DomainError) -> int:
    """The status of the first error kind in the exception's class hierarchy."""
    return next((STATUS[k] for k in type(exc).__mro__ if k in STATUS), 400)


def error_response(status: int, code: str, message: str, details=None, headers=None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status, headers=headers)


class HttpError(DomainError):
    """A refusal that exists only over HTTP (authentication, authorisation, not ready)."""

    def __init__(self, status: int, code: str, message: str, details=None):
        super().__init__(code, message, details)
        self.status = status


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError):
        status = exc.status if isinstance(exc, HttpError) else status_of(exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, TooBusy) else None
        return error_response(status, exc.code, exc.message, exc.details, headers)

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


class ErrorBoundary:
    """ASGI middleware: an exception nobody mapped is a bug: log its traceback, answer a JSON 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise  # the response is under way: nothing left to answer with
            await self.answer(exc, scope)(scope, receive, send)

    @staticmethod
    def answer(exc: Exception, scope) -> JSONResponse:
        """507 for a full disk; anything else is a bug: its traceback logged under a request id."""
        where = f"{scope.get('method')} {scope.get('path')}"
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            log.error("disk full in %s: %s", where, exc.strerror)
            return error_response(
                507, "insufficient_storage", "the server's data volume is full; nothing was stored, retry later"
            )
        request_id = uuid.uuid4().hex[:16]
        log.error("unhandled error in %s (request %s)", where, request_id, exc_info=exc)
        return error_response(
            500,
            "internal_error",
            f"the server failed on this request (a bug); quote request id {request_id} when reporting it",
            {"request_id": request_id},
        )


CONTROL = re.compile("[\x00-\x1f\x7f]")


class CleanUrl:
    """ASGI middleware: refuse a path or query holding a control character (NUL, newline, ...) with a
    400 before any route sees it: no id, slide name or parameter has one, and PostgreSQL's text cannot
    hold a NUL."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            query = unquote_plus(scope.get("query_string", b"").decode("latin-1"))
            if CONTROL.search(scope.get("path", "")) or CONTROL.search(query):
                refused = error_response(
                    400, "invalid_characters", "the URL's path or query holds a control character; remove it"
                )
                return await refused(scope, receive, send)
        return await self.app(scope, receive, send)


class _BodyRefused(BaseException):
    """Raised inside ``receive``: a BaseException, so that no body parser turns it into its own 400."""


class _TooLarge(_BodyRefused):
    pass


class _TooSlow(_BodyRefused):
    pass


@dataclass(frozen=True)
class BodyLimits:
    """The largest request body, bytes, by what it is: a correction's PNG mask, a GeoJSON correction,
    and any other body (the API's JSON requests are a few hundred bytes)."""

    mask: int
    geojson: int
    json: int

    @classmethod
    def from_settings(cls, settings) -> BodyLimits:
        return cls(
            mask=int(settings.max_body_mb * MIB),
            geojson=int(settings.max_geojson_mb * MIB),
            json=settings.max_json_kb * 1024,
        )


MIB = 1024 * 1024


class BodyLimit:
    """ASGI middleware: refuse bodies above their limit (413) before the route reads them, and bodies
    whose next chunk takes longer than ``timeout_s``, or whose whole takes longer than ``total_s`` (408).

    The limit is ``limits.mask`` (PNG) or ``limits.geojson`` (a JSON media type) on the routes that
    ingest a correction (``upload_routes``), ``limits.json`` on every other route: a body is refused by
    its size before anything parses it."""

    def __init__(self, app, limits: BodyLimits, upload_routes=(), timeout_s: float = 30.0, total_s: float = 120.0):
        self.app, self.limits, self.upload_routes = app, limits, list(upload_routes)
        self.timeout_s, self.total_s = timeout_s, total_s

    def limit_for(self, scope, headers: dict) -> tuple[int, str]:
        """(bytes, the setting that sets them) for this request's body."""
        if not any(route.matches(scope)[0] == Match.FULL for route in self.upload_routes):
            return self.limits.json, "UGA_MAX_JSON_KB"
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media.endswith(b"json"):  # application/json, application/geo+json
            return self.limits.geojson, "UGA_MAX_GEOJSON_MB"
        return self.limits.mask, "UGA_MAX_BODY_MB"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        limit, setting = self.limit_for(scope, headers)
        too_big = error_response(
            413, "body_too_large", f"request body exceeds {limit} bytes ({setting})", {"limit": limit}
        )
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_big(scope, receive, send)
        seen, body_done, started = 0, False, False
        deadline = time.monotonic() + self.total_s

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # only disconnects are left to wait for: no deadline on those
                return await receive()
            wait = min(self.timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(0.0, wait))
            except TimeoutError:
                raise _TooSlow() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            return await self.app(scope, limited_receive, tracking_send)
        except _BodyRefused as exc:
            if started:  # a response is under way (a body sent with a download): nothing to answer
                return None
            if isinstance(exc, _TooLarge):
                return await too_big(scope, receive, send)
            slow = error_response(
                408,
                "body_timeout",
                f"the request body stalled for {self.timeout_s:g} s (UGA_BODY_TIMEOUT_S) or took over "
                f"{self.total_s:g} s in all (UGA_BODY_TOTAL_S); send it at once",
                headers={"Connection": "close"},
            )
            return await slow(scope, receive, send)
