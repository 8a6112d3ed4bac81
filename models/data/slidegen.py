"""Composite pyramidal H&E slides with exact tumour ground truth, for pipeline and loop tests.

A slide is real normal tissue (CMU-1, mirror-tiled) with islands of real tumour tissue
(tiatoolbox / stardist images, mirror-tiled) on near-white glass. Shapes are designed at 1/16
scale as smooth random fields; every level-0 band upsamples the *continuous* fields (bilinear) and
thresholds them, so boundaries are smooth, and the mask is exactly the tumour pixels painted.

"Centres" imitate hospitals: the "source" centre is the training domain, the others are out of
domain through stain (HED shift), blur, noise, JPEG quality and tumour morphology.

Outputs of ``build_slide(path=x.tif)``: ``x.tif`` (pyramidal tiled RGB TIFF, JPEG at the centre's
quality), ``x.mask.tif`` (uint8 0/255, deflate, same size and µm/px), ``x.json`` (``SlideMeta``).
Everything is streamed band by band: memory does not grow with the slide. No torch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import label
from skimage.segmentation import expand_labels

from models.data.sources import Sources
from models.stain import hed_to_rgb, rgb_to_hed, stain_shift  # noqa: F401  (the HED pair stays importable here)
from service.fsutil import sha256_file
from service.wsi.pyramid import write_pyramid_tiff
from service.wsi.raster import RasterFile

SCALE = 16  # design resolution of the shape fields, relative to level 0
GLASS_RGB = (236.0, 234.0, 240.0)
# Tissue-rich region of the CMU-1 small region (y0, x0, y1, x1): ~85 % tissue, no large glass areas.
NORMAL_CROP = (1800, 800, 2960, 1600)
ISLAND_SIGMA_UM = 90.0  # smoothing length of the tumour field at island_scale 1.0
BAND_PIXELS = 1 << 22  # level-0 pixels per band (rows = this / width, within [64, 512])


@dataclass(frozen=True)
class Centre:
    """How one hospital's slides look.

    hed_scale, hed_offset: per-channel (haematoxylin, eosin, DAB) ``scale*x + offset`` in
        skimage's HED space (``rgb2hed`` units; tissue is ~0.02-0.15 there). The offset is weighted
        by stain density so that glass stays bright.
    blur_sigma: gaussian blur in level-0 pixels (focus / scanner optics); 0 = none.
    jpeg_quality: JPEG quality of the slide TIFF tiles.
    noise_std: additive gaussian noise, 0-255 units.
    island_scale: size of tumour islands relative to the source morphology (1.0).
    fragment: 0..1, how fragmented (high-frequency) island outlines are; 0.2 = source.
    """

    name: str
    hed_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hed_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_sigma: float = 0.0
    jpeg_quality: int = 90
    noise_std: float = 0.0
    island_scale: float = 1.0
    fragment: float = 0.2
    description: str = ""


CENTRES: dict[str, Centre] = {
    c.name: c
    for c in (
        Centre("source", description="training centre: no shift, JPEG 90"),
        Centre(
            "stain",
            hed_scale=(1.45, 0.7, 1.05),
            hed_offset=(0.015, -0.01, 0.004),
            description="strong HED shift: dark blue-purple haematoxylin, pale eosin",
        ),
        Centre(
            "blur",
            hed_scale=(0.9, 1.15, 1.0),
            hed_offset=(0.0, 0.006, 0.0),
            blur_sigma=1.6,
            jpeg_quality=85,
            description="out of focus scanner, mild pink shift",
        ),
        Centre(
            "jpeg",
            hed_scale=(1.1, 0.9, 1.0),
            hed_offset=(0.004, 0.0, -0.004),
            jpeg_quality=35,
            noise_std=5.0,
            description="heavy JPEG compression and sensor noise, mild shift",
        ),
        Centre(
            "morph",
            hed_scale=(0.85, 1.25, 1.1),
            hed_offset=(-0.004, 0.008, 0.004),
            island_scale=0.5,
            fragment=0.7,
            description="smaller, fragmented tumour islands, moderate pink shift",
        ),
        Centre(
            "mixed",
            hed_scale=(1.25, 0.8, 1.1),
            hed_offset=(0.008, -0.006, 0.006),
            blur_sigma=0.9,
            jpeg_quality=55,
            noise_std=3.0,
            island_scale=0.7,
            fragment=0.5,
            description="a bit of everything",
        ),
    )
}

SIZES: dict[str, tuple[int, int]] = {
    "test-small": (3072, 3072),
    "demo": (8192, 8192),
    "bench": (8192, 8192),
    "bench-large": (32768, 32768),
}


@dataclass
class SlideMeta:
    """What ``build_slide`` wrote (also stored as ``x.json`` next to the slide)."""

    slide: str  # file name of the slide TIFF
    mask: str  # file name of the ground-truth mask TIFF
    centre: str
    seed: int
    size: tuple[int, int]  # (width, height) at level 0
    mpp: float
    tissue_fraction: float  # tissue pixels / all pixels (obtained)
    tumour_fraction: float  # tumour pixels / tissue pixels (obtained)
    tumour_area_mm2: float
    levels: int
    slide_sha256: str
    mask_sha256: str

    def to_json(self) -> str:
        d = asdict(self)
        d["size"] = list(self.size)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SlideMeta:
        d = json.loads(text)
        d["size"] = tuple(d["size"])
        return cls(**d)


def companion_paths(path: Path) -> tuple[Path, Path]:
    """(mask path, json path) for slide ``path``: ``x.tif`` -> ``x.mask.tif``, ``x.json``."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + ".mask.tif"), path.with_name(stem + ".json")


