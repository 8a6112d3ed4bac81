"""The uncertainty gate of the pre-registered protocol (bench/PROTOCOL.md): before any selection run,
does each measure find the model's errors, per centre, on slides never selected from?

    .venv/bin/python bench/uncertainty_gate.py [--model models/baseline] [--slides 4] [--size 6144]
    .venv/bin/python bench/uncertainty_gate.py --model DIR --quick      # pipeline check (small slides)

Builds (once, cached) the protocol's evaluation slides of every local-shift centre
(models/data/localshift.py; seeds from ``EVAL_SEED``, disjoint from training), runs the ensemble on
every 256 µm tissue tile at 1 µm/px and reports, per centre and measure:

- error-AUROC: how well the measure ranks the model's wrong pixels (p̄ ≥ 0.5 against the truth)
  above its right ones, with a 95 % bootstrap CI over slides (tissue pixels sampled per slide);
- Spearman: between a tile's mean score and its error (FP + FN share of its tissue);
- the share of errors made confidently (every member at p > 0.9 or < 0.1);
- measures: the paper's UGA score, entropy, BALD (mutual information), feature-space novelty, and the
  region scores over predicted-negative areas (``neg_uga``, ``neg_novelty``: a tile's mean over its
  pixels the model calls normal; aimed at confident misses, and the service's ``negative`` scoring);
- misses: in the tissue the model calls normal, the AUROC of each pixel score and of its tile's region
  score for the pixels that are tumour (misses), and for those missed with every member below 0.1
  (confident misses), 95 % CI over slides (``MISS_PIXELS_PER_TILE`` pixels sampled per tile).

Ensemble size: Dice (pooled over a centre's tissue tiles) and the UGA score's error-AUROC of the
first 1, 3 and all members (one member's UGA score is its entropy).

And the slide-level out-of-distribution flag: AUROC of each slide's share of tissue beyond the
novelty threshold for ``nonhed`` (and every shifted centre) against ``source`` slides.
Prints Markdown tables (stdout) and writes them with the raw numbers to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.data.localshift import LOCAL_CENTRES, build_local_slide  # noqa: E402
from models.data.slidegen import companion_paths, slide_seed  # noqa: E402
from models.data.sources import cache_dir  # noqa: E402
from models.data.textures import texture_bank  # noqa: E402
from service.inference.engine import cells_to_pixels  # noqa: E402
from service.inference.ensemble import load_ensemble  # noqa: E402
from service.inference.evaluation import auroc  # noqa: E402
from service.inference.uncertainty import all_measures  # noqa: E402
from service.wsi.slide import RegionReader, open_slide  # noqa: E402
from service.wsi.tissue import tissue_mask  # noqa: E402

EVAL_SEED = 77_000  # the protocol's evaluation slides (training uses 1234+, the shortcut gate 4242)
TILE, MPP = 256, 1.0
PIXELS_PER_SLIDE = 4000  # tissue pixels sampled per slide for the pixel-level AUROC
BOOTSTRAP = 2000
CONFIDENT = 0.9
MISS_PIXELS_PER_TILE = 128  # predicted-normal tissue pixels sampled per tile for the misses table
TARGET_AUROC = 0.80
TARGET_FLAG_AUROC = 0.90
ENSEMBLE_SIZES = (1, 3)  # and every member


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class SlideResult:
    centre: str
    pixels: dict[str, np.ndarray]  # measure -> sampled pixel scores; "error" -> bool
    tiles: dict[str, list[float]] = field(default_factory=dict)  # measure -> tile scores; "error" -> share
    errors: int = 0
    confident_errors: int = 0
    novelty_share: float | None = None
    size_counts: dict[int, np.ndarray] = field(default_factory=dict)  # first k members -> (tp, fp, fn)
    misses: dict[str, np.ndarray] = field(default_factory=dict)  # predicted-normal pixels: scores, "miss"...
    tissue_mm2: float = 0.0  # the slide's tissue area (PROTOCOL.md: at least 4 mm² per evaluation slide)


def eval_slides(centre: str, n: int, size: int, out: Path) -> list[Path]:
    """The protocol's evaluation slides of ``centre`` (built once into ``out``)."""
    paths = []
    for i in range(n):
        path = out / f"{centre}-{size}-{i}.tif"
        if not (path.exists() and companion_paths(path)[0].exists()):
            seed = slide_seed(EVAL_SEED, centre, i)
            build_local_slide(path, size=(size, size), centre=centre, seed=seed, bank=texture_bank())
        paths.append(path)
    return paths


