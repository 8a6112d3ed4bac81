"""Headers every API response carries, whatever answered it: no content sniffing, never framed, never
kept in a browser's or proxy's cache (slide names, patches and masks are patient data)."""

from __future__ import annotations

COMMON = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store"))


class CommonHeaders:
    """ASGI middleware adding ``COMMON`` to every HTTP response that does not set them itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message["headers"] = headers + [(k, v) for k, v in COMMON if k not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)
