"""Feature-space novelty (bench/PROTOCOL.md, uncertainty that sees what disagreement misses): how far
a region's bottleneck features lie from what each member saw on source data.

Ensemble disagreement is blind where every member is confidently wrong, as far out of domain, where
members trained alike extrapolate alike. A Mahalanobis distance on the network's own features
(Lee et al. 2018) does not need the members to disagree. Fitted here on source patches (torch);
served inside the ONNX graph (``models.net.FusedEnsemble``), never torch at serving time.
"""

from __future__ import annotations

import numpy as np
import torch

from models.net import UNet, normalise

SHRINKAGE = 0.1  # covariance shrunk towards its mean variance: stable inverse with few source cells
SOURCE_QUANTILE = 0.99  # the source's novelty quantile above which a cell counts as out of distribution


def member_features(member: UNet, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """(cells, C) bottleneck features of every cell of every image (uint8 NHWC), on CPU."""
    member.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).permute(0, 3, 1, 2).float() / 255.0
            _, features = member.forward_with_features(normalise(x))
            out.append(features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).numpy())
    return np.concatenate(out).astype(np.float64)


def fit_gaussian(features: np.ndarray, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision of (cells, C) features, the covariance shrunk towards ``mean variance x I``."""
    mean = features.mean(axis=0)
    cov = np.cov(features, rowvar=False)
    target = np.trace(cov) / cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * target * np.eye(cov.shape[0])
    return mean, np.linalg.inv(cov)


def fit_novelty(members: list[UNet], images: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per member (mean, precision) of its bottleneck features over ``images`` (source patches)."""
    stats = []
    for member in members:
        mean, precision = fit_gaussian(member_features(member, images))
        stats.append((torch.from_numpy(mean).float(), torch.from_numpy(precision).float()))
    return stats


def novelty_scores(members: list[UNet], stats, images: np.ndarray) -> np.ndarray:
    """(cells,) novelty of every cell of ``images``, as the fused graph computes it (reference, numpy)."""
    total = None
    for member, (mean, precision) in zip(members, stats, strict=True):
        centred = member_features(member, images) - mean.numpy()
        d2 = np.einsum("nc,dc,nd->n", centred, precision.numpy(), centred) / centred.shape[1]
        total = d2 if total is None else total + d2
    return total / len(members)


FLAG_SHARE = 0.10  # a slide is flagged out of distribution when more of its tissue than this is beyond the threshold


def novelty_for(members: list[UNet], source_images: np.ndarray) -> tuple[list, dict]:
    """Feature statistics fitted on half of ``source_images`` and the card's ``novelty`` entry: the
    ``SOURCE_QUANTILE`` of the cells' novelty on the other half (a threshold not fitted on itself)."""
    fit_part, check_part = source_images[0::2], source_images[1::2]
    stats = fit_novelty(members, fit_part)
    threshold = float(np.quantile(novelty_scores(members, stats, check_part), SOURCE_QUANTILE))
    card = {
        "threshold": round(threshold, 4),
        "quantile": SOURCE_QUANTILE,
        "flag_share": FLAG_SHARE,
        "fitted_on_patches": int(len(fit_part)),
        "thresholded_on_patches": int(len(check_part)),
    }
    return stats, card
