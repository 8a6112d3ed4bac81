"""Benchmark slides with local errors (bench/PROTOCOL.md): matched real textures, shifts that vary in
space, local artefacts.

A slide is tissue made of zones of real normal tissue and islands of real tumour, each zone and
island textured by one entry of the matched texture bank (``models.data.textures``: several real
sources per class, two scales, colour and sharpness matched across classes). A centre is a mean
shift of one family (stain, blur, JPEG, low resolution, or ``nonhed``: a colour transform outside
the training augmentation's HED space, IHC-like brown and blue); its strength varies smoothly over
the slide (a random field with a 0.5-2 mm correlation length, drawn per slide), so a model fails
in places rather than everywhere. Every slide, the source centre's too, has local artefacts (pen
marks, tissue folds, out-of-focus blobs) on at most ``ARTEFACT_SHARE`` of its tissue.

Outputs are those of ``slidegen.build_slide`` (pyramidal TIFF, exact mask, ``SlideMeta`` JSON), and
the same arguments give identical pixels. Band by band; no torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from models.data.slidegen import (
    GLASS_RGB,
    SCALE,
    Centre,
    SlideMeta,
    _design,
    _orient,
    _Upsampler,
    band_noise,
    reflect_index,
    smooth_field,
    store_band,
    write_slide,
)
from models.data.textures import Texture
from models.stain import hed_to_rgb, rgb_to_hed

BAND = 256  # level-0 rows per band; also the tile of the local JPEG round trip
ARTEFACT_SHARE = 0.08  # at most this share of the tissue carries artefacts
FILE_JPEG_QUALITY = 92  # the TIFF's own compression; a centre's JPEG loss is applied locally before
# optical density per unit stain (skimage's rgb_from_hed rows), with eosin drawn as DAB: IHC-like
NONHED_STAINS = np.array([[0.65, 0.70, 0.29], [0.27, 0.57, 0.78], [0.27, 0.57, 0.78]], np.float32)


@dataclass(frozen=True)
class LocalCentre:
    """One hospital: a shift family, its mean strength and how much it varies over a slide.

    hed_scale, hed_offset: the mean HED shift (as ``slidegen.Centre``).
    blur_um: mean gaussian blur (µm); lowres: mean down-and-up sampling factor (1 = none);
    jpeg_quality: mean local JPEG quality (100 = none); noise_std: mean additive noise (0-255).
    nonhed: strength of the IHC-like recolouring (0 = none).
    variation: relative standard deviation of the strength field over the slide.
    covered: whether the baseline's training augmentation covers the family.
    """

    name: str
    hed_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hed_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_um: float = 0.0
    lowres: float = 1.0
    jpeg_quality: int = 100
    noise_std: float = 0.0
    nonhed: float = 0.0
    variation: float = 0.5
    covered: bool = True
    description: str = ""


LOCAL_CENTRES: dict[str, LocalCentre] = {
    c.name: c
    for c in (
        LocalCentre("source", variation=0.0, description="training centre: no shift, artefacts only"),
        LocalCentre(
            "stain",
            hed_scale=(1.35, 0.75, 1.0),
            hed_offset=(0.01, -0.008, 0.003),
            description="HED stain shift, strong in places: dark haematoxylin, pale eosin",
        ),
        LocalCentre("blur", blur_um=1.2, description="focus varies over the slide: sharp to strongly blurred"),
        LocalCentre("jpeg", jpeg_quality=30, noise_std=4.0, description="JPEG loss and sensor noise, worse in places"),
        LocalCentre("lowres", lowres=2.5, description="a scan at lower resolution in places (down and up sampling)"),
        LocalCentre(
            "nonhed",
            nonhed=0.9,
            variation=0.3,
            covered=False,
            description="outside the augmentation: IHC-like brown and blue instead of pink and purple",
        ),
    )
}

_ISLANDS = Centre("islands", island_scale=1.0, fragment=0.35)  # tumour morphology, the same in every centre


@dataclass
class _Layout:
    """Which texture paints where: tumour islands (slidegen's design) and normal zones."""

    zones: np.ndarray  # int32 zone id per design cell
    zone_tex: np.ndarray  # per zone id: index into the normal textures
    zone_off: np.ndarray  # per zone id: (dy, dx) texture offset
    strength: np.ndarray  # shift strength field on the design grid (mean 1)
    pen: np.ndarray  # artefact fields on the design grid, 0..1
    fold: np.ndarray
    focus: np.ndarray
    pen_rgb: np.ndarray  # transmittance of this slide's ink


def _blobs(low, rng, n: int, radius: tuple[float, float], elongation: float) -> np.ndarray:
    """0..1 field of ``n`` soft elongated blobs (radii in design cells) at random places and angles."""
    yy, xx = np.mgrid[0 : low[0], 0 : low[1]].astype(np.float32)
    out = np.zeros(low, np.float32)
    for _ in range(n):
        cy, cx = rng.uniform(0, low[0]), rng.uniform(0, low[1])
        r = rng.uniform(*radius)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / (r * elongation)
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / r
        out = np.maximum(out, np.clip(1.5 - (u * u + v * v), 0, 1))
    return out


def _layout(low, c: LocalCentre, seed: int, mpp: float, n_normal: int, tissue: np.ndarray) -> _Layout:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x10CA1]))
    cell_um = mpp * SCALE
    zone_fields = np.stack([smooth_field(low, 600.0 / cell_um, rng) for _ in range(6)])
    zones = np.argmax(zone_fields, axis=0).astype(np.int32)
    zone_tex = rng.integers(0, n_normal, size=6)
    zone_off = rng.integers(0, 1 << 20, size=(6, 2))
    corr_um = rng.uniform(500.0, 2000.0)  # the strength field's correlation length, per slide
    strength = np.clip(1.0 + c.variation * smooth_field(low, corr_um / 2 / cell_um, rng), 0.0, 2.0)
    # artefacts: a budget of tissue cells shared by pen marks, folds and out-of-focus blobs
    pen = _blobs(low, rng, int(rng.integers(1, 3)), (60 / cell_um, 120 / cell_um), elongation=8.0)
    fold = _blobs(low, rng, int(rng.integers(1, 3)), (80 / cell_um, 160 / cell_um), elongation=6.0)
    focus = _blobs(low, rng, int(rng.integers(1, 3)), (250 / cell_um, 450 / cell_um), elongation=1.5)
    inside = tissue.astype(bool)
    for field in (pen, fold, focus):
        field *= inside
    share = float(np.mean(np.maximum(np.maximum(pen, fold), focus)[inside] > 0)) if inside.any() else 0.0
    if share > ARTEFACT_SHARE:  # shrink all three to the budget
        keep = ARTEFACT_SHARE / share
        for field in (pen, fold, focus):
            cut = np.quantile(field[field > 0], 1 - keep) if np.any(field > 0) else 0.0
            field[field <= cut] = 0.0
    ink = [(0.35, 0.55, 0.95), (0.3, 0.85, 0.4), (0.95, 0.3, 0.35)][int(rng.integers(3))]  # blue, green, red pen
    return _Layout(zones, zone_tex, zone_off, strength, pen, fold, focus, np.asarray(ink, np.float32))


