"""The paper's experiment (Khalili et al. 2024) with our code and data: does uncertainty-guided
annotation beat random patch selection when the baseline meets out-of-domain slides?

    python bench/experiment.py [--quick] [--out bench/results/experiment] [--seeds 3]

Protocol (see bench/README.md): the shipped baseline (source centre only) segments the pool slides
of several out-of-domain centres; each strategy picks ``budget`` non-overlapping 256 µm patches from
the union of all pool slides (one pooled ranking, like the service's pooled queue); the ground truth
of those patches stands in for the clinician's correction; every member is fine-tuned ONCE with the
production recipe (``FinetuneBudget`` defaults, as ``service/loop/candidate.py`` uses it); the fine-tuned
ensemble segments every centre's held-out evaluation slides (never selected from) and we report
per-slide tumour Dice, per centre and mean. Plus uncertainty quality (per-pixel AUROC for the
baseline's errors, ECE) and the ensemble-size trade-off (first 1, 3, 5 members).

Writes ``results.json``, ``results.md``, ``dice_vs_budget.png`` and ``dice_per_centre.png`` to
``--out``; progress on stderr, the Markdown tables on stdout.
"""

from __future__ import annotations

import os

# Under CPU contention (a shared 2-core machine) OpenMP threads that spin while they wait make torch
# 3-5x slower; passive waiting keeps the production recipe at its nominal speed. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from models.bank import load_bank  # noqa: E402
from models.data.slidegen import CENTRES, build_slide, slide_seed  # noqa: E402
from models.data.sources import cache_dir, ensure_sources  # noqa: E402
from models.export import export_ensemble  # noqa: E402
from models.finetune import FinetuneBudget, finetune_members  # noqa: E402
from models.fit import load_members  # noqa: E402
from service.inference.analysis import QUEUE_CELL, analyse  # noqa: E402
from service.inference.engine import segment  # noqa: E402
from service.inference.ensemble import (  # noqa: E402
    Ensemble,  # noqa: E402
    load_ensemble,
    read_card,
)
from service.inference.evaluation import (  # noqa: E402
    auroc,
    expected_calibration_error,
    overlap_with_truth,
    read_truth,
)
from service.inference.queue import Candidate, CellStats, cell_sums, score_candidates, select_non_overlapping  # noqa: E402
from service.inference.selection import random_scores  # noqa: E402
from service.inference.uncertainty import from_uint8  # noqa: E402
from service.options import SegmentationOptions  # noqa: E402
from service.vocabulary import MEASURES  # noqa: E402
from service.wsi.slide import RegionReader, open_slide  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "models" / "baseline-composite"  # the stress test's model (models.train --recipe composite)
MPP = 1.0  # analysis µm/px (the baseline's input resolution)
SLIDE_MPP = 0.5  # level-0 µm/px of the built slides
THRESHOLD = 0.5
STRATEGIES = ("uga", "entropy", "mutual_information", "random", "oracle")
ORACLE_NOTE = "patches with the highest share of baseline errors (prediction != truth) on tissue: an upper bound"
DICE_DEFINITION = (
    "per slide, tumour class, prediction = mean probability >= 0.5 at 1 µm/px vs the exact ground-truth mask "
    "resampled to 1 µm/px, Dice = 2TP/(2TP+FP+FN) over the whole slide; a slide with no tumour in truth and "
    "prediction counts 1.0, no tumour in truth but some predicted counts 0.0 (evaluation.Overlap.dice); "
    "averaged over the evaluation slides (per centre: over its slides; mean: over all slides, equal count per centre)"
)
PAPER = {"budgets": [0, 5, 10], "uga_dice": [0.66, 0.76, 0.84], "source": "Khalili et al. 2024, out-of-domain slides"}
SEP = "\u00b1"