def analyse_slide(path: Path, centre: str, ensemble, rng: np.random.Generator) -> SlideResult:
    """Every tissue tile of the slide through the ensemble; pixel samples and tile scores."""
    with open_slide(path) as slide, open_slide(companion_paths(path)[0]) as mask:
        tissue = tissue_mask(slide)
        image, truth = RegionReader(slide, MPP), RegionReader(mask, MPP)
        h, w = image.shape
        names = ["uga", "entropy", "mutual_information"] + (["novelty"] if ensemble.novelty else [])
        region = ["neg_uga"] + (["neg_novelty"] if ensemble.novelty else [])
        pix: dict[str, list] = {k: [] for k in [*names, "error"]}
        miss_rng = np.random.default_rng(zlib.crc32(path.name.encode()))  # not ``rng``: the other tables stay
        miss: dict[str, list] = {k: [] for k in ["uga", *region, "miss", "confident_miss"]}
        if ensemble.novelty:
            miss["novelty"] = []
        res = SlideResult(centre, {}, {k: [] for k in [*names, *region, "error"]})
        res.tissue_mm2 = float(tissue.mask.sum()) * (tissue.mpp / 1000) ** 2
        novel_px = tissue_px = 0
        sizes: list[int] = []
        for y in range(0, h - TILE + 1, TILE):
            for x in range(0, w - TILE + 1, TILE):
                on = tissue.crop(y, x, TILE, TILE, MPP)
                if on.mean() < 0.5:
                    continue
                out = ensemble.predict_outputs(image.read(y, x, TILE, TILE)[None])
                probs = out["member_probs"]
                m = all_measures(probs[0])
                sizes = sizes or sorted({k for k in ENSEMBLE_SIZES if k < probs.shape[1]} | {probs.shape[1]})
                if ensemble.novelty:
                    m["novelty"] = cells_to_pixels(out["novelty"][0, 0], TILE)
                    novel_px += int(np.count_nonzero((m["novelty"] > ensemble.novelty_threshold) & on))
                tissue_px += int(on.sum())
                pred = m["probability"] >= 0.5
                true = (truth.read(y, x, TILE, TILE)[..., 0] > 127) & on
                wrong = (pred != true) & on
                confident = (probs[0].min(axis=0) > CONFIDENT) | (probs[0].max(axis=0) < 1 - CONFIDENT)
                res.errors += int(wrong.sum())
                res.confident_errors += int((wrong & confident).sum())
                res.tiles["error"].append(float(wrong.sum() / on.sum()))
                for k in names:
                    res.tiles[k].append(float(m[k][on].mean()))
                negative = on & ~pred
                for k in region:
                    src = m[k.removeprefix("neg_")]
                    res.tiles[k].append(float(src[negative].mean()) if negative.any() else 0.0)
                called_normal = np.flatnonzero(negative.ravel())
                if len(called_normal):
                    take_n = min(len(called_normal), MISS_PIXELS_PER_TILE)
                    at = miss_rng.choice(called_normal, size=take_n, replace=False)
                    tumour = true.ravel()[at]
                    miss["miss"].append(tumour)
                    miss["confident_miss"].append(tumour & (probs[0].max(axis=0).ravel()[at] < 1 - CONFIDENT))
                    for k in miss:
                        if k in region:
                            miss[k].append(np.full(len(at), res.tiles[k][-1]))
                        elif k not in ("miss", "confident_miss"):
                            miss[k].append(m[k].ravel()[at])
                idx = np.flatnonzero(on.ravel())
                take = rng.choice(idx, size=min(len(idx), 64), replace=False)
                for k in names:
                    pix[k].append(m[k].ravel()[take])
                pix["error"].append(wrong.ravel()[take])
                for n in sizes:
                    mk = m if n == probs.shape[1] else all_measures(probs[0][:n])
                    guess = (mk["probability"] >= 0.5) & on
                    counts = [np.count_nonzero(guess & true), np.count_nonzero(guess & ~true)]
                    counts.append(np.count_nonzero(~guess & true))
                    res.size_counts[n] = res.size_counts.get(n, np.zeros(3, np.int64)) + counts
                    pix.setdefault(f"uga@{n}", []).append(mk["uga"].ravel()[take])
                    pix.setdefault(f"error@{n}", []).append(((guess != true) & on).ravel()[take])
        res.pixels = {k: np.concatenate(v) if v else np.zeros(0) for k, v in pix.items()}
        res.misses = {k: np.concatenate(v) if v else np.zeros(0) for k, v in miss.items()}
        if len(res.pixels["error"]) > PIXELS_PER_SLIDE:  # the same number of pixels from every slide
            keep = rng.choice(len(res.pixels["error"]), PIXELS_PER_SLIDE, replace=False)
            res.pixels = {k: v[keep] for k, v in res.pixels.items()}
        res.novelty_share = novel_px / tissue_px if ensemble.novelty and tissue_px else None
        return res


