"""Histogram buckets for the per-slide uncertainty and tumour-fraction metrics, from real values.

Run from the repository root::

    .venv/bin/python bench/metric_buckets.py [--keep DIR]

Builds the project's own slides into a temporary directory (or ``--keep DIR``): the shipped demo
slide (`uga demo`: size "demo", seed 7, centre "mixed") and its in-domain twin (centre "source"),
one `uga make-slides` slide (size "test-small", seed 0) per centre (source, stain, blur, jpeg,
morph, mixed), and the two slides of tests/conftest.py (2048 px, seed 9001, "source" and "mixed").
Segments each with the shipped baseline (models/baseline) through ``service.cli.run_segment`` with
`uga segment`'s default options, then prints to stdout a Markdown table of every slide's
``tumour_fraction_of_tissue`` and ``mean_uncertainty`` (bits, per measure), and the proposed
``UNCERTAINTY_BUCKETS`` / ``TUMOUR_FRACTION_BUCKETS`` tuples for ``uga_slide_mean_uncertainty`` and
``uga_slide_tumour_fraction``. Progress goes to stderr. Takes ~1.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from models.data.commands import DEMO_SEED  # noqa: E402
from models.data.slidegen import CENTRES, SIZES, SlideMeta, build_slide, companion_paths  # noqa: E402
from models.data.sources import ensure_sources  # noqa: E402
from service.cli import add_segment_options, run_segment  # noqa: E402
from service.vocabulary import MEASURES  # noqa: E402

MODEL_DIR = ROOT / "models" / "baseline"
UNCERTAINTY_TOP = 3.0  # bits; the buckets cover 0 .. this
UNCERTAINTY_MAX_BOUNDS = 25
FRACTION_MAX_BOUNDS = 15
DENSE_STEPS_BITS = (0.005, 0.01, 0.02, 0.025, 0.05)  # candidate steps inside the observed range
DENSE_STEPS_FRACTION = (0.01, 0.02, 0.025, 0.05)


@dataclass(frozen=True)
class SlideSpec:
    name: str
    origin: str  # which project code path builds it this way
    centre: str
    size: tuple[int, int]
    seed: int


def slide_specs() -> list[SlideSpec]:
    """The demo slides, one `uga make-slides` slide per centre, and the two tests/conftest.py slides."""
    specs = [SlideSpec(f"demo-{c}", "uga demo", c, SIZES["demo"], DEMO_SEED) for c in ("mixed", "source")]
    specs += [SlideSpec(f"{c}-00", "make-slides", c, SIZES["test-small"], 0) for c in CENTRES]
    specs += [SlideSpec(f"{c}-9001", "tests", c, (2048, 2048), 9001) for c in ("source", "mixed")]
    return specs


def log(msg: str) -> None:
    print(f"[buckets {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the bucket rule


def _merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of closed intervals, as sorted disjoint intervals."""
    out: list[tuple[float, float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _grid(lo: float, hi: float, step: float) -> list[float]:
    """Multiples of ``step`` from the one at or below ``lo`` to the one at or above ``hi``."""
    k0, k1 = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(k0, k1 + 1)]


def dense_buckets(
    values: Sequence[float],
    *,
    top: float,
    backbone: Sequence[float],
    steps: Sequence[float],
    max_bounds: int,
    margin: float,
    decimals: int = 3,
) -> tuple[float, ...]:
    """Bucket upper bounds over 0..top: dense where the observed ``values`` fall, coarse elsewhere.

    Rule (deterministic; nothing hand-picked but the parameters):

    1. Every value v gives [v - margin, v + margin], clipped to [0, top]; overlapping ones merge,
       so values spread evenly over a range give one interval min - margin .. max + margin.
    2. Every interval starts at the coarsest of ``steps``; its bounds are the multiples of its
       step that cover it.
    3. Refinement: while some interval can move to the next finer step with the total still
       <= ``max_bounds``, the one with the most values per unit width does (ties: the lower one).
    4. The ``backbone`` bounds and ``top`` are added where no dense bound lies within the coarsest
       step (so the range outside the observed values stays covered, coarsely).
    5. Bounds <= 0 are dropped (Prometheus' first bucket counts everything below the first bound);
       the rest are rounded to ``decimals``, made unique and sorted. If even the coarsest steps
       need more than ``max_bounds``, the step limit wins and a note goes to stderr.
    """
    steps = sorted(steps)
    coarse_step = steps[-1]
    intervals = _merge((max(0.0, v - margin), min(top, v + margin)) for v in values)
    density = [sum(lo <= v <= hi for v in values) / max(hi - lo, 1e-9) for lo, hi in intervals]
    level = [len(steps) - 1] * len(intervals)  # index into steps, per interval

    def bounds(levels: list[int]) -> tuple[float, ...]:
        dense = {
            round(x, decimals) for (lo, hi), i in zip(intervals, levels, strict=True) for x in _grid(lo, hi, steps[i])
        }
        coarse = {round(b, decimals) for b in (*backbone, top) if 0 < b <= top}
        coarse = {b for b in coarse if b in dense or all(abs(b - d) >= coarse_step - 1e-9 for d in dense)}
        return tuple(sorted(x for x in dense | coarse if 0 < x <= top))

    if len(bounds(level)) > max_bounds:
        print(f"note: {len(bounds(level))} bounds at step {coarse_step} (budget {max_bounds})", file=sys.stderr)
    order = sorted(range(len(intervals)), key=lambda j: (-density[j], intervals[j][0]))
    refined = True
    while refined:
        refined = False
        for j in order:
            if level[j] > 0:
                trial = [*level[:j], level[j] - 1, *level[j + 1 :]]
                if len(bounds(trial)) <= max_bounds:
                    level, refined = trial, True
                    break
    return bounds(level)


def uncertainty_buckets(per_measure: dict[str, list[float]]) -> tuple[float, ...]:
    """Buckets shared by all measures (bits), 0..UNCERTAINTY_TOP: dense steps (<= 0.05) around the
    values of every measure, the 1-2-5 series (0.01, 0.02, 0.05, 0.1, ... 2) elsewhere."""
    return dense_buckets(
        [v for vs in per_measure.values() for v in vs],
        top=UNCERTAINTY_TOP,
        backbone=[m * 10.0**e for e in range(-2, 1) for m in (1, 2, 5)],
        steps=DENSE_STEPS_BITS,
        max_bounds=UNCERTAINTY_MAX_BOUNDS,
        margin=0.025,
    )


def tumour_fraction_buckets(fractions: list[float]) -> tuple[float, ...]:
    """Buckets for the tumour fraction, 0..1: dense around the values, steps of 0.2 elsewhere."""
    return dense_buckets(
        fractions,
        top=1.0,
        backbone=[k / 5 for k in range(1, 5)],
        steps=DENSE_STEPS_FRACTION,
        max_bounds=FRACTION_MAX_BOUNDS,
        margin=0.025,
    )


# ---------------------------------------------------------------------------------------------
# slides and segmentation


def build(spec: SlideSpec, slide_dir: Path, sources) -> tuple[Path, SlideMeta]:
    path = slide_dir / f"{spec.name}.tif"
    json_path = companion_paths(path)[1]
    if path.exists() and json_path.exists():
        return path, SlideMeta.from_json(json_path.read_text())
    return path, build_slide(path, size=spec.size, centre=spec.centre, seed=spec.seed, sources=sources)


def segment_args() -> argparse.Namespace:
    """`uga segment`'s defaults (the same parser options), quiet, with the shipped baseline."""
    p = argparse.ArgumentParser()
    add_segment_options(p)
    return p.parse_args(["--quiet", "--model", str(MODEL_DIR)])


def markdown_table(rows: list[dict]) -> str:
    head = ["slide", "origin", "centre", "size", "true tumour frac", "tumour_fraction_of_tissue", *MEASURES]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r["slide"],
            r["origin"],
            r["centre"],
            f"{r['size'][0]}²",
            f"{r['true_fraction']:.4f}",
            f"{r['tumour_fraction']:.4f}",
            *(f"{r['mean_uncertainty'][m]:.4f}" for m in MEASURES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--keep", type=Path, default=None, help="build slides and results here (reused) instead of a temp dir"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="uga-buckets-"))
    seg_args = segment_args()
    rows: list[dict] = []
    try:
        sources = ensure_sources()
        for spec in slide_specs():
            t = time.perf_counter()
            path, meta = build(spec, work / "slides", sources)
            t_build = time.perf_counter() - t
            summary = run_segment(path, work / "out" / spec.name, seg_args)
            log(f"{spec.name}: built {t_build:.1f} s, segmented {time.perf_counter() - t - t_build:.1f} s")
            rows.append(
                {
                    "slide": spec.name,
                    "origin": spec.origin,
                    "centre": spec.centre,
                    "size": spec.size,
                    "true_fraction": meta.tumour_fraction,
                    "tumour_fraction": summary["tumour_fraction_of_tissue"],
                    "mean_uncertainty": summary["mean_uncertainty"],
                }
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    per_measure = {m: [r["mean_uncertainty"][m] for r in rows] for m in MEASURES}
    fractions = [r["tumour_fraction"] for r in rows]
    print(markdown_table(rows))
    print()
    for m, v in per_measure.items():
        print(f"- {m}: {min(v):.4f} .. {max(v):.4f} bits")
    print(f"- tumour_fraction_of_tissue: {min(fractions):.4f} .. {max(fractions):.4f}")
    print()
    print(f"UNCERTAINTY_BUCKETS = {uncertainty_buckets(per_measure)!r}")
    print(f"TUMOUR_FRACTION_BUCKETS = {tumour_fraction_buckets(fractions)!r}")
    print(f"\n{len(rows)} slides in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