@dataclass
class Config:
    centres: list[str] = field(default_factory=lambda: ["stain", "blur", "morph", "mixed"])
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    budgets: list[int] = field(default_factory=lambda: [0, 5, 10, 20])
    seeds: int = 3
    pool_per_centre: int = 2
    pool_size: int = 4096  # level-0 px at 0.5 µm/px -> 2048² at 1 µm/px
    eval_per_centre: int = 2
    eval_size: int = 1920  # level-0 px -> 960² at 1 µm/px = 2x2 tiles of 512 (overlap 32)
    patch_px: int = 256  # at 1 µm/px = 256 µm
    min_tissue: float = 0.5
    steps: int | None = None  # None: FinetuneBudget default (the production recipe)
    threads: int = 2
    auroc_pixels: int = 200_000
    ensemble_sizes: list[int] = field(default_factory=lambda: [1, 3, 5])
    slide_seed: int = 20240501
    eval_slide_seed: int = 20240777
    quick: bool = False
    selection: str = "pooled"  # pooled: one ranking over all centres; per-centre: round-robin quotas
    real: str | None = None  # a folder of real slides with masks (discover_slides) instead of built ones

    @classmethod
    def quick_config(cls) -> Config:
        return cls(
            centres=["stain", "blur"],
            strategies=["uga", "random"],
            budgets=[0, 5],
            seeds=1,
            pool_per_centre=1,
            pool_size=2048,
            eval_per_centre=1,
            eval_size=1920,
            steps=2,
            auroc_pixels=20_000,
            quick=True,
        )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- pure helpers


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


@dataclass(frozen=True)
class Patch:
    slide: str  # pool slide key
    centre: str
    row: int  # queue cells (QUEUE_CELL analysis px)
    col: int
    score: float

    @property
    def yx(self) -> tuple[int, int]:
        return self.row * QUEUE_CELL, self.col * QUEUE_CELL


def pooled_select(cands: dict[str, list[Candidate]], centres: dict[str, str], k: int, top: int) -> list[Patch]:
    """Best ``top`` patches over all slides: per-slide greedy non-overlap, then one ranking by score.

    Patches of different slides never overlap, so this equals a greedy pass over the union.
    """
    pooled: list[Patch] = []
    for slide in sorted(cands):
        for c in select_non_overlapping(cands[slide], k, top):
            pooled.append(Patch(slide, centres[slide], c.row, c.col, c.score))
    pooled.sort(key=lambda p: (-p.score, p.slide, p.row, p.col))
    return pooled[:top]


def per_centre_select(cands: dict[str, list[Candidate]], centres: dict[str, str], k: int, top: int) -> list[Patch]:
    """Round-robin over centres (each centre's patches ranked by score): every hospital corrects its own slides."""
    by_centre: dict[str, list[Patch]] = {}
    for centre in sorted(set(centres.values())):
        mine = {s: c for s, c in cands.items() if centres[s] == centre}
        by_centre[centre] = pooled_select(mine, centres, k, top)
    order = sorted(by_centre, key=lambda c: -(by_centre[c][0].score if by_centre[c] else -np.inf))
    picked: list[Patch] = []
    for rank in range(top):
        for centre in order:
            if len(picked) < top and rank < len(by_centre[centre]):
                picked.append(by_centre[centre][rank])
    return picked


# ----------------------------------------------------------------------------- slides


@dataclass
class SlideRef:
    key: str
    centre: str
    role: str  # pool | eval
    path: Path
    mask: Path
    meta: dict


def discover_slides(root: Path) -> list[SlideRef]:
    """Real slides with masks: ``root/<centre>/<pool|eval>/<name>.<ext>`` beside ``<name>.mask.tif``
    (a 0/255 mask with the slide's size and µm/px). Pool slides are selected from; eval slides never."""
    refs = []
    for centre_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for role in ("pool", "eval"):
            for path in sorted((centre_dir / role).glob("*")):
                if path.name.endswith(".mask.tif") or not path.is_file() or path.suffix == ".json":
                    continue
                mask = path.with_name(path.name[: -len(path.suffix)] + ".mask.tif")
                if not mask.exists():
                    raise SystemExit(f"experiment: {path} has no mask {mask.name} beside it")
                with open_slide(path) as slide:
                    meta = {"size": list(slide.dimensions), "mpp": slide.mpp, "seed": None}
                refs.append(SlideRef(f"{centre_dir.name}-{role}-{path.stem}", centre_dir.name, role, path, mask, meta))
    for role in ("pool", "eval"):
        if not any(r.role == role for r in refs):
            raise SystemExit(f"experiment: no {role} slides under {root}/<centre>/{role}/")
    return refs


