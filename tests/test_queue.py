import numpy as np
import pytest

from service.inference.queue import CellStats, build_queue, score_candidates, select_non_overlapping


def _stats(unc: np.ndarray, tissue: np.ndarray | None = None, cell: int = 4) -> CellStats:
    tissue = np.full(unc.shape, cell * cell, float) if tissue is None else tissue
    return CellStats(cell, tissue, unc * tissue, np.zeros_like(unc), np.zeros_like(unc))


def _boxes_overlap(a, b):
    ax, ay, aw = a["x"], a["y"], a["width"]
    bx, by, bw = b["x"], b["y"], b["width"]
    return ax < bx + bw and bx < ax + aw and ay < by + bw and by < ay + aw


def test_ranking_is_by_score_and_boxes_never_overlap():
    rng = np.random.default_rng(0)
    unc = rng.uniform(0, 1, (20, 20))
    items = build_queue(
        _stats(unc),
        patch_px=12,
        top=8,
        scoring="mean",
        min_tissue=0.5,
        mpp=1.0,
        level0_mpp=0.5,
        slide_key="s",
        measure="uga",
        model_version="v1",
    )
    assert [i["rank"] for i in items] == list(range(1, 9))
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    boxes = [i["bbox_level0"] for i in items]
    assert all(not _boxes_overlap(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1 :])
    assert boxes[0]["width"] == 24  # 12 analysis px at 1 µm = 24 level-0 px at 0.5 µm
    assert items[0]["bbox_um"]["width"] == 12.0


def test_best_patch_is_the_uncertain_region():
    unc = np.zeros((12, 12))
    unc[6:9, 3:6] = 1.0  # a 3x3-cell hot spot
    cands = score_candidates(_stats(unc), 3)
    best = select_non_overlapping(cands, 3, 1)[0]
    assert (best.row, best.col) == (6, 3)
    assert best.mean_uncertainty == pytest.approx(1.0)


def test_patches_without_enough_tissue_are_not_candidates():
    unc = np.ones((6, 6))
    tissue = np.zeros((6, 6))
    tissue[:2, :2] = 16
    cands = score_candidates(_stats(unc, tissue), 2, min_tissue=0.75)  # neighbours have 2/4 cells
    assert [(c.row, c.col) for c in cands] == [(0, 0)]
    # mean is over tissue pixels only
    assert cands[0].mean_uncertainty == pytest.approx(1.0)


def test_paper_scoring_counts_pixels_above_fraction_of_max():
    unc = np.full((4, 8), 0.1)
    stats = _stats(unc)
    stats.above[:, 4:] = 5  # 5 pixels above 0.8 x max in each right-hand cell
    cands = score_candidates(stats, 2, scoring="paper")
    best = select_non_overlapping(cands, 2, 1)[0]
    assert best.col >= 4
    assert best.score == pytest.approx(100 * 20 + 0.1 * 64)


def test_negative_scoring_ranks_by_the_uncertainty_of_the_tissue_called_normal():
    """The region score for missed tumour: a patch the model calls all tumour, however uncertain, loses
    to one whose predicted-normal tissue is uncertain; a patch with no predicted-normal tissue scores 0."""
    unc = np.full((4, 8), 0.2)
    unc[:, :4] = 0.9  # the left half is the most uncertain over all its tissue ...
    stats = _stats(unc)
    stats.negative = np.full(unc.shape, 16.0)
    stats.negative[:, :4] = 0  # ... but the model calls all of it tumour
    stats.negative_uncertainty = stats.negative * unc
    stats.negative_uncertainty[:, 6:] = stats.negative[:, 6:] * 0.7  # uncertain normal on the right
    by_mean = select_non_overlapping(score_candidates(stats, 2, scoring="mean"), 2, 1)[0]
    by_negative = select_non_overlapping(score_candidates(stats, 2, scoring="negative"), 2, 1)
    assert by_mean.col < 4 and by_negative[0].col == 6
    assert by_negative[0].score == pytest.approx(0.7)
    left = [c for c in score_candidates(stats, 2, scoring="negative") if c.col + 2 <= 4]
    assert left and all(c.score == 0 for c in left)
    with pytest.raises(ValueError, match="predicted-normal"):
        score_candidates(_stats(unc), 2, scoring="negative")


def test_excluded_items_leave_the_queue():
    unc = np.random.default_rng(1).uniform(0, 1, (10, 10))
    kw = dict(
        patch_px=8,
        top=3,
        scoring="mean",
        min_tissue=0.5,
        mpp=1.0,
        level0_mpp=1.0,
        slide_key="s",
        measure="uga",
        model_version="v",
    )
    first = build_queue(_stats(unc), **kw)
    b = first[0]["bbox_level0"]
    again = build_queue(_stats(unc), reviewed=[(b["x"], b["y"], b["width"], b["height"])], **kw)
    assert first[0]["id"] not in {i["id"] for i in again}
    assert again[0]["rank"] == 1


def test_reviewed_tissue_stays_out_whatever_the_new_patch_size():
    """A 4x4-cell patch reviewed at an old, larger patch size: no 2x2-cell patch overlapping it returns,
    while patches beside it (edges touching) still may."""
    unc = np.zeros((12, 12))
    unc[2:6, 2:6] = 1.0  # the reviewed region is the most uncertain
    unc[2:6, 6:8] = 0.5  # its neighbour to the right
    kw = dict(patch_px=8, top=3, scoring="mean", min_tissue=0.5, mpp=1.0, level0_mpp=1.0)
    kw |= dict(slide_key="s", measure="uga", model_version="v")
    reviewed = [(8, 8, 16, 16)]  # cells 2..5 at 4 px per cell
    items = build_queue(_stats(unc), reviewed=reviewed, **kw)
    for i in items:
        b = i["bbox_level0"]
        assert b["x"] >= 24 or b["x"] + b["width"] <= 8 or b["y"] >= 24 or b["y"] + b["height"] <= 8, b
    assert items[0]["bbox_level0"]["x"] == 24  # the neighbour, right against the reviewed box


def test_no_patch_reaches_past_the_slide_edge():
    # a 6000-px slide at 0.5 µm/px = 3000 analysis px = 46.9 cells of 64: the last cell row is partial
    unc = np.zeros((47, 47))
    unc[-16:, -16:] = 1.0  # the most uncertain tissue lies in the partial edge cells
    kwargs = dict(patch_px=1024, top=5, scoring="mean", min_tissue=0.5, mpp=1.0, level0_mpp=0.5)
    common = dict(slide_key="s", measure="uga", model_version="v1")
    stats = _stats(unc, cell=64)
    unbounded = build_queue(stats, **kwargs, **common)
    assert any(i["bbox_level0"]["y"] + i["bbox_level0"]["height"] > 6000 for i in unbounded)  # the old behaviour
    items = build_queue(stats, **kwargs, **common, level0_size=(6000, 6000))
    assert items and all(
        i["bbox_level0"]["x"] + i["bbox_level0"]["width"] <= 6000
        and i["bbox_level0"]["y"] + i["bbox_level0"]["height"] <= 6000
        for i in items
    )