class _LocalPainter:
    """Paints level-0 rows of the clean slide, its tissue and tumour masks, and the local fields."""

    def __init__(self, width, height, design, layout: _Layout, normals, tumours):
        self.width, self.height, self.d, self.l = width, height, design, layout
        self.up = _Upsampler(width, height, design.tissue.shape)
        self.normals, self.tumours = normals, tumours
        self.glass = np.asarray(GLASS_RGB, np.float32)

    def field(self, name: str, y0: int, y1: int) -> np.ndarray:
        return self.up.rows(getattr(self.l, name), y0, y1)

    def paint(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = self.d
        tissue = self.up.rows(d.tissue, y0, y1) > d.t_tissue
        tumour = (self.up.rows(d.tumour, y0, y1) > d.t_tumour) & tissue
        rgb = np.empty((y1 - y0, self.width, 3), np.float32)
        rgb[:] = self.glass
        rgb += self.up.rows(d.glass, y0, y1)[..., None]
        self._fill(rgb, tissue & ~tumour, y0, self.l.zones, self.l.zone_tex, self.l.zone_off, self.normals)
        self._fill(rgb, tumour, y0, d.islands, d.island_src, d.island_off, self.tumours)
        return rgb, tissue, tumour

    @staticmethod
    def _fill(rgb, where, y0, labels, tex_of, off_of, textures) -> None:
        ty, tx = np.nonzero(where)
        if not ty.size:
            return
        lab = labels[(ty + y0) // SCALE, tx // SCALE]
        src, off = tex_of[lab], off_of[lab]
        for k, img in enumerate(textures):
            sel = src == k
            if sel.any():
                iy = reflect_index(ty[sel] + y0 + off[sel, 0], img.shape[0])
                ix = reflect_index(tx[sel] + off[sel, 1], img.shape[1])
                rgb[ty[sel], tx[sel]] = img[iy, ix]


def _blend_levels(levels: Sequence[np.ndarray], position: np.ndarray) -> np.ndarray:
    """Per-pixel linear interpolation between images at integer ``position`` steps (0..len-1)."""
    pos = np.clip(position, 0, len(levels) - 1.000001)
    i0 = np.floor(pos).astype(np.int64)
    w = (pos - i0)[..., None].astype(np.float32)
    out = np.zeros_like(levels[0])
    for k in range(len(levels) - 1):
        sel = i0 == k
        if sel.any():
            out[sel] = levels[k][sel] * (1 - w[sel]) + levels[k + 1][sel] * w[sel]
    return out


def _recolour(rgb: np.ndarray, c: LocalCentre, strength: np.ndarray) -> np.ndarray:
    """The stain shift and the IHC-like recolouring, each at the local strength."""
    if c.hed_scale == (1.0, 1.0, 1.0) and c.hed_offset == (0.0, 0.0, 0.0) and c.nonhed == 0:
        return rgb
    hed = rgb_to_hed(rgb / np.float32(255))
    s = strength[..., None].astype(np.float32)
    w = np.clip(hed.sum(-1, keepdims=True) / np.float32(0.05), 0, 1)
    scale = np.asarray(c.hed_scale, np.float32) - 1
    hed = hed * (1 + s * scale) + s * w * np.asarray(c.hed_offset, np.float32)
    np.maximum(hed, 0, out=hed)
    out = hed_to_rgb(hed) * np.float32(255)
    if c.nonhed > 0:  # eosin drawn with a DAB-like brown vector: outside HED jitter
        ihc = np.clip(np.exp(-(hed * np.float32(-np.log(1e-6))) @ NONHED_STAINS), 0, 1) * np.float32(255)
        a = np.clip(s * c.nonhed, 0, 1)
        out = out * (1 - a) + ihc * a
    return out


def _artefacts(rgb: np.ndarray, pen: np.ndarray, fold: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """Folds double the optical density; pen ink multiplies by its transmittance."""
    if fold.any():
        t = np.clip(rgb / np.float32(255), 1e-3, 1)
        rgb = np.where(fold[..., None] > 0, np.power(t, 1 + 1.2 * fold[..., None]) * 255, rgb)
    if pen.any():
        a = (0.85 * pen)[..., None]
        rgb = rgb * (1 - a + a * ink)
    return rgb


def _degrade(rgb: np.ndarray, c: LocalCentre, strength: np.ndarray, focus: np.ndarray, mpp: float) -> np.ndarray:
    """Blur (centre's mean x local strength, plus out-of-focus blobs) and down-and-up sampling."""
    sigma = (c.blur_um * strength + 2.5 * focus) / mpp  # level-0 pixels
    if sigma.max() > 0.05:
        steps = np.arange(0.0, float(sigma.max()) + 0.5, 0.5)
        levels = [rgb] + [ndimage.gaussian_filter(rgb, (s, s, 0), mode="reflect") for s in steps[1:]]
        rgb = _blend_levels(levels, sigma / 0.5)
    if c.lowres > 1:
        factor = 1 + (c.lowres - 1) * strength
        levels = [rgb]
        for f in range(2, int(math.ceil(float(factor.max()))) + 1):
            h, w = rgb.shape[:2]
            small = np.asarray(
                Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8)).resize(
                    (max(1, w // f), max(1, h // f)), Image.Resampling.BOX
                )
            )
            levels.append(np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), np.float32))
        rgb = _blend_levels(levels, factor - 1)
    return rgb


def _jpeg_locally(rgb: np.ndarray, c: LocalCentre, strength: np.ndarray) -> np.ndarray:
    """JPEG round trip per BAND x BAND tile at a quality that follows the local strength."""
    if c.jpeg_quality >= 100:
        return rgb
    out = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    h, w = out.shape[:2]
    for x0 in range(0, w, BAND):
        tile = out[:, x0 : x0 + BAND]
        s = float(strength[:, x0 : x0 + BAND].mean())
        quality = int(np.clip(round(100 - (100 - c.jpeg_quality) * s), 5, 95))
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(tile)).save(buf, format="JPEG", quality=quality)
        out[:, x0 : x0 + BAND] = np.asarray(Image.open(buf).convert("RGB"))
    return out.astype(np.float32)