def ensure_slides(cfg: Config, root: Path) -> list[SlideRef]:
    """Build (once, cached) pool and evaluation slides for every centre; distinct seeds per role.
    With ``cfg.real``, the real slides found there instead."""
    if cfg.real:
        return discover_slides(Path(cfg.real))
    sources = None
    refs = []
    plan = [("pool", cfg.pool_per_centre, cfg.pool_size, cfg.slide_seed)]
    plan.append(("eval", cfg.eval_per_centre, cfg.eval_size, cfg.eval_slide_seed))
    for centre in cfg.centres:
        for role, count, size, base_seed in plan:
            for i in range(count):
                seed = slide_seed(base_seed, centre, i)
                key = f"{centre}-{role}{i}"
                path = root / f"{centre}-{role}{i}-{size}-s{seed}.tif"
                meta_path = path.with_suffix(".json")
                if not meta_path.exists():
                    sources = sources or ensure_sources()
                    t0 = time.time()
                    build_slide(path, size=(size, size), centre=centre, seed=seed, sources=sources, mpp=SLIDE_MPP)
                    log(f"built {path.name} ({time.time() - t0:.1f}s)")
                meta = json.loads(meta_path.read_text())
                refs.append(SlideRef(key, centre, role, path, path.with_name(meta["mask"]), meta))
    return refs


# ----------------------------------------------------------------------------- inference + evaluation


@dataclass
class SlideEval:
    dice: float
    seconds: float
    tissue_mp: float
    pixels: dict | None = None  # subsampled per-pixel arrays for uncertainty quality


def evaluate_slide(ens: Ensemble, ref: SlideRef, work: Path, *, keep_pixels: int = 0, seed: int = 0) -> SlideEval:
    """Segment with the production engine, Dice against the truth; optionally keep a pixel sample."""
    slide = open_slide(ref.path)
    wd = Path(tempfile.mkdtemp(prefix="eval-", dir=work))
    try:
        res = segment(slide, ens, wd, SegmentationOptions(mpp=MPP, threshold=THRESHOLD))
        ov = overlap_with_truth(res.maps["probability"], ref.mask, MPP, THRESHOLD)
        h, w = res.grid.height, res.grid.width
        tissue = res.tissue.crop(0, 0, h, w, MPP)
        out = SlideEval(ov.dice, res.timings["total_s"], float(tissue.sum()) / 1e6)
        if keep_pixels:
            truth = read_truth(ref.mask, MPP, 0, 0, h, w)
            idx = np.flatnonzero(tissue.ravel())
            rng = np.random.default_rng([seed, int(hashlib.sha1(ref.key.encode()).hexdigest()[:8], 16)])
            idx = rng.choice(idx, size=min(keep_pixels, idx.size), replace=False)
            maps = {n: from_uint8(res.maps[n].read_rows(0, h).ravel()[idx], n) for n in ("probability", *MEASURES)}
            maps["truth"] = truth.ravel()[idx]
            out.pixels = maps
        res.close()
        return out
    finally:
        slide.close()
        shutil.rmtree(wd, ignore_errors=True)


def evaluate(ens: Ensemble, refs: list[SlideRef], work: Path, **kw) -> tuple[dict, list[SlideEval]]:
    per_slide, evals = {}, []
    for ref in refs:
        ev = evaluate_slide(ens, ref, work, **kw)
        per_slide[ref.key] = ev.dice
        evals.append(ev)
    per_centre: dict[str, list[float]] = {}
    for ref in refs:
        per_centre.setdefault(ref.centre, []).append(per_slide[ref.key])
    return {
        "mean": float(np.mean(list(per_slide.values()))),
        "per_centre": {c: float(np.mean(v)) for c, v in per_centre.items()},
        "per_slide": per_slide,
    }, evals


def uncertainty_quality(evals: list[SlideEval], refs: list[SlideRef], n_pixels: int, seed: int) -> dict:
    """AUROC of each measure for the model's errors and ECE, on a tissue-pixel sample of the eval slides."""
    keys = ("probability", "truth", *MEASURES)
    pix = {k: np.concatenate([e.pixels[k] for e in evals]) for k in keys}
    centre = np.concatenate([np.full(e.pixels["truth"].size, r.centre) for e, r in zip(evals, refs, strict=True)])
    if pix["truth"].size > n_pixels:
        keep = np.random.default_rng(seed).choice(pix["truth"].size, n_pixels, replace=False)
        pix = {k: v[keep] for k, v in pix.items()}
        centre = centre[keep]
    pred = pix["probability"] >= THRESHOLD
    err = pred != pix["truth"]
    out = {
        "pixels": int(err.size),
        "error_rate": float(err.mean()),
        "auroc": {m: auroc(pix[m], err) for m in MEASURES},
        "ece": expected_calibration_error(pix["probability"], pix["truth"]),
        "per_centre": {},
    }
    for c in dict.fromkeys(centre.tolist()):
        s = centre == c
        out["per_centre"][c] = {
            "pixels": int(s.sum()),
            "error_rate": float(err[s].mean()),
            "auroc": {m: auroc(pix[m][s], err[s]) for m in MEASURES},
            "ece": expected_calibration_error(pix["probability"][s], pix["truth"][s]),
        }
    return out


