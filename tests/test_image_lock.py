"""The images' locks (image/locks/): every wheel pinned by version and sha256, and each lock still
satisfies pyproject.toml's dependencies for its role, so a changed dependency cannot ship unlocked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "image"))
from lock import EXTRAS, LOCKS, lock_inputs, requirements  # noqa: E402

ENTRY = re.compile(r"^([A-Za-z0-9._-]+)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", re.M)


def read_lock(path: Path) -> dict[str, Version]:
    """{canonical name: pinned version}; fails on any line that is not a hashed exact pin."""
    variant, text = path.stem, path.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    entries = ENTRY.findall(body)
    assert ENTRY.sub("", body).strip() == "", f"{variant}: a line that is not `name==version --hash=sha256:…`"
    pins = {canonicalize_name(name): Version(version) for name, version, _ in entries}
    assert len(pins) == len(entries), f"{variant}: a package pinned twice"
    return pins


@pytest.mark.parametrize("variant", sorted(EXTRAS))
def test_each_lock_pins_every_dependency_of_its_role_by_version_and_hash(variant):
    path = LOCKS / f"{variant}.txt"
    pins = read_lock(path)
    assert f"# inputs: {lock_inputs(EXTRAS[variant])}\n" in path.read_text(), (
        f"pyproject.toml's dependencies for {variant} changed since {path.name} was written: run make lock"
    )
    for req in map(Requirement, requirements(EXTRAS[variant])):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in image/locks/{variant}.txt: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"image/locks/{variant}.txt pins {name} {pins[name]}, pyproject.toml asks {req}: run make lock"
        )
    assert "uga-serve" not in pins  # the project itself is built from the checkout
    onnx_runtimes = {"onnxruntime", "onnxruntime-gpu"} & set(pins)
    assert onnx_runtimes == ({"onnxruntime-gpu"} if variant == "gpu" else {"onnxruntime"})  # never both
    assert ("torch" in pins) == (variant == "runner")  # torch never in a serving image


def test_the_lock_check_refuses_an_unhashed_or_inexact_pin(tmp_path):
    path = tmp_path / "serve.txt"
    for body in ("numpy==2.4.6\n", "numpy>=2 \\\n    --hash=sha256:" + "0" * 64 + "\n"):
        path.write_text(body)
        with pytest.raises(AssertionError, match="not `name==version"):
            read_lock(path)


def test_lock_refuses_an_unknown_variant_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "image" / "lock.py"), "servr"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == "lock: error: unknown variant servr (known: serve, runner, gpu)"


def test_lock_refuses_a_host_unlike_the_images(monkeypatch):
    import lock

    assert lock.host_problem() is None  # this machine: Linux x86_64, CPython 3.11, as the images
    monkeypatch.setattr(lock.platform, "machine", lambda: "aarch64")
    assert "this is linux aarch64 cpython 3.11" in lock.host_problem()