def bootstrap_auroc(slides: list[SlideResult], measure: str, rng: np.random.Generator, error: str = "error") -> tuple:
    """AUROC of ``measure`` for the errors, pooled over slides, and a 95 % CI resampling slides."""
    point = auroc(
        np.concatenate([s.pixels[measure] for s in slides]), np.concatenate([s.pixels[error] for s in slides])
    )
    values = []
    for _ in range(BOOTSTRAP):
        pick = rng.integers(len(slides), size=len(slides))
        a = auroc(
            np.concatenate([slides[i].pixels[measure] for i in pick]),
            np.concatenate([slides[i].pixels[error] for i in pick]),
        )
        if a is not None:
            values.append(a)
    lo, hi = np.percentile(values, [2.5, 97.5]) if values else (float("nan"), float("nan"))
    return point, float(lo), float(hi)


def centre_table(by_centre: dict[str, list[SlideResult]], rng: np.random.Generator) -> tuple[list[dict], str]:
    rows, lines = [], []
    lines.append("| centre | covered | measure | error-AUROC [95 % CI] | Spearman (tiles) | target |")
    lines.append("|---|---|---|---|---|---|")
    for centre, slides in by_centre.items():
        measures = [k for k in slides[0].tiles if k != "error"]
        tile_err = np.concatenate([s.tiles["error"] for s in slides])
        for k in measures:
            if k in slides[0].pixels:
                point, lo, hi = bootstrap_auroc(slides, k, rng)
            else:
                point, lo, hi = None, float("nan"), float("nan")
            rho = spearmanr(np.concatenate([s.tiles[k] for s in slides]), tile_err).statistic
            covered = LOCAL_CENTRES[centre].covered
            verdict = (
                ""
                if point is None or centre == "source" or not covered
                else ("meets" if lo >= TARGET_AUROC else ("misses" if hi < TARGET_AUROC else "undecided"))
            )
            rows.append({"centre": centre, "measure": k, "auroc": point, "ci": [lo, hi], "spearman": float(rho)})
            auc = "–" if point is None else f"{point:.3f} [{lo:.3f}, {hi:.3f}]"
            lines.append(f"| {centre} | {'yes' if covered else 'no'} | {k} | {auc} | {rho:.3f} | {verdict} |")
    return rows, "\n".join(lines)


def size_table(by_centre: dict[str, list[SlideResult]], rng: np.random.Generator) -> tuple[dict, str]:
    """Dice and the UGA score's error-AUROC of the first k members, per centre."""
    lines = ["| centre | members | Dice (tissue tiles) | error-AUROC of UGA [95 % CI] |", "|---|---|---|---|"]
    out: dict[str, dict] = {}
    for centre, slides in by_centre.items():
        for n in sorted(slides[0].size_counts):
            tp, fp, fn = sum(s.size_counts[n] for s in slides)
            dice = 2 * tp / max(1, 2 * tp + fp + fn)
            point, lo, hi = bootstrap_auroc(slides, f"uga@{n}", rng, error=f"error@{n}")
            out.setdefault(centre, {})[n] = {"dice": dice, "auroc": point, "ci": [lo, hi]}
            auc = "–" if point is None else f"{point:.3f} [{lo:.3f}, {hi:.3f}]"
            lines.append(f"| {centre} | {n} | {dice:.3f} | {auc} |")
    return out, "\n".join(lines)


def confident_table(by_centre: dict[str, list[SlideResult]]) -> tuple[dict, str]:
    lines = [
        "| centre | error pixels (share of tissue tiles' pixels) | confident errors (every member > 0.9 or < 0.1) "
        "| slides' tissue, mm² |"
    ]
    lines.append("|---|---|---|---|")
    out = {}
    for centre, slides in by_centre.items():
        errors = sum(s.errors for s in slides)
        confident = sum(s.confident_errors for s in slides)
        share = confident / errors if errors else 0.0
        areas = [round(s.tissue_mm2, 2) for s in slides]
        out[centre] = {"errors": errors, "confident_share": share, "tissue_mm2": areas}
        mean_err = np.mean(np.concatenate([s.tiles["error"] for s in slides]))
        lines.append(f"| {centre} | {errors} ({mean_err:.3f}) | {share:.3f} | {', '.join(f'{a:.1f}' for a in areas)} |")
    return out, "\n".join(lines)