# ----------------------------------------------------------------------------- selection


@dataclass
class PoolSlide:
    ref: SlideRef
    stats: dict[str, CellStats]  # per measure and "oracle" (sum of baseline errors on tissue)
    error_rate: float  # baseline error share over the slide's tissue


def analyse_pool(ens: Ensemble, refs: list[SlideRef], work: Path) -> list[PoolSlide]:
    out = []
    for ref in refs:
        t0 = time.time()
        slide = open_slide(ref.path)
        wd = Path(tempfile.mkdtemp(prefix="pool-", dir=work))
        try:
            res = segment(slide, ens, wd, SegmentationOptions(mpp=MPP, threshold=THRESHOLD))
            stats = {m: analyse(res, wd, measure=m, threshold=THRESHOLD).cells for m in MEASURES}
            h, w = res.grid.height, res.grid.width
            tissue = res.tissue.crop(0, 0, h, w, MPP)
            pred = res.maps["probability"].read_rows(0, h) >= int(np.ceil(THRESHOLD * 255 - 1e-9))
            err = (pred != read_truth(ref.mask, MPP, 0, 0, h, w)) & tissue
            base = stats[MEASURES[0]]
            stats["oracle"] = CellStats(
                QUEUE_CELL, base.tissue, cell_sums(err.astype(np.float32), QUEUE_CELL), base.probability, base.above
            )
            rate = float(err.sum() / max(1, tissue.sum()))
            out.append(PoolSlide(ref, stats, rate))
            res.close()
        finally:
            slide.close()
            shutil.rmtree(wd, ignore_errors=True)
        log(f"pool {ref.key}: baseline error {rate:.3f} of tissue ({time.time() - t0:.1f}s)")
    return out


def select(
    pool: list[PoolSlide], strategy: str, top: int, k: int, min_tissue: float, seed: int, selection: str = "pooled"
) -> list[Patch]:
    """Ranked, non-overlapping, pooled across slides; random uses uniform scores (nested across budgets)."""
    centres = {p.ref.key: p.ref.centre for p in pool}
    cands = {}
    for i, p in enumerate(pool):
        measure = "uga" if strategy == "random" else strategy
        c = score_candidates(p.stats[measure], k, scoring="mean", min_tissue=min_tissue)
        if strategy == "random":  # the service's random strategy's draws, pooled across slides here
            c = random_scores(c, np.random.default_rng([seed, 7919, i]))
        cands[p.ref.key] = c
    if selection == "per-centre":
        return per_centre_select(cands, centres, k, top)
    return pooled_select(cands, centres, k, top)


def read_corrections(patches: list[Patch], refs: dict[str, SlideRef], size: int) -> tuple[list, list]:
    """The 'clinician's correction' of each patch: image crop at 1 µm/px and its ground-truth mask."""
    images, masks = [], []
    for p in patches:
        ref = refs[p.slide]
        y, x = p.yx
        with open_slide(ref.path) as slide:
            images.append(RegionReader(slide, MPP).read(y, x, size, size))
        masks.append(read_truth(ref.mask, MPP, y, x, size, size).astype(np.uint8))
    return images, masks


# ----------------------------------------------------------------------------- the experiment


def export_members(members, path: Path, version: str, threads: int) -> Ensemble:
    export_ensemble(members, path)
    return Ensemble(path, version, threads=threads)


