"""Readiness (/readyz semantics) and auth configuration of a serving process."""

import sqlite3

import pytest

from service.config import Settings
from service.http.auth import AuthConfigError, TokenAuth, parse_tokens
from service.http.runtime import Runtime
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


def test_auth_must_be_configured_or_explicitly_disabled(caplog):
    with pytest.raises(AuthConfigError, match="no API tokens configured"):
        TokenAuth([], disabled=False)
    auth = TokenAuth([], disabled=True)
    assert "AUTH IS DISABLED" in caplog.text
    assert auth.authenticate(None).role == "admin"


def test_tokens_parse_and_roles_are_checked():
    entries = parse_tokens("# ops\nadmin AAAAAAAAAAAAAAAAAAAA\nviewer:BBBBBBBBBBBBBBBBBBBB")
    auth = TokenAuth(entries)
    assert auth.authenticate("Bearer AAAAAAAAAAAAAAAAAAAA").role == "admin"
    assert auth.authenticate("Bearer BBBBBBBBBBBBBBBBBBBB").allows("viewer")
    assert not auth.authenticate("Bearer BBBBBBBBBBBBBBBBBBBB").allows("annotator")
    assert auth.authenticate("Bearer nope") is None and auth.authenticate(None) is None
    assert auth.authenticate("Basic AAAAAAAAAAAAAAAAAAAA") is None
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        parse_tokens("admin short")
    with pytest.raises(AuthConfigError, match="placeholder"):
        parse_tokens((REPO / "k8s" / "base" / "tokens").read_text())  # the manifests' Secret must be replaced
    with pytest.raises(AuthConfigError, match="ROLE TOKEN"):
        parse_tokens("root AAAAAAAAAAAAAAAAAAAA")
