"""Bearer-token authentication with three roles (viewer < annotator < admin)."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from service.vocabulary import ROLES

log = logging.getLogger("uga.auth")


class AuthConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def allows(self, needed: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(needed)


def parse_tokens(text: str) -> list[tuple[str, str]]:
    """Lines or comma-separated entries ``ROLE TOKEN`` or ``ROLE:TOKEN``; '#' starts a comment."""
    out = []
    for raw in text.replace(",", "\n").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        role, sep, token = line.replace(":", " ", 1).partition(" ")
        token = token.strip()
        if not sep or role not in ROLES or not token:
            raise AuthConfigError(f"bad token entry {line[:12]!r}...: expected 'ROLE TOKEN' with ROLE in {ROLES}")
        if token.upper().startswith("REPLACE-ME"):
            raise AuthConfigError(f"the {role} token is still the shipped placeholder; put a real random token in")
        if len(token) < 16:
            raise AuthConfigError(f"a {role} token is shorter than 16 characters; use a long random token")
        out.append((role, token))
    return out


class TokenAuth:
    """Checks ``Authorization: Bearer <token>`` in constant time against every configured token."""

    def __init__(self, tokens: list[tuple[str, str]], disabled: bool = False):
        self.disabled = disabled
        self._tokens = [(role, token.encode()) for role, token in tokens]
        if disabled:
            log.warning("AUTH IS DISABLED (UGA_AUTH_DISABLED=true): every caller is treated as admin")
        elif not self._tokens:
            raise AuthConfigError(
                "no API tokens configured: set UGA_AUTH_TOKENS_FILE or UGA_AUTH_TOKENS, "
                "or UGA_AUTH_DISABLED=true for a local trial"
            )

    @classmethod
    def from_settings(cls, tokens_file: Path | None, tokens_env: str | None, disabled: bool) -> TokenAuth:
        entries: list[tuple[str, str]] = []
        if tokens_file:
            try:
                entries += parse_tokens(Path(tokens_file).read_text())
            except OSError as exc:
                raise AuthConfigError(f"cannot read UGA_AUTH_TOKENS_FILE {tokens_file}: {exc.strerror}") from None
        if tokens_env:
            entries += parse_tokens(tokens_env)
        return cls(entries, disabled)

    def authenticate(self, header: str | None) -> Principal | None:
        """The caller's principal, or None when the header is missing or the token unknown."""
        if self.disabled:
            return Principal("anonymous", "admin")
        if not header or not header.startswith("Bearer "):
            return None
        given = header[7:].strip().encode()
        match: str | None = None
        for role, token in self._tokens:  # no early exit: same work for every token
            if hmac.compare_digest(given, token) and match is None:
                match = role
        if match is None:
            return None
        return Principal(f"{match}:{hmac.new(b'uga', given, 'sha256').hexdigest()[:8]}", match)
