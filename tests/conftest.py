"""Shared fixtures: real H&E sources (fetched once), small composite slides, the shipped baseline."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sources():
    from models.data.sources import ensure_sources

    return ensure_sources()


@pytest.fixture(scope="session")
def cmu_svs(sources) -> Path:
    return sources.cmu_svs_path


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


def _slide(slide_dir: Path, sources, centre: str, seed: int, size=(2048, 2048), **kw) -> Path:
    from models.data.slidegen import build_slide

    path = slide_dir / f"{centre}-{seed}.tif"
    if not path.exists():
        build_slide(path, size=size, centre=centre, seed=seed, sources=sources, **kw)
    return path


@pytest.fixture(scope="session")
def source_slide(slide_dir, sources) -> Path:
    """A held-out source-centre slide (seed never used in training)."""
    return _slide(slide_dir, sources, "source", 9001)


@pytest.fixture(scope="session")
def ood_slide(slide_dir, sources) -> Path:
    return _slide(slide_dir, sources, "mixed", 9001)


@pytest.fixture(scope="session")
def baseline():
    from service.inference.ensemble import load_ensemble

    return load_ensemble(REPO / "models" / "baseline", threads=2)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (skipped, saying why, where none can run)."""
    from tests.postgres import PostgresServer

    why = PostgresServer.available()
    if why:
        pytest.skip(why)
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def database_url(request) -> str | None:
    """Each backend in turn: None (SQLite in the data directory) or a fresh PostgreSQL database
    (a server process: in the e2e tier, not in `make test-fast`)."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()
