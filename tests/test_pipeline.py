"""End to end through real OpenSlide reads, the real ONNX ensemble and real TIFF/PNG/GeoJSON writers."""

import json
import os

import numpy as np
import openslide
import pytest
from PIL import Image

from service.inference.engine import segment
from service.inference.evaluation import dice as _dice
from service.inference.evaluation import overlap_with_truth
from service.inference.pipeline import run_segmentation
from service.options import SegmentationOptions
from service.wsi.slide import RegionReader, open_slide


def _check_artifacts(out, summary, level0_dims, mpp=1.0):
    for name in ("mask", "probability", "entropy", "mutual_information", "uga"):
        s = openslide.OpenSlide(str(out / summary["artifacts"][name]))
        assert s.level_count >= 2
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp)
        w, h = s.dimensions
        assert abs(w * mpp - level0_dims[0] * summary["slide_mpp"]) <= 2 * mpp
        assert abs(h * mpp - level0_dims[1] * summary["slide_mpp"]) <= 2 * mpp
    png = Image.open(out / "overlay.png")
    assert png.size[0] > 800 and png.mode in ("RGB", "RGBA")
    gj = json.loads((out / "annotations.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    review = [f for f in gj["features"] if f["properties"]["classification"]["name"] == "Review"]
    assert len(review) == summary["queue"]["size"]
    assert all(f["properties"]["measurements"]["rank"] >= 1 for f in review)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_real_cmu_svs_end_to_end(cmu_svs, baseline, tmp_path):
    out = tmp_path / "cmu"
    summary = run_segmentation(cmu_svs, out, baseline, SegmentationOptions(queue_size=4, patch_um=256))
    assert summary["slide_vendor"] == "aperio"
    assert summary["slide_mpp"] == pytest.approx(0.499)
    assert summary["providers"] == ["CPUExecutionProvider"]
    assert summary["model_version"].startswith("baseline-")
    assert 0.3 < summary["tissue_area_mm2"] < 1.5  # CMU small region: ~1.1 x 1.5 mm, about 40% tissue
    assert summary["tiles"]["computed"] < summary["tiles"]["grid"]  # glass tiles were never read
    assert (out / "novelty.tif").exists() and summary["novelty"]["out_of_distribution"] is False  # real H&E
    queue = json.loads((out / "queue.json").read_text())
    assert 1 <= len(queue) <= 4
    assert all(q["model_version"] == summary["model_version"] for q in queue)
    _check_artifacts(out, summary, (2220, 2967))


def test_composite_source_slide_dice_against_its_mask(source_slide, baseline, tmp_path):
    slide = open_slide(source_slide)
    res = segment(slide, baseline, tmp_path / "w", SegmentationOptions())
    dice = overlap_with_truth(res.maps["probability"], source_slide.with_name(source_slide.stem + ".mask.tif"), 1.0)
    assert dice.dice >= 0.85  # held-out slide of the training centre
    res.close()


@pytest.mark.slow  # over 5 s on 2 cores: not in make test-fast
def test_out_of_domain_slide_is_worse_and_more_uncertain(source_slide, ood_slide, baseline, tmp_path):
    results, dice = {}, {}
    for name, path in (("source", source_slide), ("ood", ood_slide)):
        out = tmp_path / name
        summary = run_segmentation(path, out, baseline, SegmentationOptions(queue_size=3, patch_um=256))
        prob = openslide.OpenSlide(str(out / "probability.tif"))
        w, h = prob.dimensions
        results[name] = summary
        assert summary["queue"]["size"] == 3
        _check_artifacts(out, summary, open_slide(path).dimensions)
        assert (w, h) == (1024, 1024)
        truth = path.with_name(path.stem + ".mask.tif")
        pred = np.asarray(openslide.OpenSlide(str(out / "mask.tif")).read_region((0, 0), 0, (w, h)))[..., 0]
        gt = RegionReader(open_slide(truth), 1.0).read(0, 0, h, w)[..., 0]
        dice[name] = _dice(pred > 127, gt > 127)
    assert dice["ood"] < dice["source"] - 0.2
    assert results["ood"]["mean_uncertainty"]["uga"] > results["source"]["mean_uncertainty"]["uga"]


def test_measure_choice_changes_ranking_field(source_slide, baseline, tmp_path):
    s = run_segmentation(
        source_slide,
        tmp_path / "mi",
        baseline,
        SegmentationOptions(uncertainty="mutual_information", scoring="paper", queue_size=2, patch_um=256),
    )
    q = json.loads((tmp_path / "mi" / "queue.json").read_text())
    assert s["queue"]["measure"] == "mutual_information"
    assert all(i["measure"] == "mutual_information" and i["scoring"] == "paper" for i in q)
    assert np.all(np.diff([i["score"] for i in q]) <= 0)


@pytest.mark.slow  # over 5 s on 2 cores: not in make test-fast
def test_the_cells_split_tissue_into_called_tumour_and_called_normal(source_slide, baseline, tmp_path):
    """The negative scoring's sums: the tissue the model calls normal, and the measure over it, add up."""
    from service.inference.analysis import analyse

    res = segment(open_slide(source_slide), baseline, tmp_path / "w", SegmentationOptions())
    analysis = analyse(res, tmp_path / "w", measure="uga", threshold=0.5)
    cells = analysis.cells
    assert cells.negative.sum() == pytest.approx(analysis.tissue_px - analysis.tumour_px)
    assert 0 < cells.negative.sum() < cells.tissue.sum()
    assert np.all(cells.negative <= cells.tissue) and np.all(cells.negative_uncertainty <= cells.uncertainty + 1e-6)
    res.close()
    out = tmp_path / "negative"
    summary = run_segmentation(source_slide, out, baseline, SegmentationOptions(scoring="negative", queue_size=3))
    queue = json.loads((out / "queue.json").read_text())
    assert summary["queue"]["scoring"] == "negative" and len(queue) == 3
    assert all(i["scoring"] == "negative" for i in queue) and np.all(np.diff([i["score"] for i in queue]) <= 0)


def test_the_summary_reports_the_patch_side_as_cut_when_it_snaps_to_whole_cells(source_slide, baseline, tmp_path):
    """At 4 µm/px a 100 µm patch is 25 px, less than one 64-px cell: it is cut at one cell, 256 µm."""
    out = tmp_path / "coarse"
    summary = run_segmentation(source_slide, out, baseline, SegmentationOptions(mpp=4.0, patch_um=100, queue_size=2))
    queue = json.loads((out / "queue.json").read_text())
    assert summary["queue"]["patch_um"] == 256 and summary["queue"]["requested_patch_um"] == 100
    assert queue and all(i["bbox_um"]["width"] == 256 for i in queue)


def test_a_selection_the_model_cannot_serve_is_refused_before_any_work(source_slide, tmp_path):
    """A diversity selection on a model without an embedding: refused at once, not after segmenting."""
    from service.errors import Unprocessable
    from service.inference.ensemble import load_ensemble
    from tests.tiny_model import tiny_model_dir

    plain = load_ensemble(tiny_model_dir(tmp_path / "model", novelty=False))
    out = tmp_path / "job"
    with pytest.raises(Unprocessable) as err:
        run_segmentation(source_slide, out, plain, SegmentationOptions(selection="representative", queue_size=2))
    assert err.value.code == "selection_needs_embedding"
    assert not out.exists()  # nothing was started


def test_a_job_that_fails_after_its_maps_started_leaves_none_of_them(source_slide, baseline, tmp_path, monkeypatch):
    """Map TIFFs are written beside the analysis; if the job then fails (here the overlay cannot be
    drawn: an injected fault), the maps already written go with it: no maps without a summary."""
    from service.inference import outputs

    def broken_overlay(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(outputs, "overlay_png", broken_overlay)
    out = tmp_path / "job"
    with pytest.raises(OSError, match="No space left"):
        run_segmentation(source_slide, out, baseline, SegmentationOptions())
    assert not list(out.glob("*.tif")) and not list(out.glob("*.json")) and not list(out.glob(".work-*"))


def test_a_failed_run_removes_its_own_maps_but_never_another_workers(source_slide, baseline, tmp_path, monkeypatch):
    """A run that lost its job (requeued after a stale heartbeat) while a second worker wrote the same
    job's maps must not remove the second worker's files when it fails: only files it wrote itself."""
    from service.inference import outputs

    out = tmp_path / "job"
    real_writer = outputs.write_map_tiff

    def then_another_worker_writes(out_dir, name, raster, mpp):
        identity = real_writer(out_dir, name, raster, mpp)
        if name == "mask":  # the other worker's mask.tif lands after this run's
            theirs = out_dir / ".theirs.part"
            theirs.write_bytes(b"the other worker's mask")
            os.replace(theirs, out_dir / "mask.tif")
        return identity

    def broken_overlay(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(outputs, "write_map_tiff", then_another_worker_writes)
    monkeypatch.setattr(outputs, "overlay_png", broken_overlay)
    with pytest.raises(OSError, match="No space left"):
        run_segmentation(source_slide, out, baseline, SegmentationOptions())
    assert (out / "mask.tif").read_bytes() == b"the other worker's mask"
    assert [p.name for p in out.glob("*.tif")] == ["mask.tif"]  # this run's other maps are gone
    assert not list(out.glob("*.part")) and not list(out.glob(".*.part"))