# ----------------------------------------------------------------------------------------------
# pure helpers


def reflect_index(k: np.ndarray, n: int) -> np.ndarray:
    """Mirror-tiling index (``np.pad(mode="symmetric")`` repeated forever) of integer ``k`` into n."""
    k = np.mod(k, 2 * n)
    return np.where(k >= n, 2 * n - 1 - k, k)


def smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean unit-std gaussian-smoothed noise of ``shape`` with smoothing length ``sigma`` px.

    Large sigmas are made on a coarser grid and spline-upsampled (same look, much faster).
    """
    factor = max(1.0, sigma / 4.0)
    coarse = (int(math.ceil(shape[0] / factor)) + 4, int(math.ceil(shape[1] / factor)) + 4)
    f = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), sigma / factor, mode="wrap")
    if factor > 1:
        f = ndimage.zoom(f, factor, order=3, mode="nearest", grid_mode=False)
    f = f[: shape[0], : shape[1]]
    return ((f - f.mean()) / (f.std() + 1e-12)).astype(np.float32)


def _interp_axis(n_out: int, n_low: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear source index and weight along one axis for level-0 -> 1/SCALE design grid."""
    u = (np.arange(n_out, dtype=np.float64) + 0.5) / SCALE - 0.5
    u = np.clip(u, 0, n_low - 1.000001)
    i0 = np.floor(u).astype(np.int64)
    return i0, (u - i0).astype(np.float32)


class _Upsampler:
    """Bilinear upsampling of design-grid fields to level-0 row bands (any rows, any margin)."""

    def __init__(self, width: int, height: int, low_shape: tuple[int, int]):
        self.low_shape = low_shape
        self.height = height
        self.xi, self.xw = _interp_axis(width, low_shape[1])

    def rows(self, field: np.ndarray, y0: int, y1: int) -> np.ndarray:
        u = (np.arange(y0, y1, dtype=np.float64) + 0.5) / SCALE - 0.5
        u = np.clip(u, 0, self.low_shape[0] - 1.000001)
        yi = np.floor(u).astype(np.int64)
        yw = (u - yi).astype(np.float32)[:, None]
        r = field[yi] * (1 - yw) + field[yi + 1] * yw  # (rows, low_w)
        return r[:, self.xi] * (1 - self.xw) + r[:, self.xi + 1] * self.xw


# ----------------------------------------------------------------------------------------------
# slide design


