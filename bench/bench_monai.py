"""UGA Serve side by side with MONAI's inferers: the same slide, the same weights, one run (issue 16).

    .venv/bin/python bench/bench_monai.py [--model models/baseline] [--size 8192] [--rounds 3]
    .venv/bin/python bench/bench_monai.py --quick                     # pipeline check (tests)

Needs the bench extra (`pip install -e '.[bench]'`: MONAI, never installed for serving).

Contenders, each in a fresh process per round (so its peak RSS is its own), in alternating order:

- ``uga``: ``run_segmentation`` end to end, every artifact written (probability, four uncertainty
  maps, queue, overlays), through ONNX Runtime;
- ``monai_sw``: MONAI ``SlidingWindowInferer`` (256 px windows, the engine's 32 px overlap, batch 2,
  gaussian blending) on the whole analysis level (1 µm/px) read into memory; mean probability only;
- ``monai_patch``: MONAI ``PatchInferer`` over ``WSISlidingWindowSplitter`` tiles (OpenSlide, the
  same grid), keeping only tiles whose core holds tissue (the service's tissue mask), average merge.

MONAI runs the members in torch (the same ``members.pt`` the ONNX graph was exported from). Prints
the medians of wall time, tissue MP/s and peak RSS, the tiles each contender ran the network on and
its GFLOP/s, the ratios against UGA Serve, and a roofline line: the model's GFLOP per tile, the ONNX
session's GFLOP/s alone and UGA Serve's end to end, and this machine's float32 matmul peak. The
ceiling column says how much faster than a contender UGA Serve could be at all on the same weights
and tiles: its tiles at the matmul peak with no reading, stitching or writing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_engine import SlideSpec, ensure_slide, rss_kib  # noqa: E402

CONTENDERS = ("uga", "monai_sw", "monai_patch")
TILE, OVERLAP, BATCH, MPP = 256, 32, 2, 1.0  # the engine's defaults (service/options.py)


def mean_probability_net(model_dir: Path):
    """The ensemble's members in torch, as MONAI calls a network: (B, 3, H, W) in 0..1 -> (B, 1, H, W)."""
    import torch

    from models.fit import load_members
    from models.net import normalise

    members, _ = load_members(model_dir / "members.pt")

    class MeanProbability(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.members = torch.nn.ModuleList(members)

        def forward(self, x):
            x = normalise(x)
            return torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(dim=0)

    return MeanProbability().eval()


def count_passes(net) -> list[int]:
    """A one-element list that counts the tiles ``net`` is run on from now on (a forward pre-hook)."""
    passes = [0]

    def count(_module, inputs):
        passes[0] += int(inputs[0].shape[0])

    net.register_forward_pre_hook(count)
    return passes


def run_uga(slide: Path, model_dir: Path) -> dict:
    from service.inference.ensemble import load_ensemble
    from service.inference.pipeline import run_segmentation
    from service.options import SegmentationOptions

    ens = load_ensemble(model_dir)
    with tempfile.TemporaryDirectory(prefix="uga-bench-monai-") as tmp:
        t0 = time.perf_counter()
        summary = run_segmentation(slide, Path(tmp) / "out", ens, SegmentationOptions())
        wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "tiles": summary["tiles"]["computed"],
        "tissue_mp": summary["throughput"]["tissue_megapixels"],
        "tumour_px": round(summary["tumour_area_mm2"] * 1e6 / MPP**2),
    }


def run_monai_sw(slide: Path, model_dir: Path) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer

    from service.wsi.slide import RegionReader, analysis_shape, open_slide
    from service.wsi.tissue import tissue_mask

    torch.set_num_threads(os.cpu_count() or 1)
    net = mean_probability_net(model_dir)
    inferer = SlidingWindowInferer(TILE, sw_batch_size=BATCH, overlap=OVERLAP / TILE, mode="gaussian")
    t0 = time.perf_counter()
    with open_slide(slide) as s:
        h, w = analysis_shape(s, MPP)
        tissue = tissue_mask(s).crop(0, 0, h, w, MPP)
        image = RegionReader(s, MPP).read(0, 0, h, w)  # the whole level in memory
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)
    del image
    windows = count_passes(net)
    with torch.no_grad():
        prob = inferer(x, net)
    mask = (prob[0, 0] >= 0.5).numpy()
    return {"wall_s": time.perf_counter() - t0, "tiles": windows[0], "tumour_px": int((mask & tissue).sum())}


