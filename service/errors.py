"""Domain errors: one base class with a stable code, grouped by kind.

Code below the HTTP layer raises these; ``service.http.errors`` maps each kind to a status in one
place and the CLI prints the message as one line. Anything else that escapes is a bug (HTTP 500).
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A refusal the caller can fix: ``code`` is stable and machine-readable, ``message`` says how."""

    def __init__(self, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


class InvalidInput(DomainError):
    """The input is malformed (bad syntax, an empty body, a path that is not allowed)."""


class Unprocessable(DomainError):
    """The input is well-formed but cannot be used (a mask of the wrong size, an unreadable slide)."""


class NotAllowed(DomainError):
    """The caller may not do this to this resource (e.g. another person's job)."""


class NotFound(DomainError):
    """The named resource does not exist."""


class Gone(DomainError):
    """The resource existed and was removed on purpose (e.g. a superseded job's files, by retention)."""


class Conflict(DomainError):
    """The request contradicts the resource's current state."""


class UnsupportedMedia(DomainError):
    """The body's media type is not one this operation accepts."""


class Unavailable(DomainError):
    """The service cannot do this right now; retrying later may work."""


class TooBusy(DomainError):
    """A limit on queued work is reached; retry after ``retry_after`` seconds."""

    def __init__(self, code: str, message: str, details: Any = None, *, retry_after: int = 30):
        super().__init__(code, message, details)
        self.retry_after = retry_after
