"""bentofile.yaml: `bentoml build` works offline and packages what serving needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # over 5 s on 2 cores: not in make test-fast
def test_bentofile_builds_a_bento_with_service_and_baseline(tmp_path):
    """`bentoml build` (offline: lock_packages false) packages the service and the shipped model."""
    bentoml = Path(sys.executable).with_name("bentoml")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "true"}
    proc = subprocess.run([str(bentoml), "build", str(REPO)], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (bento,) = [p for p in (tmp_path / "bentos" / "uga-serve").iterdir() if p.name != "latest"]
    src = bento / "src"
    for rel in (
        "service/api.py",
        "service/cli.py",
        "service/inference/fonts/DejaVuSans.ttf",  # the overlay PNG's font
        "models/baseline/ensemble.onnx",
        "models/baseline/card.json",
    ):
        assert (src / rel).is_file(), rel
    assert not (src / "tests").exists() and not (src / "data").exists()
    meta = (bento / "bento.yaml").read_text()
    assert "service.api:UGAService" in meta