@dataclass
class _Design:
    tissue: np.ndarray  # continuous field on the design grid; tissue where > t_tissue
    tumour: np.ndarray  # continuous field; tumour where > t_tumour and tissue
    glass: np.ndarray  # brightness variation of the glass, 0-255 units
    t_tissue: float
    t_tumour: float
    islands: np.ndarray  # int32 island id on the design grid (expanded so tumour pixels are covered)
    island_src: np.ndarray  # per island id: index into the tumour images
    island_off: np.ndarray  # per island id: (dy, dx) texture offset
    normal_off: tuple[int, int]


def _design(width, height, centre: Centre, seed, mpp, tissue_fraction, tumour_fraction, n_tumour_images):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    low = (int(math.ceil(height / SCALE)) + 2, int(math.ceil(width / SCALE)) + 2)
    # tissue: a few large smooth pieces, kept away from the slide edges
    tissue = smooth_field(low, min(low) / 9.0, rng)
    yy = np.abs(np.linspace(-1, 1, low[0], dtype=np.float32))[:, None]
    xx = np.abs(np.linspace(-1, 1, low[1], dtype=np.float32))[None, :]
    tissue -= 4.0 * np.clip((np.maximum(yy, xx) - 0.75) / 0.25, 0, 1) ** 2
    t_tissue = float(np.quantile(tissue, 1.0 - tissue_fraction))
    inside = tissue > t_tissue
    # tumour: islands of physical size, outline roughness from a finer field; a separate
    # generator keeps the tissue layout independent of the centre's morphology.
    trng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E40]))
    sigma = ISLAND_SIGMA_UM * centre.island_scale / (mpp * SCALE)
    coarse = smooth_field(low, sigma, trng)
    fine = smooth_field(low, max(1.0, sigma / 3.5), trng)
    tumour = (1.0 - centre.fragment) * coarse + centre.fragment * fine
    # islands stay off the tissue border a little (as metastases do)
    tumour += 0.5 * np.clip((tissue - t_tissue) / (tissue.std() * 0.3), -1, 0)
    t_tumour = float(np.quantile(tumour[inside], 1.0 - tumour_fraction)) if inside.any() else np.inf
    islands = label((tumour > t_tumour) & inside, connectivity=2).astype(np.int32)
    islands = expand_labels(islands, distance=3)
    n = int(islands.max()) + 1
    island_src = trng.integers(0, n_tumour_images, size=n)
    island_off = trng.integers(0, 1 << 20, size=(n, 2))
    glass = smooth_field(low, min(low) / 6.0, rng) * 2.0
    normal_off = tuple(int(v) for v in rng.integers(0, 1 << 20, size=2))
    return _Design(tissue, tumour, glass, t_tissue, t_tumour, islands, island_src, island_off, normal_off)


