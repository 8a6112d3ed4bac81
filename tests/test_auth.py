"""Per-person identity: named users' tokens (issued, listed and revoked by `uga tokens`, stored hashed)
and OIDC bearer JWTs (signed by a key this test generates, its JWKS served on loopback), in-process
over a real Runtime; shared role tokens keep working and keep their principal names."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi.testclient import TestClient

from service.cli import ensure_tokens
from service.http.auth import (
    Authenticator,
    AuthUnavailable,
    NoRole,
    OidcVerifier,
    SharedTokens,
    Unauthenticated,
    bearer,
)
from service.store import Store
from service.store.db import SCHEMA, SCHEMA_VERSION
from tests.conftest import REPO
from tests.inprocess import InProcessService
from tests.oidc import Jwks, b64
from tests.server import TOKENS, free_port

ISSUER = "https://idp.hospital.test/realms/pathology"
AUDIENCE = "uga-serve"
ROLE_MAP = "uga-admin=admin,pathologist=annotator,resident=viewer"
TOKEN_RE = re.compile(r"uga_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")


# ---- helpers -----------------------------------------------------------------------------------


def uga(data_dir, *args):
    env = {**os.environ, "UGA_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def assert_refused(proc, needle):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uga: error:") and needle in lines[0], proc.stderr
    assert proc.stdout == ""


def issue(data_dir, name, role) -> str:
    proc = uga(data_dir, "tokens", "add", name, "--role", role)
    assert proc.returncode == 0, proc.stderr
    assert TOKEN_RE.fullmatch(proc.stdout.strip()) and proc.stdout.count("\n") == 1, proc.stdout  # the token, alone
    return proc.stdout.strip()


def claims(**overrides) -> dict:
    now = int(time.time())
    c = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "f1b2c3-subject",
        "preferred_username": "dr.house",
        "roles": ["pathologist"],
        "iat": now,
        "exp": now + 300,
    }
    c.update(overrides)
    return {k: v for k, v in c.items() if v is not None}


@pytest.fixture(scope="module")
def keys():
    return {
        "idp": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "other": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture(scope="module")
def jwks(keys):
    server = Jwks()
    server.publish(keys["idp"], "k1", "RS256")
    server.publish(keys["ec"], "ec1", "ES256")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def svc(tmp_path_factory, jwks):
    """One process's API with all three ways in: named tokens, OIDC, shared role tokens (tests/server.py's)."""
    root = tmp_path_factory.mktemp("auth")
    data_dir = root / "data"
    named = {"alice": issue(data_dir, "dr.alice", "admin"), "bob": issue(data_dir, "bob", "viewer")}
    service = InProcessService(
        data_dir,
        root,
        oidc_issuer=ISSUER,
        oidc_audience=AUDIENCE,
        oidc_jwks_url=jwks.url,
        oidc_role_map=ROLE_MAP,
        oidc_jwks_cache_s=1.0,
    )
    service.named = named
    yield service
    service.close()


def call(svc, method: str, path: str, authorization: str | None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    with TestClient(svc.app, raise_server_exceptions=False) as c:
        return c.request(method, path, headers=headers)


def finetune_as(svc, authorization: str) -> tuple[int, str | None, dict]:
    """POST /v1/finetune (admin): status, the actor of the 'finetune.request' audit row it wrote, the body.

    The run is closed afterwards, so that the next request opens, and audits, a new one."""
    r = call(svc, "POST", "/v1/finetune", authorization)
    if r.status_code not in (200, 202):
        return r.status_code, None, r.json()
    assert r.status_code == 202, r.text  # a new run, so a new audit row
    run_id = r.json()["id"]
    rows = [a for a in svc.runtime.store.audit_log(1000) if a["action"] == "finetune.request" and a["target"] == run_id]
    svc.runtime.store.runs.start(run_id, "v", {}, total=1)  # as a runner would, then it ends
    svc.runtime.store.runs.end(run_id, "failed", candidate=None, metrics=None, reason="closed by test")
    assert len(rows) == 1
    return r.status_code, rows[0]["actor"], r.json()


# ---- named users' tokens ----------------------------------------------------------------------------


def test_a_named_token_records_the_person_in_the_audit_log_and_the_run(svc):
    status, actor, run = finetune_as(svc, f"Bearer {svc.named['alice']}")
    assert status == 202 and actor == "dr.alice" and run["requested_by"] == "dr.alice"


def test_a_named_token_carries_its_role(svc):
    bob = f"Bearer {svc.named['bob']}"
    assert call(svc, "GET", "/v1/finetune/runs", bob).status_code == 200
    r = call(svc, "POST", "/v1/finetune", bob)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def test_shared_role_tokens_still_work_and_keep_their_principal_names(svc):
    status, actor, _ = finetune_as(svc, f"Bearer {TOKENS['admin']}")
    digest = hmac.new(b"uga", TOKENS["admin"].encode(), "sha256").hexdigest()[:8]
    assert status == 202 and actor == f"admin:{digest}"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(svc, scheme):
    status, actor, _ = finetune_as(svc, f"{scheme} {svc.named['alice']}")
    assert status == 202 and actor == "dr.alice"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic {alice}",
        "Token {alice}",
        "{alice}",
        "Bearer {alice} extra",
        "Bearer {alice}x",
        "Bearer uga_0123456789abcdef_" + "A" * 43,
        "Bearer not-a-token",
        "Bearer a.b.c",
        "Bearer %%%%",
        "Bearer uga_",
        "Negotiate YIIBhwYGKwYBBQUCoIIBezCCAXeg",
        "garbage",
    ],
)
def test_anything_but_a_known_bearer_token_is_401(svc, authorization):
    if authorization is not None:
        authorization = authorization.format(alice=svc.named["alice"])
    r = call(svc, "GET", "/v1/finetune/runs", authorization)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated", r.text


def test_a_token_with_a_known_id_but_another_secret_is_401(svc):
    alice = svc.named["alice"]
    forged = alice[: -len("X")] + ("A" if alice[-1] != "A" else "B")
    assert call(svc, "GET", "/v1/finetune/runs", f"Bearer {forged}").status_code == 401


def test_tokens_issued_while_serving_work_and_a_revoked_one_is_refused_at_once(svc):
    carol = issue(svc.data_dir, "carol@path.lab", "annotator")  # another process writes the store
    ok = call(svc, "GET", "/v1/finetune/runs", f"Bearer {carol}")
    assert ok.status_code == 200, ok.text
    proc = uga(svc.data_dir, "tokens", "revoke", "carol@path.lab")
    assert proc.returncode == 0 and carol.split("_")[1] in proc.stdout, proc.stderr
    r = call(svc, "GET", "/v1/finetune/runs", f"Bearer {carol}")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    audit = [(a["action"], a["actor"]) for a in svc.runtime.store.audit_log(1000) if a["target"] == carol.split("_")[1]]
    assert {action for action, _ in audit} == {"token.issue", "token.revoke"}
    assert all(actor.startswith("cli") for _, actor in audit)


def test_the_store_keeps_a_hash_of_the_secret_never_the_secret(svc):
    alice = svc.named["alice"]
    token_id, secret = alice.split("_", 2)[1:]
    svc.runtime.store.tokens.get(token_id)  # the row is there...
    raw = b"".join(p.read_bytes() for p in svc.data_dir.glob("uga.sqlite*"))  # database, WAL and all
    assert token_id.encode() in raw  # ...we read the right bytes...
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in raw
    assert secret.encode() not in raw and alice.encode() not in raw  # ...and the secret is not among them


def test_use_is_recorded_on_the_token(svc):
    record, token = svc.runtime.store.tokens.issue("carol", "viewer")  # never used before this test
    assert record.last_used_at is None
    before = time.time()
    assert call(svc, "GET", "/v1/finetune/runs", f"Bearer {token}").status_code == 200
    record = svc.runtime.store.tokens.get(record.id)
    assert record.last_used_at is not None and record.last_used_at >= before - 1


# ---- the CLI ------------------------------------------------------------------------------------------


def test_tokens_add_list_revoke(tmp_path):
    data = tmp_path / "data"
    ann = issue(data, "ann.smith", "annotator")
    issue(data, "ann.smith", "annotator")  # a second token for the same person (rotation)
    vic = issue(data, "vic", "viewer")
    listed = uga(data, "tokens", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "ID", "CREATED", "REVOKED", "LAST_USED"] and len(lines) == 4
    assert ann.split("_")[1] in listed.stdout and vic.split("_")[1] in listed.stdout
    assert ann.split("_", 2)[2] not in listed.stdout and vic.split("_", 2)[2] not in listed.stdout
    by_id = uga(data, "tokens", "revoke", vic.split("_")[1])
    assert by_id.returncode == 0 and "vic" in by_id.stdout
    by_name = uga(data, "tokens", "revoke", "ann.smith")
    assert by_name.returncode == 0 and len(by_name.stdout.strip().splitlines()) == 2  # all of the person's tokens
    active = uga(data, "tokens", "list", "--active")
    assert active.returncode == 0 and len(active.stdout.strip().splitlines()) == 1  # the header alone
    revoked = [line.split() for line in uga(data, "tokens", "list").stdout.strip().splitlines()[1:]]
    assert len(revoked) == 3 and all(row[4] != "-" for row in revoked)
    store = Store(data)
    try:
        assert store.tokens.count() == 0 and store.tokens.verify(ann) is None and store.tokens.verify(vic) is None
    finally:
        store.close()


@pytest.mark.parametrize(
    "args, needle",
    [
        (("tokens", "add", "bad name", "--role", "admin"), "user name"),
        (("tokens", "add", "x" * 65, "--role", "admin"), "user name"),
        (("tokens", "add", "role:abc", "--role", "admin"), "user name"),  # cannot pose as a shared token
        (("tokens", "add", "dave"), "--role is required"),
        (("tokens", "add", "dave", "--role", "root"), "role 'root'"),
        (("tokens", "add", "erin", "--role", "admin"), "revoke it first"),  # erin is a viewer already
        (("tokens", "revoke", "nobody"), "no active token"),
    ],
)
def test_bad_token_commands_are_one_line_exit_2(tmp_path, args, needle):
    issue(tmp_path / "data", "erin", "viewer")
    assert_refused(uga(tmp_path / "data", *args), needle)


def test_list_and_revoke_do_not_create_a_store(tmp_path):
    for args in (("tokens", "list"), ("tokens", "revoke", "x")):
        assert_refused(uga(tmp_path / "nowhere", *args), "no store")
    assert not (tmp_path / "nowhere").exists()


# ---- zero-config first run of `uga serve` ---------------------------------------------------------------


def test_first_run_creates_named_users_and_a_private_tokens_file_never_overwritten(tmp_path):
    data = tmp_path / "data"
    assert ensure_tokens(data) is None  # not a shared-token file to serve with
    path = data / "tokens"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entries = dict(line.split() for line in path.read_text().splitlines() if not line.startswith("#"))
    assert set(entries) == {"admin", "annotator", "viewer"}
    store = Store(data)
    try:
        auth = Authenticator(named=store.tokens)
        for name, token in entries.items():
            p = auth.authenticate(f"Bearer {token}")
            assert p is not None and (p.name, p.role) == (name, name)
        content = path.read_bytes()
        assert ensure_tokens(data) is None and path.read_bytes() == content  # never overwritten
        assert store.tokens.count() == 3  # nor any user added twice
    finally:
        store.close()


def test_first_run_creates_nothing_when_an_operator_issued_tokens(tmp_path):
    issue(tmp_path / "data", "ops", "admin")
    assert ensure_tokens(tmp_path / "data") is None
    assert not (tmp_path / "data" / "tokens").exists()


def test_an_earlier_release_tokens_file_is_served_as_shared_tokens(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokens").write_text("# ROLE TOKEN\nadmin AAAAAAAAAAAAAAAAAAAAAAAA\nviewer BBBBBBBBBBBBBBBBBBBBBBBB\n")
    assert ensure_tokens(data) == data / "tokens"


def test_a_version_3_store_gains_the_tokens_table(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    schema_3 = re.sub(r"CREATE TABLE IF NOT EXISTS api_tokens .*", "", SCHEMA, flags=re.S)
    schema_3 = re.sub(r",\n    model_dice [^\n]*(\n    withdrawn_[^\n]*)*", "", schema_3)  # schemas 6, 11
    schema_3 = re.sub(r"\n    error_code [^\n]*", "", schema_3)  # schema 7
    assert "api_tokens" not in schema_3 and "CREATE TABLE IF NOT EXISTS audit" in schema_3
    db = sqlite3.connect(data / "uga.sqlite")
    db.executescript(schema_3 + "PRAGMA user_version=3;")
    db.close()
    token = issue(data, "migrated", "viewer")
    store = Store(data)
    try:
        assert store.db.scalar("PRAGMA user_version") == SCHEMA_VERSION
        assert store.tokens.verify(token).name == "migrated"
    finally:
        store.close()


# ---- OIDC ------------------------------------------------------------------------------------------------


def test_a_valid_jwt_is_accepted_and_the_person_recorded(svc, keys):
    token = jwt.encode(claims(), keys["idp"], algorithm="RS256", headers={"kid": "k1"})
    r = call(svc, "GET", "/v1/finetune/runs", f"Bearer {token}")
    assert r.status_code == 200, r.text
    admin = jwt.encode(claims(roles=["uga-admin"]), keys["idp"], algorithm="RS256", headers={"kid": "k1"})
    status, actor, _ = finetune_as(svc, f"bearer {admin}")
    assert status == 202 and actor == "oidc:dr.house"


def test_an_idp_user_is_never_taken_for_a_named_or_shared_token_holder_of_the_same_name(jwks, keys):
    """IdPs may let people choose preferred_username: 'alice' or 'annotator:1a2b3c4d' from the IdP is
    not the named-token user alice nor a shared annotator token (ownership, audit, corrections)."""
    v = verifier(jwks)
    shared = SharedTokens([("annotator", "s3cret-shared-token")]).match("s3cret-shared-token")
    for name in ("alice", shared.name):
        token = jwt.encode(claims(preferred_username=name), keys["idp"], algorithm="RS256", headers={"kid": "k1"})
        assert v.verify(token).name == f"oidc:{name}" != name


def test_an_es256_jwt_is_accepted(svc, keys):
    token = jwt.encode(claims(roles=["uga-admin"]), keys["ec"], algorithm="ES256", headers={"kid": "ec1"})
    status, actor, _ = finetune_as(svc, f"Bearer {token}")
    assert status == 202 and actor == "oidc:dr.house"


def test_the_highest_mapped_role_wins_and_unmapped_roles_are_ignored(svc, keys):
    token = jwt.encode(
        claims(roles=["resident", "uga-admin", "janitor"]), keys["idp"], algorithm="RS256", headers={"kid": "k1"}
    )
    status, _, _ = finetune_as(svc, f"Bearer {token}")
    assert status == 202
    low = jwt.encode(claims(roles=["resident", "janitor"]), keys["idp"], algorithm="RS256", headers={"kid": "k1"})
    r = call(svc, "POST", "/v1/finetune", f"Bearer {low}")
    assert (
        r.status_code == 403 and r.json()["error"]["code"] == "forbidden" and "viewer" in r.json()["error"]["message"]
    )


def test_the_subject_names_the_person_when_the_name_claim_is_absent(svc, keys):
    token = jwt.encode(
        claims(preferred_username=None, roles=["uga-admin"]), keys["idp"], algorithm="RS256", headers={"kid": "k1"}
    )
    status, actor, _ = finetune_as(svc, f"Bearer {token}")
    assert status == 202 and actor == "oidc:f1b2c3-subject"


def _unsigned(header: dict, payload: dict, sign=None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode())) if sign else ''}"


def _bad_tokens(keys) -> dict[str, str]:
    rs = {"algorithm": "RS256", "headers": {"kid": "k1"}}
    now = int(time.time())
    public_pem = (
        keys["idp"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return {
        "wrong audience": jwt.encode(claims(aud="another-app"), keys["idp"], **rs),
        "wrong issuer": jwt.encode(claims(iss="https://evil.example/"), keys["idp"], **rs),
        "expired": jwt.encode(claims(iat=now - 3600, exp=now - 600), keys["idp"], **rs),
        "not yet valid": jwt.encode(claims(nbf=now + 600), keys["idp"], **rs),
        "no exp": jwt.encode(claims(exp=None), keys["idp"], **rs),
        "another key, same kid": jwt.encode(claims(), keys["other"], **rs),
        "another key, unknown kid": jwt.encode(claims(), keys["other"], algorithm="RS256", headers={"kid": "zz"}),
        "alg none": _unsigned({"alg": "none", "typ": "JWT", "kid": "k1"}, claims()),
        "HS256 with the public key": _unsigned(
            {"alg": "HS256", "typ": "JWT", "kid": "k1"},
            claims(),
            lambda m: hmac.new(public_pem, m, "sha256").digest(),
        ),
        "tampered payload": _tampered(jwt.encode(claims(), keys["idp"], **rs)),
    }


def _tampered(token: str) -> str:
    """The token with its payload replaced (an admin role added), signature kept."""
    header, _, signature = token.split(".")
    return f"{header}.{b64(json.dumps(claims(roles=['uga-admin'])).encode())}.{signature}"


@pytest.mark.parametrize(
    "case",
    [
        "wrong audience",
        "wrong issuer",
        "expired",
        "not yet valid",
        "no exp",
        "another key, same kid",
        "another key, unknown kid",
        "alg none",
        "HS256 with the public key",
        "tampered payload",
    ],
)
def test_a_defective_jwt_is_401(svc, keys, case):
    r = call(svc, "GET", "/v1/finetune/runs", f"Bearer {_bad_tokens(keys)[case]}")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated", r.text


def test_a_jwt_without_a_mapped_role_is_403_naming_the_claim(svc, keys):
    for c in (claims(roles=["janitor"]), claims(roles=None), claims(roles="")):
        token = jwt.encode(c, keys["idp"], algorithm="RS256", headers={"kid": "k1"})
        r = call(svc, "GET", "/v1/finetune/runs", f"Bearer {token}")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        assert "'roles' claim" in r.json()["error"]["message"]


def test_jwks_unreachable_is_503_auth_unavailable_and_recovers(svc, keys, jwks):
    token = jwt.encode(claims(), keys["idp"], algorithm="RS256", headers={"kid": "k1"})
    assert call(svc, "GET", "/v1/finetune/runs", f"Bearer {token}").status_code == 200
    jwks.stop()
    try:
        time.sleep(1.2)  # past the cache lifetime (1 s in svc): the keys must be fetched again
        r = call(svc, "GET", "/v1/finetune/runs", f"Bearer {token}")
        assert r.status_code == 503 and r.json()["error"]["code"] == "auth_unavailable", r.text
        named = call(svc, "GET", "/v1/finetune/runs", f"Bearer {svc.named['bob']}")
        assert named.status_code == 200  # the other ways in do not depend on the identity provider
    finally:
        jwks.start()
    assert call(svc, "GET", "/v1/finetune/runs", f"Bearer {token}").status_code == 200


def verifier(jwks, **kw) -> OidcVerifier:
    return OidcVerifier(
        issuer=ISSUER, audience=AUDIENCE, jwks_url=jwks.url, role_map={"pathologist": "annotator"}, **kw
    )


def test_jwks_is_cached_for_a_bounded_time(jwks, keys):
    token = jwt.encode(claims(), keys["idp"], algorithm="RS256", headers={"kid": "k1"})
    v = verifier(jwks, jwks_cache_s=0.5)
    before = jwks.fetches
    for _ in range(5):
        assert v.verify(token).name == "oidc:dr.house"
    assert jwks.fetches == before + 1
    time.sleep(0.7)
    v.verify(token)
    assert jwks.fetches == before + 2


def test_a_rotated_key_is_fetched_but_unknown_keys_do_not_hammer_the_idp(jwks):
    v = verifier(jwks, jwks_cache_s=300)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    old = jwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": "nope"})
    with pytest.raises(Unauthenticated):
        v.verify(old)  # fetch, then one refresh for the unknown kid
    jwks.publish(new_key, "k-rotated", "RS256")
    try:
        v._refreshed = -1e9  # as if the refresh cool-down had passed
        rotated = jwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": "k-rotated"})
        assert v.verify(rotated).role == "annotator"  # found by refreshing the cached key set
        before = jwks.fetches
        for kid in ("x1", "x2", "x3"):
            with pytest.raises(Unauthenticated):
                v.verify(jwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": kid}))
        assert jwks.fetches == before  # within the cool-down: no fetch per unknown kid
    finally:
        jwks.keys.pop()


def test_nested_roles_claim_and_a_dead_jwks_url(keys, jwks):
    v = verifier(jwks, roles_claim="realm_access.roles")
    token = jwt.encode(
        claims(roles=None, realm_access={"roles": ["pathologist"]}),
        keys["idp"],
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    assert v.verify(token).role == "annotator"
    with pytest.raises(NoRole, match="realm_access.roles"):
        v.verify(jwt.encode(claims(), keys["idp"], algorithm="RS256", headers={"kid": "k1"}))
    dead = OidcVerifier(
        issuer=ISSUER, audience=AUDIENCE, jwks_url=f"http://127.0.0.1:{free_port()}/jwks", role_map={"x": "viewer"}
    )
    with pytest.raises(AuthUnavailable):
        dead.verify(token)


def test_bearer_parsing():
    assert bearer("Bearer abc") == bearer("bearer abc") == bearer("BEARER   abc ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer") is None and bearer("Bearer a b") is None
    assert bearer(None) is None and bearer("abc") is None


def test_with_clients_listed_only_their_tokens_are_accepted(jwks, keys):
    """An audience shared by several apps at the IdP: a token issued to another app is not ours."""
    v = verifier(jwks, clients=frozenset({"uga-review", "lis-bridge"}))

    def token(**c):
        return jwt.encode(claims(**c), keys["idp"], algorithm="RS256", headers={"kid": "k1"})

    assert v.verify(token(azp="uga-review")).name == "oidc:dr.house"
    assert v.verify(token(client_id="lis-bridge")).name == "oidc:dr.house"  # an RFC 9068 access token
    assert v.verify(token(cid="uga-review")).name == "oidc:dr.house"  # Okta's access tokens
    review = verifier(jwks, clients=frozenset({AUDIENCE}))  # the page's client id is the audience
    assert review.verify(token()).name == "oidc:dr.house"  # an ID token without azp: its single audience
    assert review.verify(token(aud=[AUDIENCE])).name == "oidc:dr.house"
    for other in (token(azp="billing-app"), token(client_id="billing-app"), token(), token(azp=["uga-review"])):
        with pytest.raises(Unauthenticated, match="UGA_OIDC_CLIENTS"):
            v.verify(other)
    assert verifier(jwks).verify(token(azp="billing-app")).name == "oidc:dr.house"  # unset: any client of the audience


def test_with_authentication_off_only_this_machine_may_call(tmp_path):
    """UGA_AUTH_DISABLED (a local trial) makes every caller admin: a request naming another host (DNS
    rebinding) or sent by a page of another origin (a site the user visits) is refused before it acts."""
    service = InProcessService(tmp_path / "data", tmp_path, auth_disabled=True)
    try:
        with TestClient(service.app, base_url="http://127.0.0.1:3000", raise_server_exceptions=False) as c:
            assert c.get("/v1/finetune/runs").status_code == 200  # curl, a script: no Origin
            assert c.post("/v1/finetune", headers={"Origin": "http://127.0.0.1:3000"}).status_code == 202  # its page
            refused = [
                ("not_local", c.get("/v1/finetune/runs", headers={"Host": "attacker.example:3000"})),
                ("cross_site", c.post("/v1/models/rollback", headers={"Origin": "https://attacker.example"})),
                ("cross_site", c.post("/v1/models/rollback", headers={"Origin": "http://localhost:8888"})),
                ("cross_site", c.post("/v1/models/rollback", headers={"Origin": "null"})),
            ]
            for code, r in refused:
                assert (r.status_code, r.json()["error"]["code"]) == (403, code), r.text
            assert [h["action"] for h in service.runtime.store.models.pointer_history()] == ["init"]
    finally:
        service.close()
