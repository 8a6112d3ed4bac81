"""Schemathesis fuzzes the real server from its own OpenAPI schema: no input may cause a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import TOKENS, Server, wait_job

pytestmark = pytest.mark.e2e


def test_no_generated_request_causes_a_server_error(tmp_path, source_slide):
    st = Path(sys.executable).with_name("schemathesis")
    if not st.exists():
        pytest.skip("schemathesis not installed (dev extra)")
    (tmp_path / "slides").mkdir()
    shutil.copy(source_slide, tmp_path / "slides" / "a.tif")
    server = Server(tmp_path / "data", tmp_path / "slides").start()
    try:
        with server.client("admin") as c:  # a finished job and a queue give the fuzzer real resources
            r = c.post("/v1/jobs", json={"slide": "a.tif", "options": {"patch_um": 256, "queue_size": 3}})
            wait_job(c, r.json()["id"])
        proc = subprocess.run(
            [
                str(st),
                "run",
                f"{server.url}/v1/openapi.json",
                "--url",
                f"{server.url}/v1",
                "-H",
                f"Authorization: Bearer {TOKENS['admin']}",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "25",
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,  # schemathesis keeps state in ./.schemathesis
        )
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "passed" in proc.stdout