def _render(painter: _LocalPainter, c: LocalCentre, seed: int, mpp: float, rgb_r, mask_r, progress):
    height = painter.height
    margin = int(math.ceil(4 * (c.blur_um * 2 + 2.5) / mpp)) + 8
    n_tissue = n_tumour = 0
    for bi, y0 in enumerate(range(0, height, BAND)):
        y1 = min(height, y0 + BAND)
        a0, a1 = max(0, y0 - margin), min(height, y1 + margin)
        rgb, tissue, tumour = painter.paint(a0, a1)
        strength = painter.field("strength", a0, a1)
        rgb = _recolour(rgb, c, strength)
        rgb = _artefacts(rgb, painter.field("pen", a0, a1), painter.field("fold", a0, a1), painter.l.pen_rgb)
        rgb = _degrade(rgb, c, strength, painter.field("focus", a0, a1), mpp)
        core = slice(y0 - a0, y1 - a0)
        rgb, tissue, tumour, strength = rgb[core], tissue[core], tumour[core], strength[core]
        if c.noise_std > 0:
            rgb = rgb + band_noise(seed, bi, rgb.shape) * (c.noise_std * strength)[..., None]
        counts = store_band(rgb_r, mask_r, y0, _jpeg_locally(rgb, c, strength), tissue, tumour)
        n_tissue, n_tumour = n_tissue + counts[0], n_tumour + counts[1]
        if progress is not None:
            progress(y1, height)
    return n_tissue, n_tumour