def run_monai_patch(slide: Path, model_dir: Path) -> dict:
    import torch
    from monai.inferers import AvgMerger, PatchInferer, WSISlidingWindowSplitter

    from service.inference.tiling import TileGrid
    from service.wsi.slide import analysis_shape, open_slide
    from service.wsi.tissue import tissue_mask

    torch.set_num_threads(os.cpu_count() or 1)
    net = mean_probability_net(model_dir)
    t0 = time.perf_counter()
    with open_slide(slide) as s:
        tissue = tissue_mask(s)
        h, w = analysis_shape(s, MPP)
        level = int(np.argmin([abs(d - MPP / s.mpp) for d in s.handle.level_downsamples]))
    grid = TileGrid(h, w, TILE, OVERLAP)
    occupied = grid.occupied(tissue, MPP)
    stride = grid.stride
    passes = count_passes(net)

    def has_tissue(_patch, location) -> bool:
        r, c = location[0] // stride, location[1] // stride
        return 0 <= r < grid.rows and 0 <= c < grid.cols and bool(occupied[r, c])

    splitter = WSISlidingWindowSplitter(TILE, overlap=OVERLAP, filter_fn=has_tissue, reader="OpenSlide", level=level)
    inferer = PatchInferer(splitter, AvgMerger, batch_size=BATCH, preprocessing=lambda x: x.float().div_(255.0))
    with torch.no_grad():
        prob = inferer(str(slide), net)
    mask = (prob[0, 0] >= 0.5).numpy()[:h, :w] & tissue.crop(0, 0, h, w, MPP)
    return {"wall_s": time.perf_counter() - t0, "tiles": passes[0], "tumour_px": int(mask.sum())}