def _orient(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    k = int(rng.integers(0, 8))
    if k & 1:
        img = img[::-1]
    if k & 2:
        img = img[:, ::-1]
    if k & 4:
        img = img.transpose(1, 0, 2)
    return np.ascontiguousarray(img)


def _band_rows(width: int) -> int:
    return int(np.clip(BAND_PIXELS // max(1, width) // 16 * 16, 64, 512))


class _Painter:
    """Paints level-0 rows [y0, y1) of the clean slide and its masks (pure function of y)."""

    def __init__(self, width, height, design: _Design, normal: np.ndarray, tumours: list[np.ndarray]):
        self.width, self.height, self.d = width, height, design
        self.up = _Upsampler(width, height, design.tissue.shape)
        self.normal = normal
        self.tumours = tumours
        self.x = np.arange(width, dtype=np.int64)
        self.nx = reflect_index(self.x + design.normal_off[1], normal.shape[1])
        self.glass_rgb = np.asarray(GLASS_RGB, np.float32)

    def paint(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rgb float32 (h, w, 3) 0-255, tissue bool (h, w), tumour bool (h, w))."""
        d = self.d
        tissue = self.up.rows(d.tissue, y0, y1) > d.t_tissue
        tumour = (self.up.rows(d.tumour, y0, y1) > d.t_tumour) & tissue
        glass = self.up.rows(d.glass, y0, y1)
        rgb = np.empty((y1 - y0, self.width, 3), np.float32)
        rgb[:] = self.glass_rgb
        rgb += glass[..., None]
        ys = np.arange(y0, y1, dtype=np.int64)
        ny = reflect_index(ys + d.normal_off[0], self.normal.shape[0])
        normal = self.normal[ny][:, self.nx]
        normal_only = tissue & ~tumour
        rgb[normal_only] = normal[normal_only]
        ty, tx = np.nonzero(tumour)
        if ty.size:
            lab = d.islands[(ty + y0) // SCALE, tx // SCALE]
            src = d.island_src[lab]
            off = d.island_off[lab]
            for k, img in enumerate(self.tumours):
                sel = src == k
                if not sel.any():
                    continue
                iy = reflect_index(ty[sel] + y0 + off[sel, 0], img.shape[0])
                ix = reflect_index(tx[sel] + off[sel, 1], img.shape[1])
                rgb[ty[sel], tx[sel]] = img[iy, ix]
        return rgb, tissue, tumour


def _render(painter: _Painter, c: Centre, seed: int, rgb_r: RasterFile, mask_r: RasterFile, progress):
    """Paint, degrade and store level 0 band by band; returns (tissue pixels, tumour pixels).

    Order: HED stain shift, gaussian blur (computed on the band plus a margin, so no seams),
    additive noise (seeded from (seed, band index)). JPEG comes later from the TIFF compression.
    """
    width, height = painter.width, painter.height
    band = _band_rows(width)
    margin = int(math.ceil(4 * c.blur_sigma)) if c.blur_sigma > 0 else 0
    n_tissue = n_tumour = 0
    for bi, y0 in enumerate(range(0, height, band)):
        y1 = min(height, y0 + band)
        a0, a1 = max(0, y0 - margin), min(height, y1 + margin)
        rgb, tissue, tumour = painter.paint(a0, a1)
        rgb = stain_shift(rgb, c.hed_scale, c.hed_offset)
        if c.blur_sigma > 0:
            rgb = ndimage.gaussian_filter(rgb, (c.blur_sigma, c.blur_sigma, 0), mode="reflect")
        core = slice(y0 - a0, y1 - a0)
        rgb, tissue, tumour = rgb[core], tissue[core], tumour[core]
        if c.noise_std > 0:
            rgb = rgb + band_noise(seed, bi, rgb.shape) * np.float32(c.noise_std)
        counts = store_band(rgb_r, mask_r, y0, rgb, tissue, tumour)
        n_tissue, n_tumour = n_tissue + counts[0], n_tumour + counts[1]
        if progress is not None:
            progress(y1, height)
    return n_tissue, n_tumour


def band_noise(seed: int, band: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal sensor noise of one band, seeded by (slide seed, band index): reproducible."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0x0015E, band])).standard_normal(shape, dtype=np.float32)


def store_band(rgb_r, mask_r, y0: int, rgb: np.ndarray, tissue: np.ndarray, tumour: np.ndarray) -> tuple[int, int]:
    """Write one finished band (RGB float 0-255 and its tumour mask); its (tissue, tumour) pixel counts."""
    rgb_r.write_block(y0, 0, np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
    mask_r.write_block(y0, 0, tumour.astype(np.uint8) * 255)
    return int(np.count_nonzero(tissue)), int(np.count_nonzero(tumour))


def build_slide(
    path: Path,
    *,
    size: tuple[int, int],
    centre: str,
    seed: int,
    sources: Sources,
    mpp: float = 0.5,
    tissue_fraction: float = 0.6,
    tumour_fraction: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
) -> SlideMeta:
    """Write ``path`` (slide), ``<stem>.mask.tif`` and ``<stem>.json``; returns the metadata.

    ``size`` is (width, height) at level 0. Same arguments -> identical level-0 pixels. The tissue
    layout and textures depend only on ``seed`` (and size); ``centre`` changes the stain, blur,
    noise, JPEG quality and the tumour morphology. ``progress(done_rows, total_rows)`` is called
    after every band.
    """
    if centre not in CENTRES:
        raise ValueError(f"unknown centre {centre!r}; choose from {sorted(CENTRES)}")
    if not (0 < tissue_fraction < 1 and 0 < tumour_fraction < 1):
        raise ValueError("tissue_fraction and tumour_fraction must be in (0, 1)")
    c = CENTRES[centre]
    width, height = int(size[0]), int(size[1])

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E47]))
    y0c, x0c, y1c, x1c = NORMAL_CROP
    normal = _orient(sources.normal[y0c:y1c, x0c:x1c].astype(np.float32), rng)
    tumours = [_orient(t.astype(np.float32), rng) for t in sources.tumour]
    design = _design(width, height, c, seed, mpp, tissue_fraction, tumour_fraction, len(tumours))
    painter = _Painter(width, height, design, normal, tumours)
    return write_slide(
        path,
        (width, height),
        mpp,
        centre=centre,
        seed=seed,
        jpeg_quality=c.jpeg_quality,
        description=f"UGA synthetic slide centre={centre} seed={seed} mpp={mpp}",
        render=lambda rgb_r, mask_r: _render(painter, c, seed, rgb_r, mask_r, progress),
    )


def write_slide(
    path: Path,
    size: tuple[int, int],
    mpp: float,
    *,
    centre: str,
    seed: int,
    jpeg_quality: int,
    description: str,
    render: Callable[[RasterFile, RasterFile], tuple[int, int]],
) -> SlideMeta:
    """Render level 0 into temporary rasters, write the slide and mask pyramids and ``<stem>.json``.

    ``render(rgb_raster, mask_raster)`` fills both and returns (tissue pixels, tumour pixels).
    """
    width, height = size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask_path, json_path = companion_paths(path)
    with tempfile.TemporaryDirectory(prefix="slidegen-", dir=path.parent) as tmp:
        rgb_r = RasterFile(Path(tmp) / "rgb.raw", height, width, 3, create=True)
        mask_r = RasterFile(Path(tmp) / "mask.raw", height, width, 1, create=True)
        try:
            n_tissue, n_tumour = render(rgb_r, mask_r)
            levels = write_pyramid_tiff(
                path, rgb_r, mpp, compression="jpeg", jpeg_quality=jpeg_quality, description=description
            )
            write_pyramid_tiff(mask_path, mask_r, mpp, compression="deflate", description=description + " mask")
        finally:
            rgb_r.close()
            mask_r.close()

    meta = SlideMeta(
        slide=path.name,
        mask=mask_path.name,
        centre=centre,
        seed=int(seed),
        size=(width, height),
        mpp=float(mpp),
        tissue_fraction=n_tissue / float(width * height),
        tumour_fraction=n_tumour / float(max(1, n_tissue)),
        tumour_area_mm2=n_tumour * mpp * mpp / 1e6,
        levels=int(levels),
        slide_sha256=sha256_file(path),
        mask_sha256=sha256_file(mask_path),
    )
    part = json_path.with_name(json_path.name + ".part")
    part.write_text(meta.to_json() + "\n")
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    part.replace(json_path)
    return meta


def slide_seed(seed: int, centre: str, index: int) -> int:
    """Seed of slide ``index`` of ``centre`` in a set built with ``seed`` (stable across runs)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(centre.encode()), int(index)])
    return int(ss.generate_state(1, np.uint32)[0])


def build_set(
    out_dir: Path,
    *,
    size_name: str,
    centres: list[str],
    per_centre: int,
    seed: int,
    sources: Sources,
    **kw,
) -> list[SlideMeta]:
    """Build ``per_centre`` slides per centre as ``out_dir/{centre}-{i:02d}.tif`` (+ mask, json).

    Each slide's seed is ``slide_seed(seed, centre, i)``; ``kw`` goes to ``build_slide``.
    """
    if size_name not in SIZES:
        raise ValueError(f"unknown size {size_name!r}; choose from {sorted(SIZES)}")
    unknown = [c for c in centres if c not in CENTRES]
    if unknown:
        raise ValueError(f"unknown centres {unknown}; choose from {sorted(CENTRES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metas = []
    for centre in centres:
        for i in range(per_centre):
            metas.append(
                build_slide(
                    out_dir / f"{centre}-{i:02d}.tif",
                    size=SIZES[size_name],
                    centre=centre,
                    seed=slide_seed(seed, centre, i),
                    sources=sources,
                    **kw,
                )
            )
    return metas