def build_local_slide(
    path: Path,
    *,
    size: tuple[int, int],
    centre: str,
    seed: int,
    bank: Sequence[Texture],
    mpp: float = 0.5,
    tissue_fraction: float = 0.6,
    tumour_fraction: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
) -> SlideMeta:
    """Write ``path`` (slide), ``<stem>.mask.tif`` and ``<stem>.json`` for one local-shift centre.

    The layout (tissue, islands, zones, textures, artefacts) depends only on ``seed`` and ``size``;
    ``centre`` picks the shift family and its mean strength.
    """
    if centre not in LOCAL_CENTRES:
        raise ValueError(f"unknown centre {centre!r}; choose from {sorted(LOCAL_CENTRES)}")
    c = LOCAL_CENTRES[centre]
    width, height = int(size[0]), int(size[1])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E47]))
    normals = [_orient(t.rgb, rng) for t in bank if t.label == "normal"]
    tumours = [_orient(t.rgb, rng) for t in bank if t.label == "tumour"]
    if not normals or not tumours:
        raise ValueError("the texture bank needs at least one normal and one tumour texture")
    design = _design(width, height, _ISLANDS, seed, mpp, tissue_fraction, tumour_fraction, len(tumours))
    layout = _layout(design.tissue.shape, c, seed, mpp, len(normals), design.tissue > design.t_tissue)
    painter = _LocalPainter(width, height, design, layout, normals, tumours)
    return write_slide(
        path,
        (width, height),
        mpp,
        centre=centre,
        seed=seed,
        jpeg_quality=FILE_JPEG_QUALITY,
        description=f"UGA local-shift slide centre={centre} seed={seed} mpp={mpp}",
        render=lambda rgb_r, mask_r: _render(painter, c, seed, mpp, rgb_r, mask_r, progress),
    )
