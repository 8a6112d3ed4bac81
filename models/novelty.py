"""Feature-space novelty (bench/PROTOCOL.md, uncertainty that sees what disagreement misses): how far
a region's bottleneck features lie from what each member saw on source data.

Ensemble disagreement is blind where every member is confidently wrong, as far out of domain, where
members trained alike extrapolate alike. A Mahalanobis distance on the network's own features
(Lee et al. 2018) does not need the members to disagree. Fitted here on source patches (torch);
served inside the ONNX graph (``models.net.FusedEnsemble``), never torch at serving time.

The members' features are trained to ignore colour (stain augmentation), so they cannot tell a
stain family they never saw (an IHC-like brown) from H&E. A second, input-side term does: how far a
cell's optical-density direction lies out of the source's stain plane (the plane of its two main
OD components, as Macenko's stain estimation finds it; H&E mixtures lie in it, a third chromogen
does not). Each term is divided by its own 99th percentile on source cells, and a cell's novelty
is the larger of the two: 1 is "as unusual as the source's most unusual 1 %", on either count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.net import DENSITY_FLOOR, UNet, to_input

SHRINKAGE = 0.1  # covariance shrunk towards its mean variance: stable inverse with few source cells
SOURCE_QUANTILE = 0.99  # the source's novelty quantile above which a cell counts as out of distribution
FLAG_SHARE = 0.10  # a slide is flagged out of distribution when more of its tissue than this is beyond it
STAIN_SCALE_FLOOR = 0.05  # an OD direction within ~3° of the plane is scanner and 8-bit noise, never novel
EMBEDDING_DIMS = 8  # principal components of the first member's features: the queue's patch embedding


@dataclass
class FeatureStats:
    """What the fused graph needs beyond the members: per member the mean and precision of its
    bottleneck features on source data (novelty), and a whitened projection of the first member's
    features onto their principal components (the embedding that diversity-aware selection uses)."""

    gaussians: list[tuple[torch.Tensor, torch.Tensor]]
    embed_mean: torch.Tensor  # (C,)
    embed_projection: torch.Tensor  # (EMBEDDING_DIMS, C)
    stain_normal: torch.Tensor  # (3,) unit normal of the source's stain plane in OD space
    feature_scale: float = 1.0  # the source's 99th percentile of the feature term
    stain_scale: float = 1.0  # the source's 99th percentile of the stain term


def cell_density(images: np.ndarray, cell: int) -> np.ndarray:
    """(cells, 3) mean optical density of every ``cell`` x ``cell`` block of uint8 NHWC images."""
    od = -np.log((images.astype(np.float64) + 1.0) / 256.0)
    n, h, w, _ = od.shape
    return od.reshape(n, h // cell, cell, w // cell, cell, 3).mean(axis=(2, 4)).reshape(-1, 3)


def fit_stain_plane(density: np.ndarray) -> np.ndarray:
    """Unit normal of the plane of the two main directions of the cells' OD (cells dense enough)."""
    dense = density[np.linalg.norm(density, axis=1) > DENSITY_FLOOR]
    _, _, vt = np.linalg.svd(dense, full_matrices=False)  # uncentred, as in Macenko: planes through 0
    return vt[2] / np.linalg.norm(vt[2])


