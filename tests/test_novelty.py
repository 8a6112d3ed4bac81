"""Feature-space novelty (issue 14, uncertainty that sees what disagreement misses): fitted on source
features, computed inside the ONNX graph, stitched into a map, summarised into a slide-level flag."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from models.novelty import fit_gaussian, member_features, novelty_for, novelty_scores
from service.inference.ensemble import ModelError, load_ensemble
from service.inference.pipeline import run_segmentation
from service.options import SegmentationOptions
from tests.tiny_model import noise_tiles, tiny_members, write_model_dir


def test_mahalanobis_of_gaussian_data_is_about_one_per_feature():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    x = rng.normal(size=(20000, 6)) @ a + 3.0
    mean, precision = fit_gaussian(x, shrinkage=0.0)
    centred = rng.normal(size=(5000, 6)) @ a + 3.0 - mean
    assert abs(np.einsum("nc,dc,nd->n", centred, precision, centred).mean() / 6 - 1) < 0.05
    far = centred + 10 * np.abs(a).sum(axis=0)
    assert np.einsum("nc,dc,nd->n", far, precision, far).mean() / 6 > 10


def test_the_onnx_graph_computes_the_reference_novelty_and_far_data_scores_higher(tmp_path):
    members = tiny_members()
    source = noise_tiles(16)
    stats, card = novelty_for(members, source)
    ens = load_ensemble(write_model_dir(tmp_path, members, features=stats, novelty_card=card))
    assert ens.novelty and ens.novelty_threshold == card["threshold"] > 0
    out = ens.predict_outputs(source[:4])
    probs, novelty, embedding = out["member_probs"], out["novelty"], out["embedding"]
    assert probs.shape == (4, 2, 64, 64) and novelty.shape == (4, 1, 8, 8) and embedding.shape == (4, 8, 8, 8)
    reference = novelty_scores(members, stats, source[:4]).reshape(4, 8, 8)
    assert np.allclose(novelty[:, 0], reference, rtol=1e-3, atol=1e-3)
    # the embedding: the first member's features on whitened principal components (unit variance on source)
    features = member_features(members[0], source[:4]) - stats.embed_mean.numpy()
    expected = (features @ stats.embed_projection.numpy().T).reshape(4, 8, 8, 8).transpose(0, 3, 1, 2)
    assert np.allclose(embedding, expected, atol=1e-3) and ens.embedding_dims == 8
    # untrained members normalise colour away (GroupNorm): what differs for them is structure
    rng = np.random.default_rng(1)
    blobs = [ndimage.gaussian_filter(rng.normal(128, 80, (64, 64, 3)), (4, 4, 0)) * 3 - 200 for _ in range(4)]
    unlike = np.clip(np.stack(blobs), 0, 255).astype(np.uint8)
    assert ens.predict_outputs(unlike)["novelty"].mean() > 1.5 * novelty.mean()
    assert np.array_equal(ens.predict(source[:4]), probs)


def test_a_novelty_graph_needs_its_threshold_on_the_card(tmp_path):
    members = tiny_members()
    stats, _ = novelty_for(members, noise_tiles(8))
    with pytest.raises(ModelError, match="novelty.threshold"):
        load_ensemble(write_model_dir(tmp_path, members, features=stats))


@pytest.mark.slow  # 10 s: a whole slide through the novelty head
def test_a_slide_gets_a_novelty_map_a_verdict_and_a_diverse_queue(tmp_path, source_slide):
    members = tiny_members()
    stats, card = novelty_for(members, noise_tiles(16))
    options = SegmentationOptions(queue_size=3, patch_um=128, selection="uncertainty_diversity")
    with_novelty = run_segmentation(
        source_slide,
        tmp_path / "out",
        load_ensemble(write_model_dir(tmp_path, members, features=stats, novelty_card=card)),
        options,
    )
    verdict = with_novelty["novelty"]
    assert with_novelty["artifacts"]["novelty"] == "novelty.tif" and (tmp_path / "out" / "novelty.tif").exists()
    assert 0 <= verdict["share_beyond_threshold"] <= 1 and verdict["threshold"] == card["threshold"]
    assert verdict["out_of_distribution"] == (verdict["share_beyond_threshold"] > card["flag_share"])
    assert set(with_novelty["mean_uncertainty"]) == {"uga", "entropy", "mutual_information"}
    queue = json.loads((tmp_path / "out" / "queue.json").read_text())  # the embedding reached the queue
    assert len(queue) == 3 and {i["selection"] for i in queue} == {"uncertainty_diversity"}
    assert not [f for f in (tmp_path / "out").iterdir() if "embedding" in f.name]  # internal, never a file
    plain_model = load_ensemble(write_model_dir(tmp_path, members, version="tiny-plain"))
    plain = run_segmentation(source_slide, tmp_path / "plain", plain_model, SegmentationOptions(queue_size=3))
    assert "novelty" not in plain and not (tmp_path / "plain" / "novelty.tif").exists()  # no output, no verdict
    assert plain["mean_uncertainty"] == with_novelty["mean_uncertainty"]  # the same members, the same maps


def _stained(rng: np.random.Generator, n: int, stains: list[np.ndarray], scale: float = 1.0) -> np.ndarray:
    """(n, 64, 64, 3) uint8 tiles whose optical density mixes ``stains`` with random local amounts."""
    amounts = rng.uniform(0.1, 0.8, (n, 64, 64, len(stains))) * scale
    od = amounts @ np.stack([s / np.linalg.norm(s) for s in stains])
    return np.clip(256 * np.exp(-od) - 1, 0, 255).astype(np.uint8)


def test_a_stain_outside_the_source_plane_is_novel_where_a_stronger_h_and_e_is_not(tmp_path):
    """Colour-blind features cannot see a third chromogen; the stain term does: OD out of the source's
    H&E plane (DAB-like brown) is beyond the threshold, H&E twice as dense is not."""
    haematoxylin, eosin, dab = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11]), np.array([0.27, 0.57, 0.78])
    rng = np.random.default_rng(0)
    members = tiny_members()
    stats, card = novelty_for(members, _stained(rng, 24, [haematoxylin, eosin]))
    ens = load_ensemble(write_model_dir(tmp_path, members, features=stats, novelty_card=card))
    normal = stats.stain_normal.numpy()
    assert abs(normal @ haematoxylin) < 0.05 and abs(normal @ eosin) < 0.05  # the plane the source spans
    denser = ens.predict_outputs(_stained(rng, 4, [haematoxylin, eosin], scale=2.0))["novelty"]
    brown = ens.predict_outputs(_stained(rng, 4, [haematoxylin, dab]))["novelty"]
    assert (brown > ens.novelty_threshold).mean() > 0.9
    assert (denser > ens.novelty_threshold).mean() < 0.1
