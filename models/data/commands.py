"""`uga make-slides` and `uga demo`, plugged into the `uga` command line through entry points.

``register`` is the ``uga.commands`` entry point and ``build_demo_slide`` the ``uga.demo_slide``
one (see pyproject.toml), so the serving package never imports the slide generator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli import CliError, add_segment_options, print_summary, run_segment, segment_options
from service.config import get_settings

DEMO_SEED = 7


def _sources():
    """``ensure_sources()``, its failure shown as the CLI's one-line error."""
    from models.data.sources import SourceError, ensure_sources

    try:
        return ensure_sources()
    except SourceError as exc:
        raise CliError(str(exc)) from exc


def _build_demo(path: Path, centre: str) -> None:
    from models.data.slidegen import SIZES, build_slide

    path.parent.mkdir(parents=True, exist_ok=True)
    build_slide(path, size=SIZES["demo"], centre=centre, seed=DEMO_SEED, sources=_sources())


def build_demo_slide(path: Path) -> None:
    """Build the demo slide for `uga serve --demo-slide` (centre "mixed") at ``path`` unless it exists."""
    if not path.exists():
        print(f"uga: building demo slide {path} ...", file=sys.stderr)
        _build_demo(path, "mixed")


MAX_SLIDES_PER_CENTRE = 200  # a typo's worth of slides is minutes; this many is hours and gigabytes


def _count(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_SLIDES_PER_CENTRE:
        raise argparse.ArgumentTypeError(f"{value!r}: give 1 to {MAX_SLIDES_PER_CENTRE} slides per centre")
    return int(value)


def _seed(value: str) -> int:
    if not value.isdigit() or int(value) >= 2**32:
        raise argparse.ArgumentTypeError(f"{value!r} is not a seed (an integer from 0 to 2**32 - 1)")
    return int(value)


def cmd_make_slides(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.data.slidegen import CENTRES, SIZES, build_slide

    unknown = [c for c in args.centre if c not in CENTRES]
    if unknown:
        raise CliError(f"unknown centre {unknown[0]!r}; choose from {', '.join(CENTRES)}")
    if args.seed + args.count > 2**32:
        raise CliError("--seed plus --count must stay below 2**32")
    args.out.mkdir(parents=True, exist_ok=True)
    sources = _sources()
    jobs = [(c, i) for c in args.centre for i in range(args.count)]
    for centre, i in tqdm(jobs, desc="slides", unit="slide", disable=args.quiet, file=sys.stderr):
        path = args.out / f"{centre}-{i:02d}.tif"
        meta = build_slide(path, size=SIZES[args.size], centre=centre, seed=args.seed + i, sources=sources)
        print(f"{path}  tumour {meta.tumour_area_mm2:.2f} mm²  (mask: {path.with_suffix('.mask.tif').name})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the demo slide once, then segment it exactly as `uga segment` would."""
    from models.data.slidegen import CENTRES

    if args.centre not in CENTRES:
        raise CliError(f"unknown centre {args.centre!r}; choose from {', '.join(CENTRES)}")
    s = get_settings()
    slide = s.data_dir / "demo" / f"demo-{args.centre}.tif"
    out = args.out or s.data_dir / "demo" / f"result-{args.centre}"
    segment_options(args, out)  # refused options refuse before the slide is built
    if not slide.exists():
        print(f"building demo slide {slide} (centre {args.centre!r}) ...", file=sys.stderr)
        _build_demo(slide, args.centre)
    summary = run_segment(slide, out, args)
    print_summary(summary, out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `make-slides` and `demo` to the `uga` subcommands."""
    p = sub.add_parser("make-slides", help="compose demo/test slides from real H&E with exact masks")
    p.add_argument("--out", type=Path, required=True, help="folder for <centre>-NN.tif and its .mask.tif")
    p.add_argument("--centre", nargs="+", default=["source"], help="centres (source, stain, blur, ...)")
    p.add_argument(
        "--size",
        choices=["test-small", "demo", "bench", "bench-large"],
        default="test-small",
        help="slide size (default: test-small)",
    )
    p.add_argument("--count", type=_count, default=1, help=f"slides per centre (1 to {MAX_SLIDES_PER_CENTRE})")
    p.add_argument("--seed", type=_seed, default=0, help="first slide's seed (0 to 2**32 - 1 minus --count)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_make_slides)
    p = sub.add_parser("demo", help="build an out-of-domain demo slide (once) and segment it")
    p.add_argument("--centre", default="mixed", help="which hospital the demo slide imitates")
    p.add_argument("--out", type=Path, default=None)
    add_segment_options(p)
    p.set_defaults(func=cmd_demo)
