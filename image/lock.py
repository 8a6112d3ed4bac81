"""Write image/locks/<variant>.txt: every wheel an image installs, pinned by version and sha256.

    python image/lock.py [serve runner gpu]     (make lock)

pip resolves pyproject.toml's dependencies with the variant's extras for this host (Linux x86_64,
CPython 3.11, as the images) from the configured package index, without installing anything
(``pip install --dry-run --report``), and records the exact wheel it chose. image/build.sh downloads
only those files and the image installs them with ``--require-hashes``: a build never picks up a
newer release, and a wheel whose bytes changed on the index fails the build. Rerun after changing a
dependency; tests/test_image_lock.py says when a lock no longer satisfies pyproject.toml.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "image" / "locks"
EXTRAS = {"serve": "cpu,serve", "runner": "cpu,train", "gpu": "gpu,serve"}
PROJECT = "uga-serve"


def requirements(extras: str) -> list[str]:
    """pyproject.toml's dependencies and those of ``extras`` (comma-separated), as written there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for e in extras.split(",") for r in project["optional-dependencies"][e])]


def lock_inputs(extras: str) -> str:
    """sha256 of the requirements a lock answers: any change to them (a removal, a changed extra too)
    means the lock must be written again."""
    return hashlib.sha256("\n".join(requirements(extras)).encode()).hexdigest()


def host_problem() -> str | None:
    """Why this host cannot write the images' locks (pip resolves for the interpreter that runs it)."""
    host = (sys.platform, platform.machine(), sys.implementation.name, sys.version_info[:2])
    if host != ("linux", "x86_64", "cpython", (3, 11)):
        version = ".".join(map(str, sys.version_info[:2]))
        here = f"{sys.platform} {platform.machine()} {sys.implementation.name} {version}"
        return f"run it on Linux x86_64 with CPython 3.11, as the images (this is {here})"
    return None


def resolve(extras: str) -> list[dict]:
    """pip's installation report for this project with ``extras``, from wheels only."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--disable-pip-version-check", "--only-binary=:all:", "--report", str(report), f".[{extras}]"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            sys.exit(f"lock: error: pip could not resolve .[{extras}]: {last}")
        return json.loads(report.read_text())["install"]


def lock_lines(install: list[dict]) -> list[str]:
    """``name==version --hash=sha256:…`` for every wheel but this project's, sorted by name."""
    lines = []
    for item in install:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if name == PROJECT:
            continue
        digest = (item["download_info"].get("archive_info") or {}).get("hashes", {}).get("sha256")
        if not digest:
            sys.exit(f"lock: error: pip reported no sha256 for {name} {version}")
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    return sorted(lines, key=str.lower)


def main(variants: list[str]) -> None:
    unknown = sorted(set(variants) - set(EXTRAS))
    if unknown:
        sys.exit(f"lock: error: unknown variant {', '.join(unknown)} (known: {', '.join(EXTRAS)})")
    if why := host_problem():
        sys.exit(f"lock: error: {why}")
    LOCKS.mkdir(exist_ok=True)
    for variant in variants or list(EXTRAS):
        lines = lock_lines(resolve(EXTRAS[variant]))
        header = (
            f"# The {variant} image's wheels (uga-serve[{EXTRAS[variant]}]), written by `python image/lock.py "
            f"{variant}`.\n# Linux x86_64, CPython 3.11. Do not edit: change pyproject.toml and rerun it.\n"
            f"# inputs: {lock_inputs(EXTRAS[variant])}\n"
        )
        path = LOCKS / f"{variant}.txt"
        tmp = path.with_suffix(".part")
        tmp.write_text(header + "\n".join(lines) + "\n")
        tmp.replace(path)
        print(f"{path.relative_to(ROOT)}: {len(lines)} wheels")


if __name__ == "__main__":
    main(sys.argv[1:])