def stain_term(density: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """(cells,) sine of the angle between each cell's OD and the stain plane, damped on pale cells."""
    return np.abs(density @ normal) / np.maximum(np.linalg.norm(density, axis=1), DENSITY_FLOOR)


def member_features(member: UNet, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """(cells, C) bottleneck features of every cell of every image (uint8 NHWC), on CPU."""
    member.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            _, features = member.forward_with_features(to_input(images[i : i + batch]))
            out.append(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).numpy())
    return np.concatenate(out).astype(np.float64)


def fit_gaussian(features: np.ndarray, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision of (cells, C) features, the covariance shrunk towards ``mean variance x I``."""
    mean = features.mean(axis=0)
    cov = np.cov(features, rowvar=False)
    target = np.trace(cov) / cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * target * np.eye(cov.shape[0])
    return mean, np.linalg.inv(cov)


def fit_embedding(features: np.ndarray, dims: int = EMBEDDING_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (dims, C) projection onto the top principal components, scaled to unit variance."""
    mean = features.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(features, rowvar=False))
    top = np.argsort(values)[::-1][:dims]
    return mean, (vectors[:, top] / np.sqrt(np.maximum(values[top], 1e-12))).T


def cell_side(member: UNet) -> int:
    """Pixels per bottleneck cell (2**depth)."""
    return 2 ** len(member.up)


def fit_features(members: list[UNet], images: np.ndarray) -> FeatureStats:
    """Per member (mean, precision) of its bottleneck features over ``images`` (source patches), the
    first member's embedding projection and the source's stain plane (scales left at 1)."""
    gaussians, embedding = [], None
    for i, member in enumerate(members):
        features = member_features(member, images)
        mean, precision = fit_gaussian(features)
        gaussians.append((torch.from_numpy(mean).float(), torch.from_numpy(precision).float()))
        if i == 0:
            embedding = fit_embedding(features)
    normal = fit_stain_plane(cell_density(images, cell_side(members[0])))
    return FeatureStats(
        gaussians,
        torch.from_numpy(embedding[0]).float(),
        torch.from_numpy(embedding[1]).float(),
        torch.from_numpy(normal).float(),
    )


def novelty_terms(members: list[UNet], stats: FeatureStats, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cells,) feature term (mean over members of the squared Mahalanobis distance per feature) and
    (cells,) stain term of every cell of ``images``, unscaled (reference, numpy)."""
    total = None
    for member, (mean, precision) in zip(members, stats.gaussians, strict=True):
        centred = member_features(member, images) - mean.numpy()
        d2 = np.einsum("nc,dc,nd->n", centred, precision.numpy(), centred) / centred.shape[1]
        total = d2 if total is None else total + d2
    stain = stain_term(cell_density(images, cell_side(members[0])), stats.stain_normal.numpy().astype(np.float64))
    return total / len(members), stain


def novelty_scores(members: list[UNet], stats: FeatureStats, images: np.ndarray) -> np.ndarray:
    """(cells,) novelty of every cell of ``images``, as the fused graph computes it (reference, numpy)."""
    feature, stain = novelty_terms(members, stats, images)
    return np.maximum(feature / stats.feature_scale, stain / stats.stain_scale)


def novelty_for(members: list[UNet], source_images: np.ndarray) -> tuple[FeatureStats, dict]:
    """Statistics fitted on half of ``source_images``; each term's scale and the card's threshold (the
    ``SOURCE_QUANTILE`` of the combined novelty) from the other half, so none is fitted on itself."""
    fit_part, check_part = source_images[0::2], source_images[1::2]
    stats = fit_features(members, fit_part)
    feature, stain = novelty_terms(members, stats, check_part)
    stats.feature_scale = float(np.quantile(feature, SOURCE_QUANTILE))
    stats.stain_scale = max(STAIN_SCALE_FLOOR, float(np.quantile(stain, SOURCE_QUANTILE)))
    threshold = float(np.quantile(novelty_scores(members, stats, check_part), SOURCE_QUANTILE))
    card = {
        "threshold": round(threshold, 4),
        "quantile": SOURCE_QUANTILE,
        "flag_share": FLAG_SHARE,
        "fitted_on_patches": int(len(fit_part)),
        "thresholded_on_patches": int(len(check_part)),
        "feature_scale": round(stats.feature_scale, 4),
        "stain_scale": round(stats.stain_scale, 4),
        "terms": "max(feature Mahalanobis / its source q99, OD direction out of the source stain plane / its q99)",
    }
    return stats, card
