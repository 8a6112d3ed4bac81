"""Who is calling, from ``Authorization: Bearer <token>``; three roles (viewer < annotator < admin).

Three kinds of bearer token, which can coexist:

- a named user's token ``uga_<id>_<secret>`` (``uga tokens add NAME --role ROLE``; the store keeps
  its hash): the principal is the person's name; revoking it takes effect on the next request;
- an OpenID Connect JWT from the hospital's identity provider (``UGA_OIDC_*``): signature (JWKS),
  issuer, audience, expiry checked; the person's name and role come from its claims;
- a shared role token (``UGA_AUTH_TOKENS[_FILE]``, kept for compatibility): it names a role, not a
  person; its principal is ``ROLE:<8 hex of an HMAC of the token>``.

Shared tokens are compared in constant time against every configured token. No token is ever logged.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
from jwt import PyJWK, PyJWKClient
from jwt.exceptions import PyJWKClientConnectionError, PyJWKClientError, PyJWKSetError, PyJWTError

from service.config import is_tls_or_loopback
from service.store.tokens import looks_like_token
from service.vocabulary import ROLES

if TYPE_CHECKING:
    from service.config import Settings
    from service.store.tokens import TokenRepository

log = logging.getLogger("uga.auth")

# A JWT in compact form: three base64url parts (the signature is empty for alg 'none', refused below).
JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Signature algorithms with a public key: what a JWKS can verify. Never 'none', never HS* (a public
# key used as an HMAC secret would let anyone sign).
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
JWKS_REFRESH_MIN_S = 30.0  # an unknown key id refetches the JWKS at most this often (key rotation)
MAX_NAME = 256


class AuthConfigError(ValueError):
    pass


class AuthFailure(Exception):
    """A refused credential: ``status`` and ``code`` for the HTTP answer, ``message`` never holds a token."""

    status, code = 401, "unauthenticated"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Unauthenticated(AuthFailure):
    pass


class NoRole(AuthFailure):
    """Authenticated, but the identity provider grants none of the roles this service maps."""

    status, code = 403, "forbidden"


class AuthUnavailable(AuthFailure):
    """The credential cannot be checked now (identity provider keys unreachable, store unreadable)."""

    status, code = 503, "auth_unavailable"


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    def allows(self, needed: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(needed)


def bearer(header: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer <token>`` header (scheme case-insensitive, RFC 9110)."""
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials or " " in credentials:
        return None
    return credentials


def parse_tokens(text: str) -> list[tuple[str, str]]:
    """Lines or comma-separated entries ``ROLE TOKEN`` or ``ROLE:TOKEN``; '#' starts a comment."""
    out = []
    for n, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        role, sep, token = line.replace(":", " ", 1).partition(" ")
        token = token.strip()
        if not sep or role not in ROLES or not token:
            raise AuthConfigError(f"bad token entry {n} (not shown): expected 'ROLE TOKEN' with ROLE in {ROLES}")
        if token.upper().startswith("REPLACE-ME"):
            raise AuthConfigError(f"the {role} token is still the shipped placeholder; put a real random token in")
        if len(token) < 16:
            raise AuthConfigError(f"a {role} token is shorter than 16 characters; use a long random token")
        out.append((role, token))
    return out


def read_shared_tokens(tokens_file: Path | None, tokens_env: str | None) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    if tokens_file:
        try:
            entries += parse_tokens(Path(tokens_file).read_text())
        except OSError as exc:
            raise AuthConfigError(f"cannot read UGA_AUTH_TOKENS_FILE {tokens_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise AuthConfigError(f"UGA_AUTH_TOKENS_FILE {tokens_file} is not UTF-8 'ROLE TOKEN' lines") from None
    if tokens_env:
        entries += parse_tokens(tokens_env)
    return entries


def parse_role_map(text: str | None) -> dict[str, str]:
    """``'IDP_ROLE=ROLE,...'`` -> {IDP_ROLE: ROLE}; ROLE one of ours."""
    out: dict[str, str] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        idp, sep, role = entry.rpartition("=")
        idp, role = idp.strip(), role.strip()
        if not sep or not idp or role not in ROLES:
            raise AuthConfigError(
                f"UGA_OIDC_ROLE_MAP entry {entry.strip()!r}: expected IDP_ROLE=ROLE with ROLE in {', '.join(ROLES)}"
            )
        out[idp] = role
    return out


def parse_algorithms(text: str) -> tuple[str, ...]:
    algs = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in algs if a not in ASYMMETRIC]
    if bad or not algs:
        raise AuthConfigError(
            f"UGA_OIDC_ALGORITHMS {', '.join(bad) or '(empty)'}: only asymmetric algorithms are accepted "
            f"({', '.join(ASYMMETRIC)}); never 'none' or HS*"
        )
    return algs