def run(cfg: Config, out: Path, slide_root: Path) -> dict:
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="uga-experiment-"))
    try:
        return _run(cfg, out, slide_root, work, t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(cfg: Config, out: Path, slide_root: Path, work: Path, t_start: float) -> dict:
    card = read_card(BASELINE)
    refs = ensure_slides(cfg, slide_root)
    by_key = {r.key: r for r in refs}
    pool_refs = [r for r in refs if r.role == "pool"]
    eval_refs = [r for r in refs if r.role == "eval"]
    t_slides = time.time() - t_start
    log(f"{len(pool_refs)} pool + {len(eval_refs)} eval slides ready ({t_slides:.0f}s); centres {cfg.centres}")

    baseline = load_ensemble(BASELINE, threads=cfg.threads)
    pool = analyse_pool(baseline, pool_refs, work)
    t0 = time.time()
    base_dice, base_evals = evaluate(baseline, eval_refs, work, keep_pixels=cfg.auroc_pixels, seed=0)
    log(f"baseline eval Dice {base_dice['mean']:.3f} {base_dice['per_centre']} ({time.time() - t0:.1f}s)")
    uq = uncertainty_quality(base_evals, eval_refs, cfg.auroc_pixels, seed=0)
    log(f"uncertainty quality: AUROC {uq['auroc']}, ECE {uq['ece']:.3f}")

    recipe = FinetuneBudget(threads=cfg.threads)
    if cfg.steps is not None:
        recipe.steps = cfg.steps
    k = max(1, round(cfg.patch_px / QUEUE_CELL))
    replay = load_bank(BASELINE / "replay.npz")
    members_pt = BASELINE / "members.pt"
    top = max(cfg.budgets)

    selections: dict[str, dict[int, list[Patch]]] = {}
    for s in cfg.strategies:
        for seed in range(cfg.seeds) if s == "random" else [None]:
            ranked = select(pool, s, top, k, cfg.min_tissue, seed or 0, cfg.selection)
            for b in cfg.budgets:
                selections.setdefault(f"{s}/{seed}" if seed is not None else s, {})[b] = ranked[:b]
    pool_err = {p.ref.key: p.stats["oracle"] for p in pool}

    def patch_error(p: Patch) -> float:
        st = pool_err[p.slide]
        return float(
            st.uncertainty[p.row : p.row + k, p.col : p.col + k].sum()
            / max(1, st.tissue[p.row : p.row + k, p.col : p.col + k].sum())
        )

    runs, cache = [], {}
    n_ft = sum(1 for b in cfg.budgets if b > 0) * len(cfg.strategies) * cfg.seeds
    done = 0
    for seed in range(cfg.seeds):
        for s in cfg.strategies:
            sel_key = f"{s}/{seed}" if s == "random" else s
            for b in cfg.budgets:
                patches = selections[sel_key][b]
                entry = {
                    "strategy": s,
                    "budget": b,
                    "seed": seed,
                    "patches": [
                        {
                            "slide": p.slide,
                            "centre": p.centre,
                            "y": p.yx[0],
                            "x": p.yx[1],
                            "score": round(p.score, 6),
                            "baseline_error": round(patch_error(p), 4),
                        }
                        for p in patches
                    ],
                }
                if b == 0:
                    runs.append(
                        {**entry, "dice": base_dice, "finetune_s": 0.0, "eval_s": 0.0, "shared_with": "baseline"}
                    )
                    continue
                # identical corrections + seed -> identical fine-tune: compute once (order-free key)
                ident = (seed, tuple(sorted((p.slide, p.row, p.col) for p in patches)))
                done += 1
                if ident in cache:
                    prev = cache[ident]
                    runs.append(
                        {
                            **entry,
                            "dice": prev["dice"],
                            "finetune_s": 0.0,
                            "eval_s": 0.0,
                            "shared_with": f"{prev['strategy']}/{prev['budget']}/{prev['seed']}",
                        }
                    )
                    log(f"[{done}/{n_ft}] {s} b={b} seed={seed}: same patches as {runs[-1]['shared_with']}, reused")
                    continue
                ordered = sorted(patches, key=lambda p: (p.slide, p.row, p.col))
                pairs = read_corrections(ordered, by_key, cfg.patch_px)
                budget = FinetuneBudget(**{**asdict(recipe), "seed": seed})
                t0 = time.time()
                members, _ = finetune_members(members_pt, pairs, replay, budget)
                t_ft = time.time() - t0
                mdir = work / f"ft-{s}-{b}-{seed}"
                mdir.mkdir()
                ens = export_members(members, mdir / "ensemble.onnx", f"ft-{s}-{b}-{seed}", cfg.threads)
                t0 = time.time()
                dice, _ = evaluate(ens, eval_refs, work)
                t_ev = time.time() - t0
                del ens
                shutil.rmtree(mdir, ignore_errors=True)
                rec = {**entry, "dice": dice, "finetune_s": round(t_ft, 1), "eval_s": round(t_ev, 1)}
                runs.append(rec)
                cache[ident] = rec
                centres = " ".join(f"{c}={v:.3f}" for c, v in dice["per_centre"].items())
                log(
                    f"[{done}/{n_ft}] {s} b={b} seed={seed}: Dice {dice['mean']:.3f} ({centres}); "
                    f"fine-tune {t_ft:.0f}s, eval {t_ev:.0f}s, elapsed {(time.time() - t_start) / 60:.1f} min"
                )

    # ensemble size: first k members of the baseline
    t0 = time.time()
    members, _ = load_members(members_pt)
    sizes = []
    for m in cfg.ensemble_sizes:
        mdir = work / f"members-{m}"
        mdir.mkdir()
        ens = export_members(members[:m], mdir / "ensemble.onnx", f"baseline-first{m}", cfg.threads)
        ens.warm_up()
        dice, evals = evaluate(ens, eval_refs, work, keep_pixels=cfg.auroc_pixels, seed=0)
        q = uncertainty_quality(evals, eval_refs, cfg.auroc_pixels, seed=0)
        if m == 1:
            q["auroc"]["mutual_information"] = None  # one member has no disagreement
        secs = sum(e.seconds for e in evals)
        tissue_mp = sum(e.tissue_mp for e in evals)
        sizes.append(
            {
                "members": m,
                "dice": dice,
                "auroc": q["auroc"],
                "auroc_ranking_measure": q["auroc"]["entropy" if m == 1 else "uga"],
                "ece": q["ece"],
                "error_rate": q["error_rate"],
                "segment_s": round(secs, 2),
                "tissue_mp": round(tissue_mp, 3),
                "s_per_tissue_mp": round(secs / max(tissue_mp, 1e-9), 3),
            }
        )
        log(f"ensemble of {m}: Dice {dice['mean']:.3f}, AUROC {q['auroc']}, {secs / tissue_mp:.2f} s/tissue MP")
        del ens
    log(f"ensemble sizes done ({time.time() - t0:.0f}s)")

    summary = summarise(runs, cfg)
    results = {
        "experiment": "uncertainty-guided annotation vs random selection on out-of-domain centres",
        "paper": PAPER,
        "config": asdict(cfg),
        "protocol": {
            "model": {
                "dir": "models/baseline-composite",
                "version": card["version"],
                "members": card["recipe"]["members"],
                "trained_on": card["training_data"]["centre"],
            },
            "patch": {
                "px": cfg.patch_px,
                "mpp": MPP,
                "um": cfg.patch_px * MPP,
                "min_tissue": cfg.min_tissue,
                "non_overlapping": True,
                "pooled": "one ranking over the union of all centres' pool slides",
            },
            "scoring": "mean of the measure over tissue pixels (service default 'mean'), queue cells of "
            f"{QUEUE_CELL} px; random: uniform scores over patches with >= {cfg.min_tissue:.0%} tissue; "
            f"oracle: {ORACLE_NOTE}",
            "correction": "the ground-truth mask of the patch (simulated clinician), image read at 1 µm/px",
            "finetune": {
                **asdict(recipe),
                "seed": "= experiment seed",
                "replay": "models/baseline-composite/replay.npz",
                "note": "finetune_members(), the recipe service/loop/candidate.py runs (FinetuneBudget defaults)"
                + ("" if cfg.steps is None else f"; steps overridden to {cfg.steps}"),
            },
            "dice": DICE_DEFINITION,
            "seeds": "seed changes the random selection and the fine-tune seed; uncertainty and oracle "
            "selections are deterministic",
            "auroc": f"rank-based, errors = (p >= {THRESHOLD}) != truth, on a random sample of "
            f"{cfg.auroc_pixels} tissue pixels of the eval slides (baseline predictions)",
            "ece": "15 equal-width bins of the mean tumour probability, tissue pixels, label = truth tumour",
        },
        "slides": [
            {
                "key": r.key,
                "centre": r.centre,
                "role": r.role,
                "file": r.path.name,
                "size_level0": r.meta["size"],
                "mpp": r.meta["mpp"],
                "seed": r.meta["seed"],
                "tissue_fraction": _round(r.meta.get("tissue_fraction")),
                "tumour_fraction": _round(r.meta.get("tumour_fraction")),
            }
            for r in refs
        ],
        "pool_baseline_error": {p.ref.key: round(p.error_rate, 4) for p in pool},
        "baseline": base_dice,
        "runs": runs,
        "summary": summary,
        "uncertainty_quality": uq,
        "ensemble_size": sizes,
        "timing": {
            "total_s": round(time.time() - t_start, 1),
            "slides_s": round(t_slides, 1),
            "finetunes": sum(1 for r in runs if r["finetune_s"] > 0),
            "finetune_s_mean": round(
                float(np.mean([r["finetune_s"] for r in runs if r["finetune_s"] > 0] or [0.0])), 1
            ),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, threads={cfg.threads}",
        },
    }
    write_outputs(results, out)
    return results


def summarise(runs: list[dict], cfg: Config) -> dict:
    summary: dict = {}
    for s in cfg.strategies:
        for b in cfg.budgets:
            rs = [r for r in runs if r["strategy"] == s and r["budget"] == b]
            m, sd = mean_std([r["dice"]["mean"] for r in rs])
            per_c = {}
            for c in cfg.centres:
                cm, csd = mean_std([r["dice"]["per_centre"][c] for r in rs])
                per_c[c] = {"mean": cm, "std": csd}
            picked: dict[str, float] = {}
            for r in rs:
                for p in r["patches"]:
                    picked[p["centre"]] = picked.get(p["centre"], 0) + 1 / len(rs)
            err = [p["baseline_error"] for r in rs for p in r["patches"]]
            summary.setdefault(s, {})[str(b)] = {
                "mean": m,
                "std": sd,
                "seeds": [r["dice"]["mean"] for r in rs],
                "per_centre": per_c,
                "patches_per_centre": {c: round(picked.get(c, 0.0), 2) for c in cfg.centres},
                "patch_baseline_error": float(np.mean(err)) if err else None,
            }
    return summary


# ----------------------------------------------------------------------------- outputs


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def markdown(res: dict) -> str:
    cfg, summ = res["config"], res["summary"]
    budgets, centres = cfg["budgets"], cfg["centres"]
    lines = [f"# UGA experiment{' (quick)' if cfg['quick'] else ''}", ""]
    lines += [
        f"Baseline `{res['protocol']['model']['version']}` (trained on source only); out-of-domain centres: "
        f"{', '.join(centres)}; {cfg['seeds']} seed(s); patch {cfg['patch_px']} µm at 1 µm/px; "
        f"selection {cfg.get('selection', 'pooled')}; "
        f"wall time {res['timing']['total_s'] / 60:.1f} min.",
        "",
    ]
    lines += ["## Mean Dice over all evaluation slides (mean ± std over seeds)", ""]
    lines += ["| strategy | " + " | ".join(f"{b} patches" for b in budgets) + " |"]
    lines += ["|---|" + "---|" * len(budgets)]
    for s, by_b in summ.items():
        lines.append(
            f"| {s} | "
            + " | ".join(f"{by_b[str(b)]['mean']:.3f} {SEP} {by_b[str(b)]['std']:.3f}" for b in budgets)
            + " |"
        )
    lines += ["", "## Dice per centre (mean ± std over seeds)", ""]
    lines += ["| strategy | budget | " + " | ".join(centres) + " |", "|---|---|" + "---|" * len(centres)]
    for s, by_b in summ.items():
        for b in budgets:
            pc = by_b[str(b)]["per_centre"]
            lines.append(
                f"| {s} | {b} | " + " | ".join(f"{pc[c]['mean']:.3f} {SEP} {pc[c]['std']:.3f}" for c in centres) + " |"
            )
    lines += [
        "",
        "## Where the patches came from (patches per centre, mean over seeds; baseline error share "
        "inside the chosen patches)",
        "",
    ]
    lines += [
        "| strategy | budget | " + " | ".join(centres) + " | error in patches |",
        "|---|---|" + "---|" * (len(centres) + 1),
    ]
    for s, by_b in summ.items():
        for b in budgets:
            if b == 0:
                continue
            e = by_b[str(b)]
            lines.append(
                f"| {s} | {b} | "
                + " | ".join(f"{e['patches_per_centre'][c]:g}" for c in centres)
                + f" | {e['patch_baseline_error']:.3f} |"
            )
    uq = res["uncertainty_quality"]
    lines += ["", "## Uncertainty quality (baseline, eval slides, tissue pixels)", ""]
    lines += ["| centre | error rate | AUROC uga | AUROC entropy | AUROC MI | ECE |", "|---|---|---|---|---|---|"]
    rows = [("all", uq)] + list(uq["per_centre"].items())
    for name, q in rows:
        a = q["auroc"]
        lines.append(
            f"| {name} | {q['error_rate']:.3f} | " + " | ".join(_fmt(a[m]) for m in MEASURES) + f" | {q['ece']:.3f} |"
        )
    lines += ["", "## Ensemble size (first k baseline members, eval slides)", ""]
    lines += [
        "| members | Dice | AUROC uga | AUROC entropy | AUROC MI | ECE | s per tissue MP |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in res["ensemble_size"]:
        a = e["auroc"]
        lines.append(
            f"| {e['members']} | {e['dice']['mean']:.3f} | "
            + " | ".join(_fmt(a[m]) for m in MEASURES)
            + f" | {e['ece']:.3f} | {e['s_per_tissue_mp']:.2f} |"
        )
    p = res["paper"]
    lines += [
        "",
        f"Paper ({p['source']}): UGA Dice "
        + " → ".join(f"{d:.2f} ({b})" for b, d in zip(p["budgets"], p["uga_dice"], strict=True)),
        "",
    ]
    lines += [f"Dice: {res['protocol']['dice']}.", ""]
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, summ = res["config"], res["summary"]
    budgets = cfg["budgets"]
    colours = {
        "uga": "tab:red",
        "entropy": "tab:orange",
        "mutual_information": "tab:purple",
        "random": "tab:gray",
        "oracle": "tab:green",
    }

    def lines(ax, get):
        for s, by_b in summ.items():
            m = np.array([get(by_b[str(b)])[0] for b in budgets])
            sd = np.array([get(by_b[str(b)])[1] for b in budgets])
            ax.plot(budgets, m, "o-", color=colours.get(s), label=s, lw=1.6, ms=4)
            ax.fill_between(budgets, m - sd, m + sd, color=colours.get(s), alpha=0.15, lw=0)
        ax.set_xticks(budgets)
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    lines(ax, lambda e: (e["mean"], e["std"]))
    if not cfg["quick"]:
        p = res["paper"]
        ax.plot(p["budgets"], p["uga_dice"], "k--", lw=1, alpha=0.6, label="paper UGA (other data)")
    how = "per-centre quotas" if cfg.get("selection") == "per-centre" else "pooled over centres"
    ax.set_xlabel(f"corrected patches ({cfg['patch_px']} µm, {how})")
    ax.set_ylabel("mean Dice, held-out OOD slides")
    ax.set_title(f"Dice vs corrected patches ({cfg['seeds']} seeds, mean ± std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "dice_vs_budget.png", dpi=90)
    plt.close(fig)

    n = len(cfg["centres"])
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], cfg["centres"], strict=True):
        lines(ax, lambda e, c=c: (e["per_centre"][c]["mean"], e["per_centre"][c]["std"]))
        ax.set_title(c)
        ax.set_xlabel("patches")
    axes[0][0].set_ylabel("Dice")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "dice_per_centre.png", dpi=80)
    plt.close(fig)


