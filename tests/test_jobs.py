"""A job's identity: one resolved option set, so any option that changes the result gives a new job."""

from __future__ import annotations

import shutil

import pytest

from service.config import Settings
from service.errors import InvalidInput
from service.loop.jobs import submit_segmentation
from service.options import REQUEST_FIELDS, SegmentationOptions
from service.store import Store

# For every option, a valid value other than its default (a new option must be added here).
OTHER_VALUE = {
    "mpp": 2.0,
    "tile": 128,
    "overlap": 16,
    "batch": 4,
    "threshold": 0.4,
    "uncertainty": "entropy",
    "scoring": "paper",
    "selection": "class_balanced",
    "queue_size": 3,
    "patch_um": 512.0,
    "min_tissue": 0.3,
    "slide_mpp": 0.5,
}


@pytest.fixture()
def setup(tmp_path, source_slide):
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(source_slide, root / "a.tif")
    return Store(tmp_path / "data"), Settings(data_dir=tmp_path / "data", slide_root=root)


def test_every_option_has_an_alternative_value():
    assert set(OTHER_VALUE) == set(SegmentationOptions.model_fields)


@pytest.mark.parametrize("option", sorted(OTHER_VALUE))
def test_changing_any_option_in_settings_or_request_gives_a_new_job(setup, option):
    store, settings = setup
    first, created = submit_segmentation(store, settings, "a.tif", {}, model_version="v1", actor="t")
    assert created
    again, created = submit_segmentation(store, settings, "a.tif", {}, model_version="v1", actor="t")
    assert not created and again.id == first.id
    by_request = None
    if option in REQUEST_FIELDS:  # the option chosen by a client
        by_request, created = submit_segmentation(
            store, settings, "a.tif", {option: OTHER_VALUE[option]}, model_version="v1", actor="t"
        )
        assert created and by_request.id != first.id and by_request.resolved[option] == OTHER_VALUE[option]
    if option in type(settings).model_fields:  # the deployment's default changed (e.g. UGA_MIN_TISSUE)
        changed = settings.model_copy(update={option: OTHER_VALUE[option]})
        job, created = submit_segmentation(store, changed, "a.tif", {}, model_version="v1", actor="t")
        assert job.id != first.id and job.resolved[option] == OTHER_VALUE[option]
        # the same resolved options are the same job, whether a client or the settings chose them
        assert (not created and job.id == by_request.id) if by_request else created


def test_a_new_model_version_gives_a_new_job(setup):
    store, settings = setup
    a, _ = submit_segmentation(store, settings, "a.tif", {}, model_version="v1", actor="t")
    b, created = submit_segmentation(store, settings, "a.tif", {}, model_version="v2", actor="t")
    assert created and a.id != b.id


def test_an_invalid_option_set_is_one_line_naming_the_option():
    with pytest.raises(InvalidInput) as exc:
        SegmentationOptions.resolve(Settings(), {"mpp": -1})
    assert exc.value.code == "invalid_options" and exc.value.message.startswith("mpp:")
    with pytest.raises(InvalidInput, match="multiple of 8"):
        SegmentationOptions.resolve(Settings(), {"tile": 132})


def test_bad_deployment_settings_fail_at_start_not_in_every_request():
    with pytest.raises(ValueError, match="multiple of 8"):
        Settings(tile=132)
