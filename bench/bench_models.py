"""Serving throughput of two (or more) model directories on the same slide, measured in one run.

    .venv/bin/python bench/bench_models.py --models models/baseline-composite models/baseline [--rounds 3]

Each round segments the engine benchmark's slide (bench/bench_engine.py: centre "source", 8192² px
at 0.5 µm/px, 60 % tissue, cached) once with every model, in alternating order, through the serving pipeline
(every artifact written). Prints per model the median wall time and tissue MP/s, and each model's
throughput as a ratio to the first one: ratios from one run on one machine, so load affects them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_engine import SlideSpec, ensure_slide  # noqa: E402
from service.inference.ensemble import load_ensemble  # noqa: E402
from service.inference.pipeline import run_segmentation  # noqa: E402
from service.options import SegmentationOptions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", type=Path, nargs="+", required=True, help="model directories; the first is the reference"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=8192, help="slide side, pixels at 0.5 µm/px")
    args = ap.parse_args()
    slide, _ = ensure_slide(SlideSpec(args.size, 0.6), [])  # bench_engine's bench slide, cached
    ensembles = [load_ensemble(m) for m in args.models]
    walls: dict[str, list[float]] = {e.version: [] for e in ensembles}
    tissue_mp = 0.0
    for r in range(args.rounds):
        order = ensembles if r % 2 == 0 else ensembles[::-1]
        for ens in order:
            with tempfile.TemporaryDirectory(prefix="uga-bench-models-") as tmp:
                summary = run_segmentation(slide, Path(tmp) / "out", ens, SegmentationOptions())
            walls[ens.version].append(summary["timings_s"]["wall_s"])
            tissue_mp = summary["throughput"]["tissue_megapixels"]
            print(f"round {r + 1}: {ens.version} {walls[ens.version][-1]:.1f} s", file=sys.stderr, flush=True)
    reference = statistics.median(walls[ensembles[0].version])
    print(
        f"slide {slide.name}: {args.size}² px at 0.5 µm/px, {tissue_mp:.1f} tissue MP at 1 µm/px; {args.rounds} rounds"
    )
    print()
    print("| model | novelty output | median wall s | tissue MP/s | throughput vs first |")
    print("|---|---|---|---|---|")
    for ens in ensembles:
        wall = statistics.median(walls[ens.version])
        novelty = "yes" if ens.novelty else "no"
        print(f"| {ens.version} | {novelty} | {wall:.1f} | {tissue_mp / wall:.3f} | {reference / wall:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
