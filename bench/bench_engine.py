"""Engine benchmark: throughput, pipeline efficiency, tissue-proportional time, bounded memory.

Run from the repository root::

    python bench/bench_engine.py [--quick] [--out bench/results]

Prints two Markdown tables (measures against their goals, then the raw numbers) to stdout,
progress to stderr, and writes ``<out>/bench_engine.json``. Nothing here asserts on time: the
verdicts are information, not test failures.

Benchmark slides are built with ``models.data.slidegen.build_slide`` (centre "source", fixed seed) and
cached under ``$UGA_CACHE_DIR/bench-slides`` (default ``~/.cache/uga-serve/bench-slides``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from models.data.slidegen import SlideMeta, build_slide, companion_paths  # noqa: E402
from models.data.sources import cache_dir, ensure_sources  # noqa: E402
from service.inference.engine import segment  # noqa: E402
from service.inference.ensemble import Ensemble, load_ensemble  # noqa: E402
from service.inference.pipeline import run_segmentation  # noqa: E402
from service.inference.tiling import TileGrid  # noqa: E402
from service.options import SegmentationOptions  # noqa: E402
from service.wsi.slide import RegionReader, analysis_shape, open_slide  # noqa: E402
from service.wsi.tissue import tissue_mask  # noqa: E402

MODEL_DIR = ROOT / "models" / "baseline"
SEED = 20240611
CENTRE = "source"
SLIDE_MPP = 0.5

GOALS = {
    "efficiency_engine": 0.85,  # >=
    "tissue_time_ratio": 0.15,  # <= (issue 16 keeps it at 0.15)
    "peak_rss_ratio": 1.2,  # <=
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# slides


@dataclass(frozen=True)
class SlideSpec:
    side: int  # level-0 width = height
    tissue_fraction: float

    @property
    def name(self) -> str:
        return f"bench-{CENTRE}-{self.side}-tf{round(self.tissue_fraction * 100):03d}.tif"


def bench_dir() -> Path:
    return cache_dir() / "bench-slides"


def ensure_slide(spec: SlideSpec, sources_box: list) -> tuple[Path, SlideMeta]:
    """The cached slide for ``spec`` (built on first use; the JSON companion is written last)."""
    path = bench_dir() / spec.name
    _, json_path = companion_paths(path)
    if path.is_file() and json_path.is_file():
        meta = SlideMeta.from_json(json_path.read_text())
        if tuple(meta.size) == (spec.side, spec.side) and meta.seed == SEED:
            return path, meta
    if not sources_box:
        log("loading source images (ensure_sources)")
        sources_box.append(ensure_sources())
    eta = " — this takes several minutes the first time, cached afterwards" if spec.side > 8192 else ""
    log(f"building slide {spec.name} ({spec.side}x{spec.side} @ {SLIDE_MPP} µm/px){eta}")
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 15 or done == total:
            last[0] = now
            log(f"  building {spec.name}: {100 * done / total:5.1f}% of rows")

    meta = build_slide(
        path,
        size=(spec.side, spec.side),
        centre=CENTRE,
        seed=SEED,
        sources=sources_box[0],
        mpp=SLIDE_MPP,
        tissue_fraction=spec.tissue_fraction,
        progress=progress,
    )
    log(f"built {spec.name} in {time.perf_counter() - t0:.1f}s (tissue fraction {meta.tissue_fraction:.3f})")
    return path, meta


# ---------------------------------------------------------------------------------------------
# measurements


def seg_options() -> SegmentationOptions:
    return SegmentationOptions()  # defaults: mpp 1.0, tile 256, overlap 32, batch 2


def time_segment(path: Path, ens: Ensemble) -> dict:
    """One engine run (``service.inference.engine.segment``): tiles computed, wall seconds, engine timings."""
    slide = open_slide(path)
    work = Path(tempfile.mkdtemp(prefix="uga-bench-seg-"))
    try:
        t0 = time.perf_counter()
        res = segment(slide, ens, work, seg_opts := seg_options())
        wall = time.perf_counter() - t0
        res.close()
        tissue_mp = float(res.tissue.mask.sum()) * (res.tissue.mpp / seg_opts.mpp) ** 2 / 1e6
        return {
            "wall_s": wall,
            "tiles": res.tiles_computed,
            "grid_tiles": res.tiles_total,
            "tissue_mp_coarse": tissue_mp,
            "timings": {k: round(v, 4) for k, v in res.timings.items()},
        }
    finally:
        slide.close()
        shutil.rmtree(work, ignore_errors=True)


def time_predict_only(path: Path, ens: Ensemble) -> dict:
    """The same occupied tiles, read into memory first; only ``ensemble.predict`` is timed."""
    opt = seg_options()
    with open_slide(path) as slide:
        t0 = time.perf_counter()
        tissue = tissue_mask(slide)
        height, width = analysis_shape(slide, opt.mpp)
        grid = TileGrid(height, width, opt.tile, opt.overlap)
        occupied = grid.occupied(tissue, opt.mpp)
        reader = RegionReader(slide, opt.mpp)
        tiles = []
        for r in range(grid.rows):
            for c in range(grid.cols):
                if occupied[r, c]:
                    y, x = grid.origin(r, c)
                    tiles.append(reader.read(y, x, opt.tile, opt.tile))
        read_s = time.perf_counter() - t0
    batches = [np.stack(tiles[i : i + opt.batch]) for i in range(0, len(tiles), opt.batch)]
    del tiles
    per_batch = []
    t0 = time.perf_counter()
    for b in batches:
        t1 = time.perf_counter()
        ens.predict(b)
        per_batch.append(time.perf_counter() - t1)
    predict_s = time.perf_counter() - t0
    return {
        "tiles": sum(len(b) for b in batches),
        "predict_s": predict_s,
        "batch_median_s": float(np.median(per_batch)) if per_batch else 0.0,
        "serial_read_s": read_s,
    }


def time_run(path: Path, ens: Ensemble) -> dict:
    """``service.inference.pipeline.run_segmentation`` end to end, every artifact written."""
    out = Path(tempfile.mkdtemp(prefix="uga-bench-run-"))
    try:
        t0 = time.perf_counter()
        summary = run_segmentation(path, out / "result", ens, SegmentationOptions())
        wall = time.perf_counter() - t0
        return {
            "wall_s": wall,
            "tiles": summary["tiles"]["computed"],
            "grid_tiles": summary["tiles"]["grid"],
            "throughput": summary["throughput"],
            "timings_s": summary["timings_s"],
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def best(runs: list[dict], key: str) -> dict:
    return min(runs, key=lambda r: r[key])


def rss_kib() -> int:
    """Peak RSS of this process's memory (KiB).

    ru_maxrss alone is wrong here: Linux carries the parent's peak across fork+exec into the
    child's ru_maxrss (signal->maxrss), so a child of a ~700 MB benchmark would report at least
    that. VmHWM belongs to the exec'd image only (and clear_refs resets it).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def memory_child(path: str, model_dir: str) -> None:
    """Fresh process: load the model, run ``run_segmentation``, print peak RSS (KiB) as JSON.

    ``service.inference.pipeline.segment`` is wrapped so the peak is also read right after the engine
    finished (ru_maxrss only grows, so this is the engine's own peak).
    """
    import service.inference.pipeline as pipeline

    def current_kib() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    ens = load_ensemble(Path(model_dir))
    ens.predict(np.full((2, 512, 512, 3), 230, np.uint8))  # the batch shape segment uses
    load_peak = rss_kib()
    # Reset the peak (VmHWM, which ru_maxrss reports) so the load's transient peak does not mask
    # the run's; Linux >= 4.0. Without it the numbers include the load peak (flagged in the JSON).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    after_load = current_kib()
    marks: dict = {"load_peak_kib": load_peak, "peak_reset": reset}
    inner = pipeline.segment

    def wrapped(*args, **kwargs):
        res = inner(*args, **kwargs)
        marks["after_segment_kib"] = rss_kib()
        marks["tiles"] = res.tiles_computed
        marks["segment_s"] = res.timings.get("total_s")
        return res

    pipeline.segment = wrapped
    out = Path(tempfile.mkdtemp(prefix="uga-bench-mem-"))
    try:
        t0 = time.perf_counter()
        run_segmentation(Path(path), out / "result", ens, SegmentationOptions())
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    ru = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(
        json.dumps({"after_load_kib": after_load, "end_kib": rss_kib(), "ru_maxrss_kib": ru, "wall_s": wall, **marks})
    )


