"""Named users' API tokens: issue, list, revoke, verify.

A token reads ``uga_<id>_<secret>``: ``id`` is 16 hex digits (public: listed, used to revoke and to
find the row), ``secret`` 32 random bytes, URL-safe base64. The store keeps the SHA-256 of the
secret, never the secret: a fast hash is right for a high-entropy secret (nothing to guess), and the
comparison is constant-time. Every request looks its token up by primary key, so a revoked token
stops working at once, in every worker process.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from service.errors import Conflict, InvalidInput, NotFound
from service.store.db import Database, audit
from service.store.records import ApiToken
from service.vocabulary import ROLES

PREFIX = "uga_"
NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
TOKEN = re.compile(r"uga_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
TOKEN_ID = re.compile(r"[0-9a-f]{16}")
LAST_USED_EVERY_S = 300.0  # last_used_at is refreshed at most this often (a write per request would be waste)
PUBLIC_COLUMNS = "id, name, role, created_at, revoked_at, last_used_at"


def looks_like_token(value: str) -> bool:
    """True when ``value`` has the shape of a named token (no store access)."""
    return TOKEN.fullmatch(value) is not None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidInput("bad_name", f"user name {name[:80]!r}: use 1-64 characters of A-Z a-z 0-9 . _ @ -")
    return name


def check_role(role: str | None) -> str:
    if role not in ROLES:
        raise InvalidInput("bad_role", f"role {role!r}: use one of {', '.join(ROLES)}")
    return role


class TokenRepository:
    def __init__(self, db: Database):
        self.db = db

    def issue(self, name: str, role: str, actor: str | None = None) -> tuple[ApiToken, str]:
        """A new token for ``name`` with ``role``: its record and the token itself (shown once, never stored).

        A person's active tokens share one role: a second token with another role is refused (revoke first).
        """
        check_name(name)
        check_role(role)
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self.db.transaction() as db:
            other = db.execute(
                "SELECT role FROM api_tokens WHERE name = ? AND revoked_at IS NULL AND role != ? LIMIT 1", (name, role)
            ).fetchone()
            if other is not None:
                raise Conflict(
                    "role_conflict",
                    f"{name} has an active {other['role']} token: revoke it first to make {name} {role}",
                )
            db.execute(
                "INSERT INTO api_tokens (id, name, role, secret_sha256, created_at) VALUES (?, ?, ?, ?, ?)",
                (token_id, name, role, _digest(secret), time.time()),
            )
            audit(db, actor or "system", "token.issue", token_id, {"name": name, "role": role})
        return self.get(token_id), f"{PREFIX}{token_id}_{secret}"

    def get(self, token_id: str) -> ApiToken | None:
        return ApiToken.from_row(self.db.one(f"SELECT {PUBLIC_COLUMNS} FROM api_tokens WHERE id = ?", (token_id,)))

    def list(self, *, include_revoked: bool = True) -> list[ApiToken]:
        where = "" if include_revoked else " WHERE revoked_at IS NULL"
        rows = self.db.all(f"SELECT {PUBLIC_COLUMNS} FROM api_tokens{where} ORDER BY name, created_at")
        return [ApiToken.from_row(r) for r in rows]

    def count(self, *, active_only: bool = True) -> int:
        where = " WHERE revoked_at IS NULL" if active_only else ""
        return self.db.scalar(f"SELECT COUNT(*) FROM api_tokens{where}")

    def revoke(self, name_or_id: str, actor: str | None = None) -> list[ApiToken]:
        """Revokes the token with this id, or every active token of the user with this name.

        NotFound when nothing active matches (revoking twice says so)."""
        with self.db.transaction() as db:
            rows = db.execute(
                "SELECT id FROM api_tokens WHERE (id = ? OR name = ?) AND revoked_at IS NULL", (name_or_id, name_or_id)
            ).fetchall()
            if not rows:
                raise NotFound("token_not_found", f"no active token named or with id {name_or_id[:80]!r}")
            now = time.time()
            ids = [r["id"] for r in rows]
            for token_id in ids:
                db.execute("UPDATE api_tokens SET revoked_at = ? WHERE id = ?", (now, token_id))
                audit(db, actor or "system", "token.revoke", token_id, None)
        return [self.get(i) for i in ids]

    def verify(self, token: str) -> ApiToken | None:
        """The active token's record when ``token`` is one this store issued and has not revoked; else None.

        One primary-key SELECT; a constant-time comparison of the secret's hash."""
        m = TOKEN.fullmatch(token)
        if m is None:
            return None
        token_id, secret = m.groups()
        row = self.db.one(f"SELECT {PUBLIC_COLUMNS}, secret_sha256 FROM api_tokens WHERE id = ?", (token_id,))
        if row is None or not hmac.compare_digest(row["secret_sha256"], _digest(secret)):
            return None
        if row["revoked_at"] is not None:
            return None
        record = ApiToken.from_row(row)
        now = time.time()
        if record.last_used_at is None or now - record.last_used_at >= LAST_USED_EVERY_S:
            self._touch(token_id, now)
        return record

    def _touch(self, token_id: str, now: float) -> None:
        """Best effort: a busy store must not fail the request that only wanted to say 'used'."""
        try:
            with self.db.transaction() as db:
                db.execute("UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, token_id))
        except Exception:  # noqa: BLE001 - whichever database: a busy or unreachable store
            pass
