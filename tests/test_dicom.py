"""A DICOM whole-slide series is one slide: read through wsidicom (concatenated instances included,
which OpenSlide refuses), named by its folder whichever instance is given, identified by its
SeriesInstanceUID, and segmented like any slide with its DICOM identifiers in the outputs."""

from __future__ import annotations

import shutil

import numpy as np
import openslide
import pytest

from service.wsi.slide import RegionReader, SlideError, open_slide
from tests.dicom import ACCESSION, DICOMIZER, check_fhir_report, dicomize
from tests.inprocess import InProcessService
from tests.server import wait_job

pytestmark = pytest.mark.skipif(DICOMIZER is None, reason="OrthancWSIDicomizer not installed (apt install orthanc-wsi)")
MPP = 0.5  # the generated slides' level-0 µm/px


@pytest.fixture(scope="module")
def series(tmp_path_factory, source_slide):
    root = tmp_path_factory.mktemp("dicom")
    slides = root / "slides"
    made = {layout: dicomize(source_slide, slides / "case-1" / f"series-{layout}", mpp=MPP, layout=layout)
            for layout in ("one", "default", "split")}  # fmt: skip
    return {"root": slides, **made}


@pytest.mark.parametrize("layout", ["one", "default", "split"])
def test_a_series_reads_like_its_source_tiff_by_folder_or_by_any_instance(series, source_slide, layout):
    folder = series[layout]
    instances = sorted(folder.glob("*.dcm"))
    with open_slide(source_slide) as tiff:
        reference = RegionReader(tiff, 2.0).read(100, 120, 200, 180).astype(float)
    for path in (folder, instances[0], instances[-1]):
        with open_slide(path) as slide:
            assert slide.path == folder and slide.dimensions == (2048, 2048)
            assert slide.mpp == pytest.approx(MPP) and slide.mpp_source == "metadata"
            assert slide.identifiers["AccessionNumber"] == ACCESSION and slide.identifiers["SeriesInstanceUID"]
            region = RegionReader(slide, 2.0).read(100, 120, 200, 180).astype(float)
            assert np.abs(region - reference).mean() < 4  # the same pixels, through JPEG once more


@pytest.mark.parametrize("layout", ["default", "split"])
def test_openslide_refuses_the_dicomizers_concatenated_output_and_wsidicom_reads_it(series, layout):
    first = sorted(series[layout].glob("*.dcm"))[0]
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(first))
    with open_slide(first) as slide:
        assert len(slide.handle.level_downsamples) >= 3
    if layout == "split":  # level 0 over several instances
        assert len(list(series[layout].glob("*.dcm"))) > len(slide.handle.level_downsamples)


def test_a_folder_with_two_series_is_refused_with_a_reason(series, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(series["one"], mixed)
    for i, f in enumerate(sorted(series["default"].glob("*.dcm"))):
        shutil.copy(f, mixed / f"other-{i}.dcm")
    with pytest.raises(SlideError, match="2 DICOM series"):
        open_slide(mixed)


@pytest.mark.slow  # over 5 s on 2 cores: not in make test-fast
def test_a_series_is_one_job_however_it_is_named_and_its_outputs_carry_its_identifiers(series, tmp_path):
    svc = InProcessService(tmp_path / "data", series["root"])
    try:
        with svc.client("annotator") as c:
            options = {"patch_um": 512, "queue_size": 2}
            r = c.post("/v1/jobs", json={"slide": "case-1/series-one", "options": options})
            assert r.status_code == 202, r.text
            job = wait_job(c, r.json()["id"])
            instance = sorted(series["one"].glob("*.dcm"))[1].name
            again = c.post("/v1/jobs", json={"slide": f"case-1/series-one/{instance}", "options": options})
            assert again.status_code == 200 and again.json()["id"] == job["id"]  # the same series: the same job
            assert job["state"] == "succeeded", job["error"]
            assert job["slide"] == "case-1/series-one"
            ids = job["summary"]["source_identifiers"]
            assert ids["AccessionNumber"] == ACCESSION and ids["SeriesInstanceUID"] and ids["StudyInstanceUID"]
            by_instance = c.get("/v1/queue", params={"slide": f"case-1/series-one/{instance}", "k": 5}).json()
            by_folder = c.get("/v1/queue", params={"slide": "case-1/series-one", "k": 5}).json()
            assert by_instance["items"] == by_folder["items"] and len(by_folder["items"]) == 2  # one queue
            pooled = c.get("/v1/queue", params={"k": 50}).json()["items"]
            assert {i["slide"] for i in pooled} == {"case-1/series-one"}
            report = c.get(job["artifacts"]["fhir_report"]).json()
            features = c.get(job["artifacts"]["geojson"]).json()["features"]
            assert all(f["properties"]["source_identifiers"] == ids for f in features)
            queue = c.get(job["artifacts"]["queue"]).json()
            assert queue and all(item["source_identifiers"] == ids for item in queue)
            seg = c.get(job["artifacts"]["dicom_seg"])
            assert seg.headers["content-type"] == "application/dicom"
            mask_tif = c.get(job["artifacts"]["mask"]).content
    finally:
        svc.close()
    check_seg(tmp_path, seg.content, mask_tif, ids)
    check_fhir_report(report, job)
    values = {i.get("id"): i["value"] for i in report["identifier"]}
    assert values["SeriesInstanceUID"] == f"urn:oid:{ids['SeriesInstanceUID']}"
    assert ACCESSION in [i["value"] for i in report["identifier"]]


def check_seg(tmp_path, seg_bytes: bytes, mask_tif: bytes, ids: dict) -> None:
    """The SEG reads back (highdicom) as the job's mask, refers to the source series, and validates."""
    import subprocess

    import pydicom

    from service.integrations.dicom_seg import seg_mask

    (tmp_path / "seg.dcm").write_bytes(seg_bytes)
    (tmp_path / "mask.tif").write_bytes(mask_tif)
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == ids["StudyInstanceUID"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ids["SeriesInstanceUID"]
    mask = seg_mask(tmp_path / "seg.dcm")
    with open_slide(tmp_path / "mask.tif") as job_mask:  # the job ran at 1 µm/px: the SEG level is 1 µm/px
        expected = RegionReader(job_mask, 1.0).read(0, 0, *mask.shape)[..., 0] > 127
    assert mask.shape == (1024, 1024) and (mask == expected).mean() > 0.999 and mask.any()
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(tmp_path / "seg.dcm")], capture_output=True, text=True)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


@pytest.mark.parametrize("layout", ["one", "default", "split"])
def test_a_series_has_the_deep_zoom_tiles_of_its_source(series, source_slide, layout):
    """The review page's viewer: OpenSlide's DeepZoomGenerator over the wsidicom handle, every level."""
    import io

    from PIL import Image

    from service.wsi.deepzoom import DeepZoomSlides

    tiles = DeepZoomSlides(cache_bytes=1 << 20, max_open=2)
    dz = tiles.descriptor(series[layout])
    assert (dz.width, dz.height, dz.levels) == (2048, 2048, tiles.descriptor(source_slide).levels)
    for level, col, row in ((dz.levels - 1, 1, 1), (dz.levels - 3, 0, 0), (3, 0, 0)):
        got, want = (
            np.asarray(Image.open(io.BytesIO(tiles.tile(path, level, col, row)))).astype(float)
            for path in (series[layout], source_slide)
        )
        assert got.shape == want.shape and np.abs(got - want).mean() < 6, (level, col, row)