def measure_memory(path: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", str(path), str(MODEL_DIR)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed on {path.name}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# report


def verdict(value: float, goal: float, higher_is_better: bool) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    return "meets" if ok else "misses"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller slides, single runs (~3 minutes)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="directory for the JSON")
    ap.add_argument("--repeats", type=int, default=0, help="best-of-N for the small runs (default 1 quick, 2 full)")
    ap.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory_child:
        memory_child(*args._memory_child)
        return 0

    quick = args.quick
    side = 4096 if quick else 8192
    mem_small, mem_large = (4096, 16384) if quick else (8192, 32768)
    repeats = args.repeats or (1 if quick else 2)
    t_bench = time.perf_counter()

    sources_box: list = []
    bench_slide, bench_meta = ensure_slide(SlideSpec(side, 0.6), sources_box)
    low_slide, low_meta = ensure_slide(SlideSpec(side, 0.1), sources_box)
    full_slide, full_meta = ensure_slide(SlideSpec(side, 0.98), sources_box)
    mem_small_slide, _ = ensure_slide(SlideSpec(mem_small, 0.1), sources_box)
    mem_large_slide, _ = ensure_slide(SlideSpec(mem_large, 0.1), sources_box)
    sources_box.clear()

    log(f"loading ensemble from {MODEL_DIR}")
    ens = load_ensemble(MODEL_DIR)
    ens.warm_up(512)
    log(f"providers {ens.providers}, {ens.members} members, {os.cpu_count()} CPUs")

    # 1 + 2: throughput and efficiency on the bench slide (interleaved so noise hits all alike)
    runs, segs, preds = [], [], []
    for i in range(repeats):
        log(f"[{i + 1}/{repeats}] run_segmentation on {bench_slide.name}")
        runs.append(time_run(bench_slide, ens))
        log(f"  wall {runs[-1]['wall_s']:.1f}s, {runs[-1]['tiles']} tiles, {runs[-1]['throughput']}")
        log(f"[{i + 1}/{repeats}] engine segment on {bench_slide.name}")
        segs.append(time_segment(bench_slide, ens))
        log(f"  wall {segs[-1]['wall_s']:.1f}s, timings {segs[-1]['timings']}")
        log(f"[{i + 1}/{repeats}] predict-only on the same tiles in memory")
        preds.append(time_predict_only(bench_slide, ens))
        log(f"  {preds[-1]['tiles']} tiles in {preds[-1]['predict_s']:.1f}s")
    run, seg, pred = best(runs, "wall_s"), best(segs, "wall_s"), best(preds, "predict_s")
    if not (seg["tiles"] == pred["tiles"] == run["tiles"]):
        counts = f"segment {seg['tiles']}, predict {pred['tiles']}, run {run['tiles']}"
        log(f"WARNING tile counts differ: {counts}")
    pred_tps = pred["tiles"] / pred["predict_s"]
    seg_tps = seg["tiles"] / seg["wall_s"]
    run_tps = run["tiles"] / run["wall_s"]
    eff_engine = seg_tps / pred_tps
    eff_run = run_tps / pred_tps
    # noise-robust cross-check: both numbers come from the same run, so a neighbour's load hits both
    infer_share = seg["timings"]["infer_s"] / seg["timings"]["total_s"]
    # > 1: predict() itself ran slower inside the engine (CPU/GIL contention with reader/stitcher)
    infer_slowdown = (seg["timings"]["infer_s"] / seg["tiles"]) / (pred["predict_s"] / pred["tiles"])
    tissue_mp = run["throughput"]["tissue_megapixels"]
    e2e_mp_s = tissue_mp / run["wall_s"]

    # 3: tissue-proportional time
    lows, fulls = [], []
    for i in range(repeats):
        log(f"[{i + 1}/{repeats}] engine segment on {low_slide.name} (low tissue)")
        lows.append(time_segment(low_slide, ens))
        log(f"  wall {lows[-1]['wall_s']:.1f}s, {lows[-1]['tiles']}/{lows[-1]['grid_tiles']} tiles")
        log(f"[{i + 1}/{repeats}] engine segment on {full_slide.name} (near-full tissue)")
        fulls.append(time_segment(full_slide, ens))
        log(f"  wall {fulls[-1]['wall_s']:.1f}s, {fulls[-1]['tiles']}/{fulls[-1]['grid_tiles']} tiles")
    low, full = best(lows, "wall_s"), best(fulls, "wall_s")
    tissue_ratio = low["wall_s"] / full["wall_s"]
    del ens

    # 4: peak memory, each in a fresh process
    log(f"peak RSS: run_segmentation on {mem_small_slide.name} in a fresh process")
    mem_s = measure_memory(mem_small_slide)
    log(f"  {mem_s}")
    log(f"peak RSS: run_segmentation on {mem_large_slide.name} in a fresh process")
    mem_l = measure_memory(mem_large_slide)
    log(f"  {mem_l}")
    rss_ratio_engine = mem_l["after_segment_kib"] / mem_s["after_segment_kib"]
    rss_ratio_run = mem_l["end_kib"] / mem_s["end_kib"]

    mib = 1024.0
    small_lbl, large_lbl = f"{mem_small}²", f"{mem_large}²"
    measures = [
        {
            "measure": f"throughput, run_segmentation, {side}² tf0.6 (tissue MP/s, summary)",
            "value": run["throughput"]["tissue_mp_per_s"],
            "goal": None,
        },
        {
            "measure": "throughput, run_segmentation incl. outputs (tissue MP/s, wall)",
            "value": round(e2e_mp_s, 4),
            "goal": None,
        },
        {"measure": "throughput (tiles/s, summary)", "value": run["throughput"]["tiles_per_s"], "goal": None},
        {
            "measure": "pipeline efficiency, engine segment / predict-only",
            "value": round(eff_engine, 3),
            "goal": GOALS["efficiency_engine"],
            "higher": True,
        },
        {
            "measure": "diagnostic: share of engine wall inside predict (infer_s / total_s)",
            "value": round(infer_share, 3),
            "goal": None,
        },
        {
            "measure": "diagnostic: predict slowdown in engine (infer_s per tile / predict-only per tile)",
            "value": round(infer_slowdown, 3),
            "goal": None,
        },
        {
            "measure": "pipeline efficiency, run_segmentation (with outputs) / predict-only",
            "value": round(eff_run, 3),
            "goal": GOALS["efficiency_engine"],
            "higher": True,
        },
        {
            "measure": f"segment time, tf0.1 / tf0.98 ({side}²)",
            "value": round(tissue_ratio, 3),
            "goal": GOALS["tissue_time_ratio"],
            "higher": False,
        },
        {
            "measure": f"peak RSS during engine segment, {large_lbl} / {small_lbl} (tf0.1)",
            "value": round(rss_ratio_engine, 3),
            "goal": GOALS["peak_rss_ratio"],
            "higher": False,
        },
        {
            "measure": f"peak RSS whole run_segmentation, {large_lbl} / {small_lbl} (tf0.1)",
            "value": round(rss_ratio_run, 3),
            "goal": GOALS["peak_rss_ratio"],
            "higher": False,
        },
    ]
    for m in measures:
        if m["goal"] is None:
            m["goal_text"], m["verdict"] = "—", "—"
        else:
            higher = m.pop("higher")
            m["goal_text"] = ("≥ " if higher else "≤ ") + str(m["goal"])
            m["verdict"] = verdict(m["value"], m["goal"], higher)
    rows1 = [[m["measure"], m["value"], m["goal_text"], m["verdict"]] for m in measures]

    def t(d: dict, k: str) -> str:
        return f"{d['timings'].get(k, 0.0):.2f}"

    rows2 = [
        [
            f"run_segmentation {side}² tf0.6",
            f"{run['wall_s']:.2f}",
            run["tiles"],
            tissue_mp,
            f"segment {run['timings_s']['total_s']:.2f}s, outputs {run['timings_s']['outputs_s']:.2f}s, "
            f"read {run['timings_s']['read_s']:.2f}s, infer {run['timings_s']['infer_s']:.2f}s, "
            f"stitch {run['timings_s']['stitch_s']:.2f}s",
        ],
        [
            f"engine segment {side}² tf0.6",
            f"{seg['wall_s']:.2f}",
            seg["tiles"],
            round(seg["tissue_mp_coarse"], 3),
            f"tissue {t(seg, 'tissue_s')}s, read {t(seg, 'read_s')}s (thread), infer {t(seg, 'infer_s')}s, "
            f"stitch {t(seg, 'stitch_s')}s (thread)",
        ],
        [
            "predict-only, same tiles in memory",
            f"{pred['predict_s']:.2f}",
            pred["tiles"],
            "",
            f"{pred_tps:.3f} tiles/s; median batch of {seg_options().batch} "
            f"{pred['batch_median_s']:.3f}s; serial read of the tiles took {pred['serial_read_s']:.2f}s",
        ],
        [
            f"engine segment {side}² tf0.1",
            f"{low['wall_s']:.2f}",
            f"{low['tiles']}/{low['grid_tiles']}",
            round(low["tissue_mp_coarse"], 3),
            f"slide tissue fraction {low_meta.tissue_fraction:.3f}; infer {t(low, 'infer_s')}s, "
            f"tissue mask {t(low, 'tissue_s')}s",
        ],
        [
            f"engine segment {side}² tf0.98",
            f"{full['wall_s']:.2f}",
            f"{full['tiles']}/{full['grid_tiles']}",
            round(full["tissue_mp_coarse"], 3),
            f"slide tissue fraction {full_meta.tissue_fraction:.3f}; infer {t(full, 'infer_s')}s",
        ],
    ]
    for lbl, m in ((small_lbl, mem_s), (large_lbl, mem_l)):
        rows2.append(
            [
                f"peak RSS run_segmentation {lbl} tf0.1 (fresh process)",
                f"{m['wall_s']:.2f}",
                m.get("tiles", ""),
                "",
                f"load peak {m['load_peak_kib'] / mib:.0f} MiB, resident after load+warm-up "
                f"{m['after_load_kib'] / mib:.0f} MiB; peak{'' if m['peak_reset'] else ' (NOT reset)'} "
                f"during engine {m['after_segment_kib'] / mib:.0f} MiB, "
                f"whole run {m['end_kib'] / mib:.0f} MiB",
            ]
        )

    print(f"## bench_engine ({'quick' if quick else 'full'}) — {platform.node()}, {os.cpu_count()} CPUs\n")
    print(md_table(["measure", "value", "goal", "verdict"], rows1))
    print()
    print(md_table(["run", "seconds", "tiles", "tissue MP", "notes"], rows2))
    sys.stdout.flush()

    result = {
        "mode": "quick" if quick else "full",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "options": {"mpp": 1.0, "tile": 512, "overlap": 32, "batch": 2, "repeats": repeats},
        "slides": {
            "bench": {"path": str(bench_slide), "side": side, "tissue_fraction": bench_meta.tissue_fraction},
            "low": {"path": str(low_slide), "side": side, "tissue_fraction": low_meta.tissue_fraction},
            "full": {"path": str(full_slide), "side": side, "tissue_fraction": full_meta.tissue_fraction},
            "memory": [str(mem_small_slide), str(mem_large_slide)],
        },
        "measures": measures,
        "raw": {
            "run_segmentation": runs,
            "segment": segs,
            "predict_only": preds,
            "segment_low": lows,
            "segment_full": fulls,
            "memory_small": mem_s,
            "memory_large": mem_l,
        },
        "bench_wall_s": round(time.perf_counter() - t_bench, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_engine.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out / 'bench_engine.json'} (bench took {result['bench_wall_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
