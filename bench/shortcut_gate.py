"""The benchmark's shortcut gate (bench/PROTOCOL.md): can five global block features tell tumour from
normal on the generated slides? Run from the repository root::

    .venv/bin/python bench/shortcut_gate.py [--builder local|composite] [--slides 4] [--size 3072]

Builds ``--slides`` slides per centre with the protocol's builder (``local``: models/data/localshift.py)
or the stress test's (``composite``: models/data/slidegen.py), seeds disjoint from training,
cuts them into 64 µm blocks at 1 µm/px, keeps the pure ones (all tissue by the service's tissue
detector; ≥ 95 % tumour or ≤ 5 % tumour by the ground-truth mask), and fits a logistic regression
on mean R, G, B, high-frequency energy and grey standard deviation (class-balanced within each slide,
leave-one-slide-out). Prints a Markdown table per centre: blocks per class, accuracy (mean ± sd over
the held-out slides), and whether the gate (accuracy ≤ 0.60) passes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.data.localshift import LOCAL_CENTRES, build_local_slide  # noqa: E402
from models.data.shortcut import GATE_ACCURACY, balanced_index, block_features, cv_accuracy  # noqa: E402
from models.data.slidegen import CENTRES, build_slide, companion_paths, slide_seed  # noqa: E402
from models.data.sources import ensure_sources  # noqa: E402
from models.data.textures import texture_bank  # noqa: E402
from service.wsi.slide import RegionReader, open_slide  # noqa: E402
from service.wsi.tissue import tissue_mask  # noqa: E402

BLOCK_UM, MPP, SEED = 64, 1.0, 4242  # seeds of these slides never train the baseline


def slide_blocks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels (1 tumour, 0 normal) of the slide's pure tissue blocks: all tissue (by the
    service's tissue detector, so no glass at the tissue's edge) and ≥ 95 % or ≤ 5 % tumour."""
    block = int(BLOCK_UM / MPP)
    with open_slide(path) as slide, open_slide(companion_paths(path)[0]) as mask:
        tissue = tissue_mask(slide)
        image, truth = RegionReader(slide, MPP), RegionReader(mask, MPP)
        h, w = image.shape
        feats, labels = [], []
        for y in range(0, h - block + 1, block):
            for x in range(0, w - block + 1, block):
                if tissue.crop(y, x, block, block, MPP).mean() < 0.95:
                    continue
                tumour = float((truth.read(y, x, block, block)[..., 0] > 127).mean())
                if 0.05 < tumour < 0.95:
                    continue
                feats.append(block_features(image.read(y, x, block, block)))
                labels.append(1.0 if tumour >= 0.95 else 0.0)
    return np.array(feats).reshape(-1, 5), np.array(labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builder", choices=["local", "composite"], default="local")
    parser.add_argument("--slides", type=int, default=4, help="slides per centre")
    parser.add_argument("--size", type=int, default=6144, help="slide side, pixels at 0.5 µm/px")
    args = parser.parse_args()
    if args.builder == "local":
        bank = texture_bank()
        centres = list(LOCAL_CENTRES)

        def build(path, centre, seed):
            build_local_slide(path, size=(args.size, args.size), centre=centre, seed=seed, bank=bank)
    else:
        sources = ensure_sources()
        centres = list(CENTRES)

        def build(path, centre, seed):
            build_slide(path, size=(args.size, args.size), centre=centre, seed=seed, sources=sources)

    print(f"builder: {args.builder}, {args.slides} slides per centre of {args.size}² px at 0.5 µm/px")
    print()
    print("| centre | tumour / normal blocks | accuracy (slide held out) | gate (≤ 0.60) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="uga-shortcut-") as tmp:
        for centre in centres:
            xs, ys = [], []
            for i in range(args.slides):
                path = Path(tmp) / f"{centre}-{i}.tif"
                build(path, centre, slide_seed(SEED, centre, i))
                x, y = slide_blocks(path)
                xs.append(x)
                ys.append(y)
            x, y = np.vstack(xs), np.concatenate(ys)
            slides = np.concatenate([np.full(len(v), i) for i, v in enumerate(ys)])
            keep = balanced_index(y, groups=slides)
            x, y, slides = x[keep], y[keep], slides[keep]
            mean, sd = cv_accuracy(x, y, groups=slides) if len(np.unique(slides)) >= 2 else (float("nan"), 0.0)
            verdict = "pass" if mean <= GATE_ACCURACY else "**fail**"
            print(f"| {centre} | {int(y.sum())} / {int(len(y) - y.sum())} | {mean:.3f} ± {sd:.3f} | {verdict} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