def misses_table(by_centre: dict[str, list[SlideResult]], rng: np.random.Generator) -> tuple[list[dict], str]:
    """In the tissue called normal: how well each score ranks the missed tumour, and the confident misses."""
    lines = [
        "Misses: in the tissue the model calls normal, AUROC of each score for its tumour pixels (missed), "
        "and for those missed with every member below 0.1 (confidently); `neg_*` is the pixel's tile's "
        "region score, the others the pixel's own:",
        "",
        "| centre | score | misses: AUROC [95 % CI] | confident misses: AUROC [95 % CI] "
        "| sampled: normal / missed / confidently |",
        "|---|---|---|---|---|",
    ]
    rows = []
    for centre, slides in by_centre.items():
        called_normal = [SlideResult(centre, s.misses) for s in slides]
        counts = [int(sum(len(s.misses["miss"]) for s in slides))]
        counts += [int(sum(s.misses[k].sum() for s in slides)) for k in ("miss", "confident_miss")]
        for k in [k for k in slides[0].misses if k not in ("miss", "confident_miss")]:
            row = {"centre": centre, "score": k, "sampled": counts}
            cells = []
            for label in ("miss", "confident_miss"):
                point, lo, hi = bootstrap_auroc(called_normal, k, rng, error=label)
                row[label] = {"auroc": point, "ci": [lo, hi]}
                cells.append("–" if point is None else f"{point:.3f} [{lo:.3f}, {hi:.3f}]")
            rows.append(row)
            lines.append(f"| {centre} | {k} | {cells[0]} | {cells[1]} | {' / '.join(map(str, counts))} |")
    return rows, "\n".join(lines)


def flag_table(by_centre: dict[str, list[SlideResult]]) -> tuple[dict, str]:
    source = [s.novelty_share for s in by_centre.get("source", [])]
    if not source or source[0] is None:
        return {}, "(the model has no novelty output: no slide-level flag)"
    lines = ["| centre | slides' share of tissue beyond the novelty threshold | AUROC against source | target |"]
    lines.append("|---|---|---|---|")
    out = {}
    for centre, slides in by_centre.items():
        shares = [s.novelty_share for s in slides]
        a = (
            None
            if centre == "source"
            else auroc(np.r_[shares, source], np.r_[np.ones(len(shares)), np.zeros(len(source))])
        )
        target = "" if centre != "nonhed" or a is None else ("meets" if a >= TARGET_FLAG_AUROC else "misses")
        out[centre] = {"shares": shares, "auroc": a}
        lines.append(
            f"| {centre} | {', '.join(f'{v:.3f}' for v in shares)} | {'–' if a is None else f'{a:.3f}'} | {target} |"
        )
    return out, "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "baseline", help="ensemble.onnx + card.json")
    ap.add_argument("--slides", type=int, default=4, help="evaluation slides per centre")
    ap.add_argument("--size", type=int, default=6144, help="slide side, pixels at 0.5 µm/px")
    ap.add_argument("--centres", nargs="*", default=list(LOCAL_CENTRES))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "uncertainty-gate")
    ap.add_argument("--quick", action="store_true", help="2 small slides per centre, source and nonhed")
    args = ap.parse_args()
    if args.quick:
        args.slides, args.size, args.centres = 2, 1536, ["source", "nonhed"]
    t0 = time.time()
    ensemble = load_ensemble(args.model, threads=0)
    rng = np.random.default_rng(0)
    slide_dir = cache_dir() / "protocol-eval"
    slide_dir.mkdir(parents=True, exist_ok=True)
    by_centre: dict[str, list[SlideResult]] = {}
    for centre in args.centres:
        for path in eval_slides(centre, args.slides, args.size, slide_dir):
            by_centre.setdefault(centre, []).append(analyse_slide(path, centre, ensemble, rng))
            log(f"{path.name}: done ({time.time() - t0:.0f} s)")
    rows, measures_md = centre_table(by_centre, rng)
    confident, confident_md = confident_table(by_centre)
    misses, misses_md = misses_table(by_centre, np.random.default_rng(1))  # its own: the others' CIs stay
    flags, flags_md = flag_table(by_centre)
    sizes, sizes_md = size_table(by_centre, rng)
    sizes_md = "Ensemble size (the fused graph runs every member, so cost grows with their number):\n\n" + sizes_md
    header = (
        f"model {ensemble.version}, {args.slides} evaluation slides per centre of {args.size}² px at 0.5 µm/px, "
        f"tiles of {TILE} µm at {MPP} µm/px, {PIXELS_PER_SLIDE} pixels per slide, {BOOTSTRAP} bootstrap resamples"
    )
    parts = [header, measures_md, confident_md, misses_md, flags_md, sizes_md, f"wall time {time.time() - t0:.0f} s"]
    text = "\n\n".join(parts)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "uncertainty-gate.md").write_text(text + "\n")
    (args.out / "uncertainty-gate.json").write_text(
        json.dumps(
            {
                "model": ensemble.version,
                "measures": rows,
                "confident": confident,
                "misses": misses,
                "flags": flags,
                "sizes": sizes,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
