"""Feature-space novelty (bench/PROTOCOL.md, uncertainty that sees what disagreement misses): how far
a region's bottleneck features lie from what each member saw on source data.

Ensemble disagreement is blind where every member is confidently wrong, as far out of domain, where
members trained alike extrapolate alike. A Mahalanobis distance on the network's own features
(Lee et al. 2018) does not need the members to disagree. Fitted here on source patches (torch);
served inside the ONNX graph (``models.net.FusedEnsemble``), never torch at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.net import UNet, to_input

SHRINKAGE = 0.1  # covariance shrunk towards its mean variance: stable inverse with few source cells
SOURCE_QUANTILE = 0.99  # the source's novelty quantile above which a cell counts as out of distribution
FLAG_SHARE = 0.10  # a slide is flagged out of distribution when more of its tissue than this is beyond it
EMBEDDING_DIMS = 8  # principal components of the first member's features: the queue's patch embedding


@dataclass
class FeatureStats:
    """What the fused graph needs beyond the members: per member the mean and precision of its
    bottleneck features on source data (novelty), and a whitened projection of the first member's
    features onto their principal components (the embedding that diversity-aware selection uses)."""

    gaussians: list[tuple[torch.Tensor, torch.Tensor]]
    embed_mean: torch.Tensor  # (C,)
    embed_projection: torch.Tensor  # (EMBEDDING_DIMS, C)


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


def fit_features(members: list[UNet], images: np.ndarray) -> FeatureStats:
    """Per member (mean, precision) of its bottleneck features over ``images`` (source patches), and
    the first member's embedding projection."""
    gaussians, embedding = [], None
    for i, member in enumerate(members):
        features = member_features(member, images)
        mean, precision = fit_gaussian(features)
        gaussians.append((torch.from_numpy(mean).float(), torch.from_numpy(precision).float()))
        if i == 0:
            embedding = fit_embedding(features)
    return FeatureStats(gaussians, torch.from_numpy(embedding[0]).float(), torch.from_numpy(embedding[1]).float())


def novelty_scores(members: list[UNet], stats: FeatureStats, images: np.ndarray) -> np.ndarray:
    """(cells,) novelty of every cell of ``images``, as the fused graph computes it (reference, numpy)."""
    total = None
    for member, (mean, precision) in zip(members, stats.gaussians, strict=True):
        centred = member_features(member, images) - mean.numpy()
        d2 = np.einsum("nc,dc,nd->n", centred, precision.numpy(), centred) / centred.shape[1]
        total = d2 if total is None else total + d2
    return total / len(members)


def novelty_for(members: list[UNet], source_images: np.ndarray) -> tuple[FeatureStats, dict]:
    """Feature statistics fitted on half of ``source_images`` and the card's ``novelty`` entry: the
    ``SOURCE_QUANTILE`` of the cells' novelty on the other half (a threshold not fitted on itself)."""
    fit_part, check_part = source_images[0::2], source_images[1::2]
    stats = fit_features(members, fit_part)
    threshold = float(np.quantile(novelty_scores(members, stats, check_part), SOURCE_QUANTILE))
    card = {
        "threshold": round(threshold, 4),
        "quantile": SOURCE_QUANTILE,
        "flag_share": FLAG_SHARE,
        "fitted_on_patches": int(len(fit_part)),
        "thresholded_on_patches": int(len(check_part)),
    }
    return stats, card
