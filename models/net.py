"""Small U-Net (GroupNorm, or BatchNorm that the exporter folds into the convolutions) and the fused
ensemble wrapper exported to ONNX. Training side only."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

DENSITY_FLOOR = 0.15  # OD norm below which a cell's colour direction counts less (glass, pale tissue)

# Normalisation of uint8 RGB inside the graph, so serving feeds raw pixels (same for every channel).
RGB_MEAN = 0.5
RGB_STD = 0.25


NORMS = ("group", "batch")


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, not {kind!r}")
    return nn.GroupNorm(groups, channels) if kind == "group" else nn.BatchNorm2d(channels)


def _block(c_in: int, c_out: int, groups: int, norm: str = "group") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        _norm(norm, c_out, groups),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        _norm(norm, c_out, groups),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` poolings; input side length must be divisible by 2**depth. Outputs logits.
    ``norm``: "group" (GroupNorm of ``groups`` groups, per tile) or "batch" (BatchNorm, foldable)."""

    def __init__(self, base: int = 8, depth: int = 3, groups: int = 4, norm: str = "group"):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c = 3
        for w in widths:
            self.down.append(_block(c, w, groups, norm))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.dec.append(_block(2 * w, w, groups, norm))
            c = w
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, 1, H, W), bottleneck features (B, C, H / 2**depth, W / 2**depth))."""
        return unet_pass(self, x, lambda upsampled, skip: torch.cat([upsampled, skip], dim=1))


def unet_pass(net: nn.Module, x: torch.Tensor, join) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net traversal of any ``net`` with ``down``, ``pool``, ``up``, ``dec`` and ``head``: (logits,
    bottleneck features). ``join(upsampled, skip)`` makes each decoder block's input."""
    skips = []
    for i, block in enumerate(net.down):
        x = block(x)
        if i < len(net.down) - 1:
            skips.append(x)
            x = net.pool(x)
    bottleneck = x
    for up, dec in zip(net.up, net.dec, strict=True):
        x = dec(join(up(x), skips.pop()))
    return net.head(x), bottleneck


def normalise(rgb01: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> network input."""
    return (rgb01 - RGB_MEAN) / RGB_STD


def to_input(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) numpy RGB -> the network's (B, 3, H, W) input on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    return normalise(x)


class FusedEnsemble(nn.Module):
    """All members in one graph: uint8 NHWC RGB in, (B, M, H, W) member tumour probabilities out.

    With ``features`` (``models.novelty.FeatureStats``, fitted on source data) two more outputs at
    1 / 2**depth resolution: ``novelty`` (B, 1, h, w), the larger of two terms each divided by its
    source 99th percentile (the squared Mahalanobis distance of each cell's bottleneck features per
    feature, averaged over members; the sine of its optical-density direction against the source's
    stain plane), so about 1 at the edge of the source and large far from it, and ``embedding`` (B, E, h, w), the first
    member's features on their whitened principal components (what diversity-aware selection compares).
    """

    def __init__(self, members: list[UNet], features=None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.with_features = features is not None
        if features is not None:
            self.register_buffer("feature_mean", torch.stack([m for m, _ in features.gaussians]).float())  # (M, C)
            self.register_buffer("feature_precision", torch.stack([p for _, p in features.gaussians]).float())
            self.register_buffer("embed_mean", features.embed_mean.float())  # (C,)
            self.register_buffer("embed_projection", features.embed_projection.float())  # (E, C)
            self.register_buffer("stain_normal", features.stain_normal.float())  # (3,)
            self.feature_scale = float(features.feature_scale)
            self.stain_scale = float(features.stain_scale)
            self.cell = 2 ** len(members[0].up)

    def forward(self, image: torch.Tensor):
        x = normalise(image.permute(0, 3, 1, 2).float() / 255.0)
        if not self.with_features:
            return torch.cat([torch.sigmoid(m(x)) for m in self.members], dim=1)
        probs, distances, embedding = [], [], None
        for i, member in enumerate(self.members):
            logits, features = member.forward_with_features(x)
            probs.append(torch.sigmoid(logits))
            centred = features - self.feature_mean[i][None, :, None, None]
            whitened = torch.einsum("dc,bchw->bdhw", self.feature_precision[i], centred)
            distances.append((whitened * centred).sum(dim=1, keepdim=True) / centred.shape[1])
            if i == 0:
                embedding = torch.einsum(
                    "ec,bchw->behw", self.embed_projection, features - self.embed_mean[None, :, None, None]
                )
        novelty = torch.maximum(
            torch.stack(distances).mean(dim=0) / self.feature_scale, self._stain(image) / self.stain_scale
        )
        return torch.cat(probs, dim=1), novelty, embedding

    def _stain(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w): the sine of each cell's OD direction against the source's stain plane."""
        od = -torch.log((image.permute(0, 3, 1, 2).float() + 1.0) / 256.0)
        od = torch.nn.functional.avg_pool2d(od, self.cell)
        along = torch.einsum("c,bchw->bhw", self.stain_normal, od).abs().unsqueeze(1)
        norm = torch.sqrt((od * od).sum(dim=1, keepdim=True))
        return along / torch.clamp(norm, min=DENSITY_FLOOR)