def conv_gflop(net, side: int = TILE) -> float:
    """GFLOP (multiply-adds × 2) of every convolution of ``net`` on one ``side``² RGB input (torch hooks)."""
    import torch

    total = [0]

    def count(module, _inputs, output):
        k = module.weight.shape  # Conv2d: (out, in / groups, kh, kw); ConvTranspose2d: (in, out / groups, kh, kw)
        if isinstance(module, torch.nn.ConvTranspose2d):
            per_output = k[0] // module.groups * k[2] * k[3] // (module.stride[0] * module.stride[1])
        else:
            per_output = k[1] * k[2] * k[3]
        total[0] += 2 * output.numel() * per_output

    hooks = [
        m.register_forward_hook(count)
        for m in net.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        net(torch.rand(1, 3, side, side))
    for h in hooks:
        h.remove()
    return total[0] / 1e9


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 GEMM, best of ``repeats``: this machine's practical peak for the roofline."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = a.T.copy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def session_tiles_per_s(model_dir: Path, tiles: int = 64) -> float:
    """ONNX Runtime alone on real-sized batches of random tiles (no reading, no stitching)."""
    from service.inference.ensemble import load_ensemble

    ens = load_ensemble(model_dir)
    batch = np.random.default_rng(0).integers(0, 255, (BATCH, TILE, TILE, 3), dtype=np.uint8)
    ens.predict(batch)
    t0 = time.perf_counter()
    for _ in range(tiles // BATCH):
        ens.predict(batch)
    return tiles / (time.perf_counter() - t0)


def child(name: str, slide: Path, model_dir: Path) -> None:
    result = {"uga": run_uga, "monai_sw": run_monai_sw, "monai_patch": run_monai_patch}[name](slide, model_dir)
    result["peak_rss_mib"] = rss_kib() / 1024
    print(json.dumps(result))


def run_child(name: str, slide: Path, model_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--slide", str(slide), "--model", str(model_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_monai: {name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(runs: dict[str, list[dict]], tissue_mp: float, gflop: float, peak: float) -> list[dict]:
    """Medians per contender, its achieved GFLOP/s, and the ratios against UGA Serve. ``ceiling_of_uga``
    is the most UGA Serve could be faster than the contender on the same weights and tiles: its own
    tiles at the full matmul peak and nothing else."""
    rows = []
    for name in CONTENDERS:
        wall = statistics.median(r["wall_s"] for r in runs[name])
        rss = statistics.median(r["peak_rss_mib"] for r in runs[name])
        tiles = runs[name][0]["tiles"]
        tumour = runs[name][0]["tumour_px"] / max(1, runs["uga"][0]["tumour_px"])  # the same weights: ≈ 1
        rows.append(
            {
                "contender": name,
                "wall_s": wall,
                "tissue_mp_s": tissue_mp / wall,
                "peak_rss_mib": rss,
                "tiles": tiles,
                "gflops": tiles * gflop / wall,
                "tumour": tumour,
            }
        )
    uga = rows[0]
    uga_at_peak_s = uga["tiles"] * gflop / peak
    for r in rows:
        r["speedup_of_uga"] = r["wall_s"] / uga["wall_s"]  # how many times faster UGA Serve is
        r["ceiling_of_uga"] = r["wall_s"] / uga_at_peak_s
        r["rss_ratio_of_uga"] = uga["peak_rss_mib"] / r["peak_rss_mib"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "baseline")
    ap.add_argument("--size", type=int, default=8192, help="slide side, pixels at 0.5 µm/px")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a 2048² slide, one round")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.slide, args.model)
        return 0
    if args.quick:
        args.size, args.rounds = 2048, 1
    slide, _ = ensure_slide(SlideSpec(args.size, 0.6), [])
    runs: dict[str, list[dict]] = {n: [] for n in CONTENDERS}
    for r in range(args.rounds):
        for name in CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]:
            runs[name].append(run_child(name, slide, args.model))
            print(f"round {r + 1}: {name} {runs[name][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    tissue_mp = runs["uga"][0]["tissue_mp"]
    gflop = conv_gflop(mean_probability_net(args.model))
    peak = matmul_peak_gflops()
    rows = table(runs, tissue_mp, gflop, peak)
    alone = session_tiles_per_s(args.model) * gflop
    uga_tiles, end_to_end = rows[0]["tiles"], rows[0]["gflops"]
    lines = [
        f"Slide {args.size}² px at 0.5 µm/px ({tissue_mp:.1f} tissue MP at 1 µm/px), model `{args.model.name}`, "
        f"{args.rounds} alternating rounds, medians, {os.cpu_count()} CPUs.",
        "",
        "| contender | wall s | tissue MP/s | peak RSS MiB | tiles run | GFLOP/s | UGA Serve faster by "
        "| at most (UGA Serve at peak) | UGA Serve's RSS as a share | tumour px / UGA Serve's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['contender']} | {r['wall_s']:.1f} | {r['tissue_mp_s']:.2f} | {r['peak_rss_mib']:.0f} "
            f"| {r['tiles']} | {r['gflops']:.0f} | {r['speedup_of_uga']:.2f}× | {r['ceiling_of_uga']:.2f}× "
            f"| {r['rss_ratio_of_uga']:.2f} | {r['tumour']:.3f} |"
        )
    lines += [
        "",
        f"Roofline: {gflop:.2f} GFLOP per {TILE}² tile (every member's convolutions); ONNX session alone "
        f"{alone:.0f} GFLOP/s ({alone / peak:.0%} of peak), UGA Serve end to end {end_to_end:.0f} GFLOP/s "
        f"({end_to_end / peak:.0%}; {uga_tiles} tiles); float32 matmul peak {peak:.0f} GFLOP/s. "
        f'"At most": UGA Serve\'s {uga_tiles} tiles at that peak with no other work would take '
        f"{uga_tiles * gflop / peak:.1f} s; no speed-up on the same weights and tiles can pass that column.",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_monai.md").write_text(text + "\n")
    roofline = {"gflop_per_tile": gflop, "session_gflops": alone, "end_to_end_gflops": end_to_end, "peak": peak}
    (args.out / "bench_monai.json").write_text(json.dumps({"rows": rows, "runs": runs, "roofline": roofline}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
