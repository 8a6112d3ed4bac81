"""Readiness (/readyz semantics) and auth configuration of a serving process."""

import sqlite3

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.http.auth import AuthConfigError, Authenticator, OidcVerifier, parse_tokens
from service.http.runtime import Runtime
from service.store import Store
from tests.conftest import REPO


def test_ready_only_with_a_model_and_a_writable_store(tmp_path):
    settings = Settings(
        data_dir=tmp_path / "data",
        slide_root=tmp_path,
        baseline_dir=REPO / "models" / "baseline",
        auth_tokens="admin:0123456789abcdef0123",
        ort_threads=1,
    )
    rt = Runtime.create(settings, start_worker=False)
    try:
        assert rt.ready()
        blocker = sqlite3.connect(rt.store.db_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # a stuck writer: nothing else can write
        assert not rt.ready()
        blocker.execute("ROLLBACK")
        blocker.close()
        assert rt.ready()
        rt.models._ensemble = None  # e.g. the model failed to load
        assert not rt.ready()
    finally:
        rt.close()


def test_auth_must_be_configured_or_explicitly_disabled(caplog, tmp_path):
    with pytest.raises(AuthConfigError, match="no API tokens configured"):
        Authenticator([], disabled=False)
    store = Store(tmp_path / "data")
    try:
        with pytest.raises(AuthConfigError, match="uga tokens add"):
            Authenticator(named=store.tokens)  # a store without tokens is no way in
        store.tokens.issue("ops", "admin")
        assert Authenticator(named=store.tokens).authenticate("Bearer nope") is None
    finally:
        store.close()
    auth = Authenticator([], disabled=True)
    assert "AUTH IS DISABLED" in caplog.text
    assert auth.authenticate(None).role == "admin"


def test_runtime_refuses_to_start_without_a_way_in(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", slide_root=tmp_path, auth_tokens=None, auth_tokens_file=None)
    with pytest.raises(AuthConfigError, match="no API tokens configured"):
        Runtime.create(settings, start_worker=False)


def test_tokens_parse_and_roles_are_checked():
    entries = parse_tokens("# ops\nadmin AAAAAAAAAAAAAAAAAAAA\nviewer:BBBBBBBBBBBBBBBBBBBB")
    auth = Authenticator(entries)
    assert auth.authenticate("Bearer AAAAAAAAAAAAAAAAAAAA").role == "admin"
    assert auth.authenticate("bearer AAAAAAAAAAAAAAAAAAAA").role == "admin"  # the scheme is case-insensitive
    assert auth.authenticate("Bearer AAAAAAAAAAAAAAAAAAAA").name.startswith("admin:")
    assert auth.authenticate("Bearer BBBBBBBBBBBBBBBBBBBB").allows("viewer")
    assert not auth.authenticate("Bearer BBBBBBBBBBBBBBBBBBBB").allows("annotator")
    assert auth.authenticate("Bearer nope") is None and auth.authenticate(None) is None
    assert auth.authenticate("Basic AAAAAAAAAAAAAAAAAAAA") is None
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        parse_tokens("admin short")
    with pytest.raises(AuthConfigError, match="placeholder"):
        parse_tokens((REPO / "k8s" / "base" / "tokens").read_text())  # the manifests' Secret must be replaced
    for entry in ("root AAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAA"):
        with pytest.raises(AuthConfigError, match="ROLE TOKEN") as refused:
            parse_tokens(entry)
        assert "AAAA" not in str(refused.value)  # a refused entry's token is not repeated in the message


OIDC = {
    "oidc_issuer": "https://idp.test",
    "oidc_audience": "uga",
    "oidc_jwks_url": "https://idp.test/jwks",
    "oidc_role_map": "pathologist=annotator",
}


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({**OIDC, "oidc_algorithms": "RS256,none"}, "none"),
        ({**OIDC, "oidc_algorithms": "HS256"}, "HS256"),
        ({**OIDC, "oidc_algorithms": ""}, "UGA_OIDC_ALGORITHMS"),
        ({**OIDC, "oidc_audience": None}, "UGA_OIDC_AUDIENCE"),
        ({**OIDC, "oidc_jwks_url": None}, "UGA_OIDC_JWKS_URL"),
        ({**OIDC, "oidc_role_map": None}, "UGA_OIDC_ROLE_MAP"),
        ({**OIDC, "oidc_role_map": "pathologist=root"}, "UGA_OIDC_ROLE_MAP"),
        ({**OIDC, "oidc_role_map": "pathologist"}, "UGA_OIDC_ROLE_MAP"),
        ({**OIDC, "oidc_issuer": None}, "UGA_OIDC_ISSUER"),
    ],
)
def test_oidc_settings_are_checked_at_start(settings, needle):
    with pytest.raises(AuthConfigError, match=needle):
        OidcVerifier.from_settings(Settings(**settings))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://idp.test/jwks", "https:///jwks"])
