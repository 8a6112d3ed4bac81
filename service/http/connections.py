"""Slow or greedy clients cannot hold a worker: a deadline for a request's headers and a cap on open
connections per worker process.

uvicorn (which BentoML runs, with its h11 protocol) cancels its idle timer on every byte received, so
a client sending a header byte every few seconds keeps a connection forever. ``install`` wraps the
protocol class once per process, before the server starts (service/api.py imports this module):

- from the moment a connection opens, and again after each response, the next request's headers
  must be complete within ``header_timeout_s``, or the connection is closed;
- over ``max_connections`` open connections, a new connection is closed at once.

Slow *bodies* are cut off in ``service.http.errors.BodyLimit`` (408 after ``body_timeout_s`` without
a chunk).
"""

from __future__ import annotations

import logging

log = logging.getLogger("uga.http")
_installed: dict[str, float] = {}


def install(header_timeout_s: float, max_connections: int) -> None:
    """Patch uvicorn's h11 protocol in this process (idempotent; the latest limits apply)."""
    import uvicorn.config
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # BentoML leaves uvicorn on http="auto", which picks httptools when it is installed: these guards
    # live on the h11 protocol, so "auto" means h11 here.
    uvicorn.config.HTTP_PROTOCOLS["auto"] = "uvicorn.protocols.http.h11_impl:H11Protocol"

    _installed.update(header_timeout_s=header_timeout_s, max_connections=max_connections)
    if getattr(H11Protocol, "_uga_guarded", False):
        return
    made, handle, complete, lost = (
        H11Protocol.connection_made,
        H11Protocol.handle_events,
        H11Protocol.on_response_complete,
        H11Protocol.connection_lost,
    )

    def arm(self) -> None:
        disarm(self)
        self._uga_deadline = self.loop.call_later(_installed["header_timeout_s"], headers_overdue, self)

    def disarm(self) -> None:
        timer = getattr(self, "_uga_deadline", None)
        if timer is not None:
            timer.cancel()
            self._uga_deadline = None

    def headers_overdue(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            log.warning(
                "closed a connection from %s: request headers not complete in %.0f s",
                self.client,
                _installed["header_timeout_s"],
            )
            self.transport.close()

    def connection_made(self, transport) -> None:
        made(self, transport)
        if len(self.connections) > _installed["max_connections"]:
            log.warning("refused a connection: %d open (UGA_MAX_CONNECTIONS)", len(self.connections) - 1)
            transport.close()
            return
        arm(self)

    def handle_events(self) -> None:
        handle(self)
        if self.cycle is not None and not self.cycle.response_complete:
            disarm(self)  # a request's headers arrived: the body has its own timeout

    def on_response_complete(self) -> None:
        complete(self)
        if not self.transport.is_closing():
            arm(self)

    def connection_lost(self, exc) -> None:
        disarm(self)
        lost(self, exc)

    H11Protocol.connection_made = connection_made
    H11Protocol.handle_events = handle_events
    H11Protocol.on_response_complete = on_response_complete
    H11Protocol.connection_lost = connection_lost
    H11Protocol._uga_guarded = True
