"""Durable file writes: temp file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_dir(directory: Path) -> Path:
    """``directory``, created if missing with each new level synced into its parent (a power cut must
    not take a folder whose files were acknowledged)."""
    directory = Path(directory)
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)
    return directory


ATTEMPT_PREFIX = ".attempt-"  # a run's own folder inside its output folder, until its outputs are published


def publish_outputs(staging: Path, final: Path, remove_stale: bool = False) -> None:
    """Move a run's output files (each already durable) from ``staging`` into ``final``, so a run cut
    short never leaves a mix of old and new outputs there. ``remove_stale``: also remove the files of
    ``final`` this run did not make (a job's own directory; never a user's output directory)."""
    produced = {p.name for p in staging.iterdir() if p.is_file()}
    if remove_stale:
        for old in final.iterdir():
            if old.is_file() and not old.name.startswith(".") and old.name not in produced:
                old.unlink()
    for name in sorted(produced):
        os.replace(staging / name, final / name)
    fsync_dir(final)
    fsync_dir(final.parent)  # ``final`` itself may be new


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def commit_file(tmp_path: Path, path: Path) -> None:
    """fsync an already written temp file and rename it into place."""
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    fsync_dir(Path(path).parent)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quarantine(path: Path, data_dir: Path, kind: str) -> Path:
    """Move ``path`` to ``data_dir/orphans/kind/`` instead of deleting it: a folder the database does
    not know may be a crash's leftover, or the work of a store this process should not have opened
    (a wrong UGA_DATABASE_URL). An operator looks there; nothing is lost either way."""
    target_dir = Path(data_dir) / "orphans" / kind
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{path.name}-{int(time.time())}"
    os.replace(path, target)
    fsync_dir(target_dir)
    fsync_dir(path.parent)
    return target