def test_a_jwks_url_anyone_could_answer_is_refused(url):
    """The keys every JWT is checked against: a forged key set would sign in anyone."""
    with pytest.raises(ValidationError, match="https"):
        Settings(**{**OIDC, "oidc_jwks_url": url})
    with pytest.raises(AuthConfigError, match="UGA_OIDC_JWKS_URL must be an https"):
        OidcVerifier(issuer=OIDC["oidc_issuer"], audience="uga", jwks_url=url, role_map={"p": "viewer"})
    assert Settings(**{**OIDC, "oidc_jwks_url": "http://127.0.0.1:9/jwks"}).oidc_jwks_url  # this host only


def test_oidc_is_off_unless_an_issuer_is_set_and_alone_is_a_way_in():
    assert OidcVerifier.from_settings(Settings()) is None
    oidc = OidcVerifier.from_settings(Settings(**{**OIDC, "oidc_role_map": "a=viewer, b = admin,x=y=annotator"}))
    assert oidc.role_map == {"a": "viewer", "b": "admin", "x=y": "annotator"}
    assert Authenticator(oidc=oidc).oidc is oidc


@pytest.mark.parametrize(
    "settings, refused",
    [
        ({"pacs": "main=http://pacs.hospital.lan/dicom-web"}, True),  # a PACS password in clear text
        ({"pacs": "main=http://127.0.0.1:8042/dicom-web"}, False),  # on this host
        ({"pacs": "main=https://pacs.hospital.lan/dicom-web"}, False),
        ({"pacs": "main=http://pacs.hospital.lan/dicom-web", "allow_plain_http": True}, False),  # the operator's call
        ({"callbacks": "lis=http://lis.hospital.lan/events", "callback_secret": "s" * 32}, True),
        ({"callbacks": "lis=https://lis.hospital.lan/events", "callback_secret": "s" * 32}, False),
    ],
)
def test_pacs_and_callbacks_off_this_host_speak_tls_unless_the_operator_allows_plain_http(settings, refused):
    from pydantic import ValidationError

    if refused:
        with pytest.raises(ValidationError, match="UGA_ALLOW_PLAIN_HTTP"):
            Settings(**settings)
    else:
        Settings(**settings)


def test_listed_clients_must_include_the_review_pages_own():
    page = {**OIDC, "oidc_client_id": "uga-review", "oidc_authorize_url": "https://idp.test/a"}
    page["oidc_token_url"] = "https://idp.test/t"
    with pytest.raises(ValidationError, match="UGA_OIDC_CLIENT_ID 'uga-review'"):
        Settings(**page, oidc_clients="lis-bridge")
    assert Settings(**page, oidc_clients="lis-bridge, uga-review").oidc_clients


def test_with_a_shared_database_the_runner_exports_the_store_metrics_unless_told():
    url = "postgresql://uga@db.hospital.lan/uga"
    assert Settings().store_metrics == "serve"  # one pod on SQLite: its serving process
    assert Settings(database_url=url).store_metrics == "runner"  # replicas: never once per replica
    assert Settings(database_url=url, store_metrics="serve").store_metrics == "serve"  # the operator's call
