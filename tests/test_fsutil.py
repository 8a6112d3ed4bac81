"""Durable writes: what the service acknowledged survives a power cut."""

from __future__ import annotations

from service import fsutil


def test_a_new_folder_is_synced_into_its_parent_level_by_level(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(fsutil, "fsync_dir", lambda d: synced.append(d))
    made = fsutil.durable_dir(tmp_path / "data" / "corrections")
    assert made.is_dir()
    assert synced == [tmp_path, tmp_path / "data"]  # data/ into tmp, then corrections/ into data/
    synced.clear()
    fsutil.durable_dir(tmp_path / "data" / "corrections")  # there already: nothing to sync
    assert synced == []