def write_outputs(res: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(markdown(res))
    plot(res, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny pipeline check (2 centres, budgets 0/5, 1 seed)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "experiment")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 3; 1 with --quick)")
    ap.add_argument("--centres", nargs="+", choices=[c for c in CENTRES if c != "source"], default=None)
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    ap.add_argument(
        "--slides",
        type=Path,
        default=None,
        help="slide cache (default $UGA_CACHE_DIR/experiment-slides or ~/.cache/uga-serve/...)",
    )
    ap.add_argument(
        "--real",
        type=Path,
        default=None,
        help="a folder of real slides with masks, DIR/<centre>/<pool|eval>/<name>.<ext> + <name>.mask.tif",
    )
    ap.add_argument(
        "--selection",
        choices=["pooled", "per-centre"],
        default="pooled",
        help="pooled: one ranking across all centres; per-centre: round-robin quotas (each centre its own top patches)",
    )
    args = ap.parse_args(argv)
    cfg = Config.quick_config() if args.quick else Config()
    cfg.selection = args.selection
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.centres:
        cfg.centres = args.centres
    if args.real:
        cfg.real = str(args.real)
        cfg.centres = sorted(p.name for p in args.real.iterdir() if p.is_dir())
    cfg.threads = args.threads
    slide_root = args.slides or cache_dir() / "experiment-slides"
    res = run(cfg, args.out, slide_root)
    log(f"done in {res['timing']['total_s'] / 60:.1f} min -> {args.out}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