class SharedTokens:
    """Shared role tokens: compared in constant time against every configured token."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self._tokens = [(role, token.encode()) for role, token in tokens]

    def __len__(self) -> int:
        return len(self._tokens)

    def match(self, token: str) -> Principal | None:
        given = token.encode()
        match: str | None = None
        for role, known in self._tokens:  # no early exit: same work for every token
            if hmac.compare_digest(given, known) and match is None:
                match = role
        if match is None:
            return None
        return Principal(f"{match}:{hmac.new(b'uga', given, 'sha256').hexdigest()[:8]}", match)


def _claim(claims: dict[str, Any], path: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (``realm_access.roles``)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


OIDC_PREFIX = "oidc:"  # an IdP user's name in audit, ownership and corrections: oidc:<name claim>


def _person(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return None
    return value


def _authorized_party(claims: dict) -> object:
    """The client a token was issued to: ``azp`` (OIDC), ``client_id`` (RFC 9068 access tokens),
    ``cid`` (Okta); an ID token without ``azp`` names it as its single audience (OIDC Core 2)."""
    for claim in ("azp", "client_id", "cid"):
        if claim in claims:
            return claims[claim]
    aud = claims.get("aud")
    return aud[0] if isinstance(aud, list) and len(aud) == 1 else aud if isinstance(aud, str) else None


class OidcVerifier:
    """Validates the identity provider's JWTs against its JWKS (fetched, cached for a bounded time)."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_url: str,
        role_map: dict[str, str],
        roles_claim: str = "roles",
        name_claim: str = "preferred_username",
        algorithms: tuple[str, ...] = ("RS256", "ES256"),
        leeway_s: float = 30.0,
        jwks_cache_s: float = 300.0,
        jwks_timeout_s: float = 5.0,
        clients: frozenset[str] = frozenset(),
    ):
        if not role_map:
            raise AuthConfigError("UGA_OIDC_ROLE_MAP is empty: map at least one identity provider role to a role")
        parse_algorithms(",".join(algorithms))
        if not is_tls_or_loopback(jwks_url):
            # the keys every JWT is checked against: whoever can answer this URL could sign in as anyone
            raise AuthConfigError("UGA_OIDC_JWKS_URL must be an https:// URL (http:// only on loopback)")
        self.issuer, self.audience, self.jwks_url = issuer, audience, jwks_url
        self.role_map, self.roles_claim, self.name_claim = dict(role_map), roles_claim, name_claim
        self.algorithms, self.leeway_s = tuple(algorithms), leeway_s
        self.clients = clients  # empty: any client the IdP issues tokens for this audience to
        try:
            self._client = PyJWKClient(jwks_url, cache_keys=False, lifespan=jwks_cache_s, timeout=jwks_timeout_s)
        except PyJWKClientError as exc:
            raise AuthConfigError(f"UGA_OIDC_JWKS_URL: {exc}") from None
        self._lock = threading.Lock()
        self._refreshed = -math.inf

    @classmethod
    def from_settings(cls, s: Settings) -> OidcVerifier | None:
        """None when OIDC is off (no issuer); AuthConfigError when it is half configured."""
        if not s.oidc_issuer:
            if s.oidc_audience or s.oidc_jwks_url or s.oidc_role_map:
                raise AuthConfigError("UGA_OIDC_* settings are given but not UGA_OIDC_ISSUER, which turns OIDC on")
            return None
        missing = [
            n
            for n, v in (
                ("UGA_OIDC_AUDIENCE", s.oidc_audience),
                ("UGA_OIDC_JWKS_URL", s.oidc_jwks_url),
                ("UGA_OIDC_ROLE_MAP", s.oidc_role_map),
            )
            if not v
        ]
        if missing:
            raise AuthConfigError(f"OIDC is on (UGA_OIDC_ISSUER is set) but {', '.join(missing)} is not set")
        return cls(
            issuer=s.oidc_issuer,
            audience=s.oidc_audience,
            jwks_url=s.oidc_jwks_url,
            role_map=parse_role_map(s.oidc_role_map),
            roles_claim=s.oidc_roles_claim,
            name_claim=s.oidc_name_claim,
            algorithms=parse_algorithms(s.oidc_algorithms),
            leeway_s=s.oidc_leeway_s,
            jwks_cache_s=s.oidc_jwks_cache_s,
            jwks_timeout_s=s.oidc_jwks_timeout_s,
            clients=frozenset(c.strip() for c in s.oidc_clients.split(",") if c.strip()),
        )

    def _signing_key(self, kid: str | None) -> PyJWK:
        with self._lock:  # one fetch at a time; the others use what it fetched
            try:
                key = self._match(self._client.get_jwk_set(), kid)
                now = time.monotonic()
                if key is None and now - self._refreshed >= JWKS_REFRESH_MIN_S:  # the IdP may have rotated keys
                    self._refreshed = now
                    key = self._match(self._client.get_jwk_set(refresh=True), kid)
            except PyJWKClientConnectionError as exc:
                log.warning("cannot fetch the identity provider's JWKS from %s: %s", self.jwks_url, exc)
                raise AuthUnavailable("cannot reach the identity provider's keys; retry later") from None
            except (PyJWKClientError, PyJWKSetError, ValueError, OSError) as exc:  # incl. a body that is not JSON
                log.warning("the identity provider's JWKS at %s is unusable: %s", self.jwks_url, exc)
                raise AuthUnavailable("the identity provider's keys hold no usable signing key") from None
        if key is None:
            raise Unauthenticated("bearer JWT signed by a key the identity provider does not publish")
        return key

    @staticmethod
    def _match(jwks, kid: str | None) -> PyJWK | None:
        keys = [k for k in jwks.keys if k.public_key_use in ("sig", None)]
        if kid is None:  # no key id: only unambiguous with one published key
            return keys[0] if len(keys) == 1 else None
        return next((k for k in keys if k.key_id == kid), None)

    def verify(self, token: str) -> Principal:
        """The person this JWT names, with the highest role mapped from its roles claim.

        Unauthenticated (401) for any defect; NoRole (403) when no role maps; AuthUnavailable (503)
        when the identity provider's keys cannot be fetched."""
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise Unauthenticated("malformed bearer JWT") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthenticated(f"bearer JWT algorithm {str(alg)[:16]!r} is not accepted")
        kid = header.get("kid")
        key = self._signing_key(kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("bearer JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("bearer JWT is not valid yet (nbf/iat)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("bearer JWT is for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("bearer JWT is from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"bearer JWT lacks the {exc.claim!r} claim") from None
        except (PyJWTError, ValueError, TypeError):  # bad signature, undecodable, key of the wrong type
            raise Unauthenticated("bearer JWT signature or encoding is invalid") from None
        if self.clients:  # an audience shared by several apps: only the listed ones may call
            party = _authorized_party(claims)
            if not isinstance(party, str) or party not in self.clients:
                raise Unauthenticated(
                    f"bearer JWT was issued to client {str(party)[:64]!r}, not one in UGA_OIDC_CLIENTS"
                )
        name = _person(claims.get(self.name_claim)) or _person(claims.get("sub"))
        if name is None:
            raise Unauthenticated(f"bearer JWT names no person (claim {self.name_claim!r} or 'sub')")
        value = _claim(claims, self.roles_claim)
        idp_roles = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
        mapped = [self.role_map[r] for r in idp_roles if isinstance(r, str) and r in self.role_map]
        if not mapped:
            raise NoRole(
                f"the identity provider's token grants no role of this service: its {self.roles_claim!r} claim "
                f"holds none of {', '.join(sorted(self.role_map))} (UGA_OIDC_ROLE_MAP)"
            )
        # its own namespace: a named token's user ('alice') or a shared token ('annotator:1a2b3c4d') is
        # never the same person as an IdP user who calls themselves that
        return Principal(f"{OIDC_PREFIX}{name}", max(mapped, key=ROLES.index))


class Authenticator:
    """Every configured way in; ``authenticate`` answers one request's Authorization header."""

    def __init__(
        self,
        shared: list[tuple[str, str]] | None = None,
        named: TokenRepository | None = None,
        oidc: OidcVerifier | None = None,
        disabled: bool = False,
    ):
        self.disabled = disabled
        self.shared = SharedTokens(shared or [])
        self.named, self.oidc = named, oidc
        if disabled:
            log.warning("AUTH IS DISABLED (UGA_AUTH_DISABLED=true): every caller is treated as admin")
            return
        n_named = named.count() if named is not None else 0
        if not (len(self.shared) or n_named or oidc):
            raise AuthConfigError(
                "no API tokens configured: issue one with `uga tokens add NAME --role ROLE`, set UGA_OIDC_ISSUER "
                "(and the other UGA_OIDC_* settings), UGA_AUTH_TOKENS_FILE or UGA_AUTH_TOKENS, "
                "or UGA_AUTH_DISABLED=true for a local trial"
            )
        ways = [f"{n_named} active named-user tokens"]
        if oidc:
            ways.append(f"OIDC JWTs from {oidc.issuer}")
        if len(self.shared):
            ways.append(f"{len(self.shared)} shared role tokens (they record a role, not a person)")
        log.info("authentication: %s", "; ".join(ways))

    @classmethod
    def from_settings(cls, settings: Settings, named: TokenRepository | None) -> Authenticator:
        shared = read_shared_tokens(settings.auth_tokens_file, settings.auth_tokens)
        return cls(shared, named, OidcVerifier.from_settings(settings), settings.auth_disabled)

    def authenticate(self, header: str | None) -> Principal | None:
        """The caller, or None when the header is missing, not Bearer, or the token unknown or revoked.

        Raises AuthFailure when a JWT is refused with a reason (401), grants no role (403), or cannot be
        checked now (503)."""
        if self.disabled:
            return Principal("anonymous", "admin")
        token = bearer(header)
        if token is None:
            return None
        principal = self.shared.match(token)  # always, so its timing does not depend on the token's kind
        if principal is not None:
            return principal
        if self.named is not None and looks_like_token(token):
            try:
                record = self.named.verify(token)
            except sqlite3.Error as exc:
                log.warning("cannot check a named token against the store: %s", exc)
                raise AuthUnavailable("cannot check the token against the store; retry shortly") from None
            return Principal(record.name, record.role) if record is not None else None
        if self.oidc is not None and JWT_SHAPE.fullmatch(token):
            return self.oidc.verify(token)
        return None
