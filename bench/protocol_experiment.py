"""The pre-registered experiment (bench/PROTOCOL.md): does a selection strategy beat random selection
on slides whose errors are local, for the same annotated area?

    python bench/protocol_experiment.py --stage sanity     # the sanity gate: random and oracle, budget 10
    python bench/protocol_experiment.py --stage compare    # every strategy at budgets 5, 10, 20 (256 µm)
    python bench/protocol_experiment.py --real DIR         # the same on real slides with masks

Every fine-tune is one line of ``runs.jsonl`` in ``--out``; a stopped run resumes where it stopped,
and a run whose seed and chosen patches equal an earlier one's reuses it. ``results.md`` (the
protocol's tables: paired Δ against random with two-level bootstrap CIs and the verdict, the sanity
gate, negative transfer, the selection audit) and ``delta.png`` are rewritten after every run.
Selection is the service's registry (service/inference/selection.py); fine-tuning is
models/finetune.py with the protocol's recipe; Dice is the production engine's on whole slides.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/experiment.py: must precede torch

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.experiment import MPP, THRESHOLD, Patch, SlideRef, discover_slides, evaluate_slide, read_corrections  # noqa: E402
from bench.uncertainty_gate import eval_slides  # noqa: E402
from models.bank import load_bank, load_bank_slides  # noqa: E402
from models.data.localshift import LOCAL_CENTRES, build_local_slide  # noqa: E402
from models.data.slidegen import companion_paths, slide_seed  # noqa: E402
from models.data.sources import cache_dir  # noqa: E402
from models.data.textures import texture_bank  # noqa: E402
from models.export import export_ensemble  # noqa: E402
from models.finetune import FinetuneBudget, finetune_members, planned_steps  # noqa: E402
from service.fsutil import sha256_file  # noqa: E402
from service.inference.analysis import QUEUE_CELL, analyse  # noqa: E402
from service.inference.engine import segment  # noqa: E402
from service.inference.ensemble import Ensemble, load_ensemble  # noqa: E402
from service.inference.evaluation import read_truth  # noqa: E402
from service.inference.queue import CellStats, cell_sums, score_candidates  # noqa: E402
from service.inference.selection import Candidate, select  # noqa: E402
from service.options import SegmentationOptions  # noqa: E402
from service.wsi.slide import open_slide  # noqa: E402

MODEL = REPO / "models" / "baseline"
POOL_SEED = 78_000  # pool slides; evaluation slides are bench/uncertainty_gate.py's (77 000)
SLIDE_SIDE = 6144  # evaluation slides, level-0 px at 0.5 µm/px (9.4 mm², about 5.7 mm² of tissue)
POOL_SIDE = 4096  # pool slides (4.2 mm², about 2.5 mm² of tissue; 4 per centre hold 150 patches of 256 µm)
MIN_TISSUE = 0.5
BOOTSTRAP = 10_000
# the protocol's names -> (registry strategy, ranking map)
STRATEGIES = {
    "uga_topk": ("uncertainty", "uga"),
    "class_balanced": ("class_balanced", "uga"),
    "uncertainty_diversity": ("uncertainty_diversity", "uga"),
    "representative": ("representative", "uga"),
    "random": ("random", "uga"),
    "oracle": ("uncertainty", "error"),
}
# the fine-tune recipe registered in PROTOCOL.md: symmetric augmentation, tumour-centred crops
# (always on), steps by corrected area, early stop on every 5th correction
# (the first registered recipe, lr 3e-4 and 60 steps per mm² up to 200, underfit: PROTOCOL.md's change log)
RECIPE = FinetuneBudget(
    steps=40, lr=1e-3, threads=2, steps_per_mm2=240.0, max_steps=800, holdout_every=5, symmetric=True
)


@dataclass
class Stage:
    strategies: list[str]
    budgets: list[int]  # patches per centre
    patch_um: int = 256
    seeds: int = 5
    holdout_every: int | None = None  # overrides the recipe's (the size stages: none, PROTOCOL.md)


# the paper's arm (PROTOCOL.md): each member goes on training on its own part of the source training
# set plus the corrections, every patch equally likely, under the same steps rule and early stop
ARMS = {"finetune": RECIPE, "retrain": replace(RECIPE, retrain=True)}
SOURCE_BANK = "training-slides-protocol/train-bank.npz"  # under the cache: models.train --recipe protocol's

SANITY_BUDGET = 10
# the control (PROTOCOL.md): no corrections, the same number of steps on the replay / source alone,
# so random − source_only is what the corrections add beyond more training
CONTROL = "source_only"
STAGES = {
    "sanity": Stage(["random", "oracle"], [SANITY_BUDGET]),
    "control": Stage([CONTROL, "random"], [SANITY_BUDGET]),
    "compare": Stage(["uga_topk", "class_balanced", "uncertainty_diversity", "representative", "random"], [5, 10, 20]),
    # patch size at equal annotated area (PROTOCOL.md): one 1024 µm patch is sixteen 256 µm ones
    # no held-out corrections in either size: a 1024 µm budget of 1 would lose a centre's only patch
    "size256": Stage(["uga_topk", "random"], [16, 32], patch_um=256, holdout_every=0),
    "size1024": Stage(["uga_topk", "random"], [1, 2], patch_um=1024, holdout_every=0),
}


@dataclass
class Config:
    pool_per_centre: int = 4
    eval_per_centre: int = 4
    side: int = SLIDE_SIDE
    pool_side: int = POOL_SIDE
    centres: list[str] = field(default_factory=lambda: list(LOCAL_CENTRES))
    quota_centres: list[str] = field(default_factory=lambda: [c for c in LOCAL_CENTRES if c != "source"])
    recipe: FinetuneBudget = field(default_factory=lambda: replace(RECIPE))
    bootstrap: int = BOOTSTRAP
    arm: str = "finetune"
    source_bank: Path | None = None  # the retrain arm's source training bank
    verdict_seeds: int = 5  # PROTOCOL.md: a comparison on fewer seeds gets no verdict (--seeds runs a part)


MIN_FREE_BYTES = 2 << 30  # a run's models and maps need far less; below this the disk is filling


def require_free_space(path: Path, min_bytes: int = MIN_FREE_BYTES) -> None:
    """Stop before a run, not in the middle of one, when the disk is filling (the runs so far are kept)."""
    free = shutil.disk_usage(path).free
    if free < min_bytes:
        raise SystemExit(
            f"protocol_experiment: only {free / 2**30:.1f} GiB free under {path} (needs {min_bytes / 2**30:.0f}); "
            "free some space and run the same command again: it resumes"
        )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- slides


def local_refs(cfg: Config) -> list[SlideRef]:
    """The protocol's built slides: pool slides of the quota centres, evaluation slides of every centre."""
    pool_dir, eval_dir = cache_dir() / "protocol-pool", cache_dir() / "protocol-eval"
    pool_dir.mkdir(parents=True, exist_ok=True)
    eval_dir.mkdir(parents=True, exist_ok=True)
    refs = []
    for centre in cfg.quota_centres:
        for i in range(cfg.pool_per_centre):
            path = pool_dir / f"{centre}-{cfg.pool_side}-{i}.tif"
            if not (path.exists() and companion_paths(path)[0].exists()):
                t0 = time.time()
                seed = slide_seed(POOL_SEED, centre, i)
                build_local_slide(
                    path, size=(cfg.pool_side, cfg.pool_side), centre=centre, seed=seed, bank=texture_bank()
                )
                log(f"built pool slide {path.name} ({time.time() - t0:.0f} s)")
            refs.append(SlideRef(f"{centre}-pool{i}", centre, "pool", path, companion_paths(path)[0], {}))
    for centre in cfg.centres:
        for i, path in enumerate(eval_slides(centre, cfg.eval_per_centre, cfg.side, eval_dir)):
            refs.append(SlideRef(f"{centre}-eval{i}", centre, "eval", path, companion_paths(path)[0], {}))
    return refs


# ----------------------------------------------------------------------------- pool and selection


@dataclass
class PoolSlide:
    ref: SlideRef
    stats: dict[str, CellStats]  # "uga" (with the embedding) and "error" (the baseline's errors)
    audit: dict[str, np.ndarray]  # per cell: tissue, tumour (truth), fp, fn pixel counts


def analyse_pool(ens: Ensemble, refs: list[SlideRef], work: Path) -> list[PoolSlide]:
    """Segment every pool slide with the baseline once: queue statistics, errors, audit counts."""
    out = []
    for ref in refs:
        t0 = time.time()
        wd = Path(tempfile.mkdtemp(prefix="pool-", dir=work))
        with open_slide(ref.path) as slide:
            res = segment(slide, ens, wd, SegmentationOptions(mpp=MPP, threshold=THRESHOLD))
            uga = analyse(res, wd, measure="uga", threshold=THRESHOLD).cells
            h, w = res.grid.height, res.grid.width
            tissue = res.tissue.crop(0, 0, h, w, MPP)
            pred = res.maps["probability"].read_rows(0, h) >= int(np.ceil(THRESHOLD * 255 - 1e-9))
            truth = read_truth(ref.mask, MPP, 0, 0, h, w)
            res.close()
        shutil.rmtree(wd, ignore_errors=True)
        audit = {
            "tissue": uga.tissue,
            "tumour": cell_sums((truth & tissue).astype(np.float32), QUEUE_CELL),
            "fp": cell_sums((pred & ~truth & tissue).astype(np.float32), QUEUE_CELL),
            "fn": cell_sums((~pred & truth & tissue).astype(np.float32), QUEUE_CELL),
        }
        error = CellStats(QUEUE_CELL, uga.tissue, audit["fp"] + audit["fn"], uga.probability, uga.above, uga.embedding)
        out.append(PoolSlide(ref, {"uga": uga, "error": error}, audit))
        rate = error.uncertainty.sum() / max(1, uga.tissue.sum())
        log(f"pool {ref.key}: baseline error {rate:.3f} ({time.time() - t0:.0f} s)")
    return out


def centre_candidates(slides: list[PoolSlide], ranking: str, k: int) -> list[tuple[Candidate, PoolSlide, int]]:
    """Candidates of a centre's pool slides on one plane: slide j's rows are offset so no patch of
    one slide can overlap one of another (the registry's strategies work on one grid)."""
    out, offset = [], 0
    for p in slides:
        for c in score_candidates(p.stats[ranking], k, scoring="mean", min_tissue=MIN_TISSUE):
            out.append((replace(c, row=c.row + offset), p, offset))
        offset += p.stats[ranking].tissue.shape[0] + k
    return out


def choose(pool: list[PoolSlide], strategy: str, budget: int, k: int, seed: int, centres: list[str]) -> list[Patch]:
    """``budget`` patches per quota centre by the registry's ``strategy`` (a fixed draw per seed and centre)."""
    name, ranking = STRATEGIES[strategy]
    picked = []
    for ci, centre in enumerate(centres):
        placed = centre_candidates([p for p in pool if p.ref.centre == centre], ranking, k)
        where = {(c.row, c.col): (p, off) for c, p, off in placed}
        rng = np.random.default_rng([seed, ci, 7919])
        for c in select(name, [c for c, _, _ in placed], k, budget, rng):
            p, off = where[(c.row, c.col)]
            picked.append(Patch(p.ref.key, centre, c.row - off, c.col, c.score))
    return picked


def audit_patch(p: Patch, pool: dict[str, PoolSlide], k: int) -> dict:
    a = pool[p.slide].audit
    window = {n: float(v[p.row : p.row + k, p.col : p.col + k].sum()) for n, v in a.items()}
    tissue = max(1.0, window["tissue"])
    return {
        "slide": p.slide,
        "centre": p.centre,
        "y": p.yx[0],
        "x": p.yx[1],
        "tumour": round(window["tumour"] / tissue, 4),
        "fp": round(window["fp"] / tissue, 4),
        "fn": round(window["fn"] / tissue, 4),
    }


# ----------------------------------------------------------------------------- runs


def evaluate_all(ens: Ensemble, refs: list[SlideRef], work: Path) -> dict[str, float]:
    return {r.key: evaluate_slide(ens, r, work).dice for r in refs}


def load_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def current_runs(runs: list[dict], recipe: FinetuneBudget) -> list[dict]:
    """The baseline and the runs made with ``recipe`` (a fixed recipe's earlier runs stay on file)."""
    defaults = asdict(FinetuneBudget())  # a run written before a field existed had its default
    return [r for r in runs if r["strategy"] == "baseline" or {**defaults, **r["recipe"]} == asdict(recipe)]


def run_key(strategy: str, budget: int, patch_um: int, seed: int) -> str:
    return f"{strategy}/{budget}/{patch_um}/{seed}"


def run_stage(cfg: Config, stage: Stage, model: Path, refs: list[SlideRef], out: Path, work: Path) -> list[dict]:
    """Every (strategy, budget, seed) of ``stage`` not yet in runs.jsonl; returns all runs so far."""
    runs_path = out / "runs.jsonl"
    recipe = asdict(cfg.recipe)
    runs = current_runs(load_runs(runs_path), cfg.recipe)
    by_key = {r["key"]: r for r in runs}
    eval_refs = [r for r in refs if r.role == "eval"]
    baseline = load_ensemble(model, threads=cfg.recipe.threads)
    parent = sha256_file(model / "members.pt")[:16]  # what every run starts from (the ONNX export may change)
    if "baseline" in by_key and by_key["baseline"].get("members") != parent:
        raise SystemExit(f"protocol_experiment: {runs_path} holds runs of other members.pt; give a fresh --out")
    if "baseline" not in by_key:
        t0 = time.time()
        dice = evaluate_all(baseline, eval_refs, work)
        rec = {"key": "baseline", "strategy": "baseline", "model": baseline.version, "members": parent}
        rec.update(dice=dice, recipe=recipe)
        rec["centres"] = {r.key: r.centre for r in eval_refs}
        rec["eval_s"] = round(time.time() - t0, 1)
        append(runs_path, rec)
        runs.append(rec)
        by_key["baseline"] = rec
        log(f"baseline: mean Dice {np.mean(list(dice.values())):.3f} ({rec['eval_s']:.0f} s)")
    pool = analyse_pool(baseline, [r for r in refs if r.role == "pool"], work)
    pool_by_key = {p.ref.key: p for p in pool}
    by_ref = {r.key: r for r in refs}
    k = max(1, round(stage.patch_um / MPP / QUEUE_CELL))
    replay = load_bank(model / "replay.npz")
    source = None
    if cfg.recipe.retrain:
        source = (*load_bank(cfg.source_bank), load_bank_slides(cfg.source_bank))
    todo = [(s, b, seed) for seed in range(stage.seeds) for b in stage.budgets for s in stage.strategies]
    todo = [t for t in todo if run_key(t[0], t[1], stage.patch_um, t[2]) not in by_key]
    log(f"{len(todo)} fine-tunes to run ({len(runs) - 1} already done)")
    t_stage = time.time()
    for n, (strategy, budget, seed) in enumerate(todo, 1):
        require_free_space(work)
        run_recipe = replace(cfg.recipe, seed=seed)
        if strategy == CONTROL:  # the steps a run of this budget plans, with no corrections
            patches = []
            run_recipe.steps = control_steps(cfg, budget, k * QUEUE_CELL)
            run_recipe.steps_per_mm2 = 0.0
        else:
            patches = choose(pool, strategy, budget, k, seed, cfg.quota_centres)
        chosen = sorted((p.slide, p.row, p.col) for p in patches)
        rec = {
            "key": run_key(strategy, budget, stage.patch_um, seed),
            "strategy": strategy,
            "budget": budget,
            "patch_um": stage.patch_um,
            "seed": seed,
            "recipe": recipe,
            "patches": [audit_patch(p, pool_by_key, k) for p in patches],
        }
        same = None
        if strategy != CONTROL:
            same = next(
                (
                    r
                    for r in runs
                    if r.get("seed") == seed
                    and r.get("patch_um") == stage.patch_um
                    and r.get("chosen") == chosen  # never a control's: only a control chose no patch
                ),
                None,
            )
        if same is not None:
            rec.update(chosen=chosen, dice=same["dice"], finetune_s=0.0, eval_s=0.0, shared_with=same["key"])
        else:
            ordered = sorted(patches, key=lambda p: (p.slide, p.row, p.col))
            pairs = read_corrections(ordered, by_ref, k * QUEUE_CELL)
            t0 = time.time()
            members, _ = finetune_members(model / "members.pt", pairs, replay, run_recipe, source=source)
            t_ft = time.time() - t0
            mdir = Path(tempfile.mkdtemp(prefix="ft-", dir=work))
            export_ensemble(members, mdir / "ensemble.onnx")
            ens = Ensemble(mdir / "ensemble.onnx", f"ft-{rec['key']}", threads=cfg.recipe.threads)
            t0 = time.time()
            rec.update(chosen=chosen, dice=evaluate_all(ens, eval_refs, work), finetune_s=round(t_ft, 1))
            if strategy == CONTROL:
                rec["steps"] = run_recipe.steps
            rec["eval_s"] = round(time.time() - t0, 1)
            del ens
            shutil.rmtree(mdir, ignore_errors=True)
        append(runs_path, rec)
        runs.append(rec)
        eta = (time.time() - t_stage) / n * (len(todo) - n) / 60
        log(
            f"[{n}/{len(todo)}] {rec['key']}: mean Dice {np.mean(list(rec['dice'].values())):.3f} "
            f"(fine-tune {rec['finetune_s']:.0f} s, eval {rec['eval_s']:.0f} s); about {eta:.0f} min left"
        )
    return runs


def control_steps(cfg: Config, budget: int, side_px: int) -> int:
    """Steps per member of a run of ``budget`` patches per quota centre (its held-out share excluded)."""
    n = budget * len(cfg.quota_centres)
    every = cfg.recipe.holdout_every
    trained = n - (n // every if every > 0 and n >= every else 0)
    return planned_steps(cfg.recipe, [np.zeros((side_px, side_px), np.uint8)] * trained, mpp=MPP)


def append(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- statistics


def paired_deltas(
    runs: list[dict],
    strategy: str,
    against: str,
    budget: int,
    patch_um: int,
    slides: list[str],
    against_run: tuple[int, int] | None = None,
):
    """(seeds, slides) array of Dice(strategy) − Dice(against) on ``slides``, over the seeds both ran
    (``against`` may be "baseline", one model for every seed; ``against_run`` = (budget, patch_um) of
    the other run when it differs). None when nothing pairs."""
    mine = {r["seed"]: r["dice"] for r in runs if r.get("key") == run_key(strategy, budget, patch_um, r.get("seed"))}
    their_budget, their_patch = against_run or (budget, patch_um)
    if against == "baseline":
        base = next((r["dice"] for r in runs if r["key"] == "baseline"), None)
        theirs = dict.fromkeys(mine, base) if base else {}
    else:
        theirs = {
            r["seed"]: r["dice"]
            for r in runs
            if r.get("key") == run_key(against, their_budget, their_patch, r.get("seed"))
        }
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    return np.array([[mine[s][k] - theirs[s][k] for k in slides] for s in seeds])


def bootstrap_mean(deltas: list[np.ndarray], n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean Δ over centres (each weighted equally) with a 95 % two-level percentile bootstrap CI:
    seeds resampled jointly (a seed's fine-tune touches every centre), then slides within each centre."""
    rng = np.random.default_rng(seed)
    n_seeds = deltas[0].shape[0]
    seed_w = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n) / n_seeds
    means = np.zeros(n)
    for d in deltas:
        n_slides = d.shape[1]
        slide_w = rng.multinomial(n_slides, np.full(n_slides, 1 / n_slides), size=n) / n_slides
        means += np.einsum("bs,sn,bn->b", seed_w, d, slide_w)
    means /= len(deltas)
    point = float(np.mean([d.mean() for d in deltas]))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return point, float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    return "beats random" if lo > 0 else "loses to random" if hi < 0 else "no evidence either way"


def centre_slides(runs: list[dict]) -> dict[str, list[str]]:
    base = next(r for r in runs if r["key"] == "baseline")
    out: dict[str, list[str]] = {}
    for key, centre in base["centres"].items():
        out.setdefault(centre, []).append(key)
    return out


def mean_dice(runs: list[dict], strategy: str, budget: int, patch_um: int, slides: list[str]) -> float | None:
    rs = [
        r for r in runs if r.get("strategy") == strategy and r.get("budget") == budget and r.get("patch_um") == patch_um
    ]
    if strategy == "baseline":
        rs = [r for r in runs if r["key"] == "baseline"]
    return float(np.mean([[r["dice"][k] for k in slides] for r in rs])) if rs else None


def adopt_centres(cfg: Config, runs: list[dict]) -> None:
    """The centres of the runs on file (a report of real slides' runs needs no ``--real``): every
    evaluation centre, and the quota centres patches were taken from."""
    base = next(r for r in runs if r["key"] == "baseline")
    cfg.centres = sorted(set(base["centres"].values()))
    quota = sorted({p["centre"] for r in runs for p in r.get("patches", [])})
    if quota and set(quota) != set(cfg.quota_centres):
        cfg.quota_centres = quota


def sanity_gate(
    runs: list[dict], budget: int = SANITY_BUDGET, patch_um: int = 256, floor: float = 0.05
) -> tuple[bool, list[dict]]:
    """PROTOCOL.md: oracle ≥ random ≥ baseline on every centre that got patches, and no centre (the
    source's included) more than ``floor`` below the baseline."""
    if not any(r["key"] == "baseline" for r in runs):
        return False, []  # nothing run yet
    rows, ok = [], True
    corrected = {p["centre"] for r in runs if r.get("strategy") == "random" for p in r["patches"]}
    for centre, slides in centre_slides(runs).items():
        d = {s: mean_dice(runs, s, budget, patch_um, slides) for s in ("baseline", "random", "oracle")}
        if d["random"] is None or d["oracle"] is None:
            return False, []
        order = d["oracle"] >= d["random"] >= d["baseline"] if centre in corrected else True
        drop = d["baseline"] - min(d["random"], d["oracle"]) <= floor
        ok &= order and drop
        rows.append(
            {
                "centre": centre,
                "budget": budget,
                **d,
                "corrected": centre in corrected,
                "order": order,
                "within_floor": drop,
            }
        )
    return ok, rows


def comparisons(runs: list[dict], cfg: Config, stage: Stage) -> list[dict]:
    """Δ against random per centre and pooled (covered centres; nonhed and source apart), per budget;
    for patches larger than 256 µm also each strategy against itself on 256 µm patches of the same area."""
    slides = centre_slides(runs)
    known = [c for c in cfg.quota_centres if c in LOCAL_CENTRES]  # none on real slides: pool every quota centre
    covered = [c for c in known if LOCAL_CENTRES[c].covered] if known else list(cfg.quota_centres)
    pooled_name = "pooled (covered)" if known else "pooled"
    rows = []
    pairs = [(s, "baseline" if s == "random" else "random", None) for s in stage.strategies if s != "random"]
    pairs += [("random", "baseline", None)] if "random" in stage.strategies else []
    small = (stage.patch_um // 256) ** 2  # 256 µm patches with the same area as one of these
    pairs += [(s, s, small) for s in stage.strategies] if small > 1 else []
    for strategy, against, per_patch in pairs:
        for budget in stage.budgets:
            other = (budget * per_patch, 256) if per_patch else None
            groups = {c: [c] for c in slides} | ({pooled_name: covered} if covered else {})
            for name, centres in groups.items():
                deltas = [
                    paired_deltas(runs, strategy, against, budget, stage.patch_um, slides[c], other) for c in centres
                ]
                if any(d is None for d in deltas):
                    continue
                point, lo, hi = bootstrap_mean(deltas, cfg.bootstrap)
                if per_patch:
                    label, word = f"{against} @ 256 µm × {budget * per_patch}", _vs_small(lo, hi)
                else:
                    label, word = against, verdict(lo, hi) if against == "random" else _vs_baseline(lo, hi)
                seeds = int(deltas[0].shape[0])
                if seeds < cfg.verdict_seeds:  # PROTOCOL.md: no verdict before every seed is in
                    word = f"pending ({seeds} of {cfg.verdict_seeds} seeds)"
                rows.append(
                    {
                        "strategy": strategy,
                        "against": label,
                        "budget": budget,
                        "area_mm2": round(budget * (stage.patch_um / 1000) ** 2, 3),
                        "centre": name,
                        "seeds": seeds,
                        "delta": point,
                        "lo": lo,
                        "hi": hi,
                        "verdict": word,
                    }
                )
    return rows


def negative_transfer(runs: list[dict], cfg: Config, stage: Stage) -> list[dict]:
    """Each strategy − baseline on the centres that gave no patches (the source's slides): what
    learning the other centres' corrections cost the tissue nobody corrected."""
    slides = centre_slides(runs)
    rows = []
    for strategy in stage.strategies:
        for budget in stage.budgets:
            for centre in [c for c in slides if c not in cfg.quota_centres]:
                delta = paired_deltas(runs, strategy, "baseline", budget, stage.patch_um, slides[centre])
                if delta is None:
                    continue
                point, lo, hi = bootstrap_mean([delta], cfg.bootstrap)
                seeds = int(delta.shape[0])
                word = _vs_baseline(lo, hi)
                if seeds < cfg.verdict_seeds:  # PROTOCOL.md: no verdict before every seed is in
                    word = f"pending ({seeds} of {cfg.verdict_seeds} seeds)"
                rows.append(
                    {"strategy": strategy, "budget": budget, "centre": centre, "seeds": seeds}
                    | {"delta": point, "lo": lo, "hi": hi, "verdict": word}
                )
    return rows


def _vs_small(lo: float, hi: float) -> str:
    return "larger patches better" if lo > 0 else "smaller patches better" if hi < 0 else "no evidence either way"


def _vs_baseline(lo: float, hi: float) -> str:
    return "above baseline" if lo > 0 else "below baseline" if hi < 0 else "no evidence either way"


def interval(r: dict) -> str:
    """A comparison row's estimate and 95 % CI, as every table prints it."""
    return f"{r['delta']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"


def by_centre(rows: list[dict], budget: int) -> list[str]:
    """One budget's comparisons as the README shows them: a row per centre (pooled, then the centres
    without patches, last), a column per strategy − random and random − baseline; bold where a
    verdict is given and the CI excludes 0."""
    rows = [r for r in rows if r["budget"] == budget and r["against"] in ("random", "baseline")]
    columns = list(dict.fromkeys((r["strategy"], r["against"]) for r in rows))
    centres = list(dict.fromkeys(r["centre"] for r in rows))
    pooled = [c for c in centres if c.startswith("pooled")]
    centres = [c for c in centres if c != "source" and c not in pooled] + pooled + [c for c in centres if c == "source"]
    cell = {(r["centre"], r["strategy"], r["against"]): r for r in rows}

    def text(r: dict | None) -> str:
        if r is None:
            return "–"
        value = interval(r).replace("-", "−")
        decided = not r["verdict"].startswith(("pending", "no evidence"))  # the verdict says the CI excludes 0
        return f"**{value}**" if decided else value

    lines = [
        "| centre | " + " | ".join(f"{s} − {a}" for s, a in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    lines += [f"| {c} | " + " | ".join(text(cell.get((c, s, a))) for s, a in columns) + " |" for c in centres]
    return lines


def selection_audit(runs: list[dict], stage: Stage) -> list[dict]:
    rows = []
    for strategy in stage.strategies + (["oracle"] if "oracle" not in stage.strategies else []):
        for budget in stage.budgets:
            ps = [p for r in runs if r.get("strategy") == strategy and r.get("budget") == budget for p in r["patches"]]
            if ps:
                mix: dict[str, int] = {}
                for p in ps:
                    mix[p["centre"]] = mix.get(p["centre"], 0) + 1
                rows.append(
                    {
                        "strategy": strategy,
                        "budget": budget,
                        "tumour": float(np.mean([p["tumour"] for p in ps])),
                        "fp": float(np.mean([p["fp"] for p in ps])),
                        "fn": float(np.mean([p["fn"] for p in ps])),
                        "mix": mix,
                    }
                )
    return rows


# ----------------------------------------------------------------------------- report


def report(runs: list[dict], cfg: Config, stage_name: str, stage: Stage, out: Path, wall_s: float | None) -> str:
    """The stage's tables (markdown, also written to ``out``); ``wall_s`` None for a report of runs on file."""
    base = next(r for r in runs if r["key"] == "baseline")
    done = [r for r in runs if r.get("strategy") in stage.strategies and r.get("budget") in stage.budgets]
    lines = [
        f"# Protocol experiment, stage `{stage_name}`, arm `{cfg.arm}`",
        "",
        f"Model `{base['model']}` (members.pt {base.get('members', '?')}; a re-export keeps the members); "
        f"quota centres {', '.join(cfg.quota_centres)}; {stage.patch_um} µm patches; "
        f"{len(done)} fine-tunes of {len(stage.strategies) * len(stage.budgets) * stage.seeds} in this stage; "
        f"recipe {json.dumps({k: v for k, v in asdict(cfg.recipe).items() if k != 'seed'})}; "
        f"{cfg.bootstrap} bootstrap resamples; "
        + ("report of the runs on file (--report)." if wall_s is None else f"this invocation {wall_s / 60:.1f} min."),
        "",
    ]
    ok, gate = sanity_gate(runs, budget=stage.budgets[0] if stage_name == "sanity" else SANITY_BUDGET)
    if gate:
        lines += [
            f"## Sanity gate (budget {gate[0]['budget']}): oracle ≥ random ≥ baseline, none > 0.05 below baseline",
            "",
        ]
        lines += ["| centre | baseline | random | oracle | order holds | within 0.05 |", "|---|---|---|---|---|---|"]
        for g in gate:
            order = ("yes" if g["order"] else "**no**") if g["corrected"] else "– (no patches)"
            floor = "yes" if g["within_floor"] else "**no**"
            lines.append(
                f"| {g['centre']} | {g['baseline']:.3f} | {g['random']:.3f} | {g['oracle']:.3f} | {order} | {floor} |"
            )
        lines += ["", f"Sanity gate: **{'passes' if ok else 'fails'}**.", ""]
    rows = comparisons(runs, cfg, stage)
    if rows:
        lines += ["## Paired Δ Dice (95 % two-level bootstrap CI over seeds and evaluation slides)", ""]
        lines += [
            "| strategy | against | budget (mm²) | centre | seeds | Δ [95 % CI] | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['strategy']} | {r['against']} | {r['budget']} ({r['area_mm2']}) | {r['centre']} "
                f"| {r['seeds']} | {interval(r)} | {r['verdict']} |"
            )
        lines.append("")
        for budget in stage.budgets:
            table = by_centre(rows, budget)
            if len(table) > 2:
                lines += [f"### Budget {budget} by centre (bold: the CI excludes 0)", "", *table, ""]
    transfer = negative_transfer(runs, cfg, stage)
    if transfer:
        lines += ["## Negative transfer: strategy − baseline on the centres that gave no patches", ""]
        lines += ["| strategy | budget | centre | seeds | Δ [95 % CI] | verdict |", "|---|---|---|---|---|---|"]
        for r in transfer:
            lines.append(
                f"| {r['strategy']} | {r['budget']} | {r['centre']} | {r['seeds']} | {interval(r)} | {r['verdict']} |"
            )
        lines.append("")
    audit = selection_audit(runs, stage)
    if audit:
        lines += ["## Selection audit (share of the chosen patches' tissue; patches per centre over all seeds)", ""]
        lines += [
            "| strategy | budget | tumour | baseline FP | baseline FN | centre mix |",
            "|---|---|---|---|---|---|",
        ]
        for a in audit:
            mix = ", ".join(f"{c} {n}" for c, n in sorted(a["mix"].items()))
            lines.append(
                f"| {a['strategy']} | {a['budget']} | {a['tumour']:.3f} | {a['fp']:.3f} | {a['fn']:.3f} | {mix} |"
            )
        lines.append("")
    ft = [r["finetune_s"] for r in done if r.get("finetune_s")]
    ev = [r["eval_s"] for r in done if r.get("eval_s")]
    if ft:
        lines += [
            f"Per fine-tune: {np.mean(ft):.0f} s training (5 members), {np.mean(ev):.0f} s evaluating "
            f"{len(base['dice'])} slides.",
            "",
        ]
    text = "\n".join(lines)
    name = stage_name if cfg.arm == "finetune" else f"{stage_name}-{cfg.arm}"
    (out / f"results-{name}.md").write_text(text)
    (out / f"results-{name}.json").write_text(
        json.dumps(
            {
                "sanity_gate": {"passes": ok, "rows": gate},
                "comparisons": rows,
                "negative_transfer": transfer,
                "audit": audit,
            },
            indent=2,
        )
    )
    if rows:
        plot(rows, out / f"delta-{name}.png")
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = list(dict.fromkeys(r["centre"] for r in rows))
    series = list(dict.fromkeys((r["strategy"], r["against"]) for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, len(centres), figsize=(2.8 * len(centres), 3.2), sharey=True, squeeze=False)
    for ax, centre in zip(axes[0], centres, strict=True):
        for i, (s, against) in enumerate(series):
            rs = [r for r in rows if r["centre"] == centre and r["strategy"] == s and r["against"] == against]
            offset = (i - (len(series) - 1) / 2) * 0.6 / max(1, len(series))  # side by side around each budget
            x = np.array([budgets.index(r["budget"]) for r in rs]) + offset
            y = np.array([r["delta"] for r in rs])
            err = np.array([[r["delta"] - r["lo"] for r in rs], [r["hi"] - r["delta"] for r in rs]])
            ax.errorbar(x, y, yerr=err, fmt="o", ms=3, capsize=2, label=f"{s} − {against}")
        ax.set_xticks(np.arange(len(budgets)), [str(b) for b in budgets])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlim(-0.6, len(budgets) - 0.4)
        ax.set_title(centre, fontsize=9)
        ax.set_xlabel("patches per centre")
    axes[0][0].set_ylabel("Δ Dice (95 % CI)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=sorted(STAGES), default="sanity")
    ap.add_argument("--model", type=Path, default=MODEL, help="model directory (members.pt, replay.npz, ensemble.onnx)")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/protocol (-quick with --quick)")
    ap.add_argument(
        "--real", type=Path, default=None, help="real slides: DIR/<centre>/<pool|eval>/<name> + <name>.mask.tif"
    )
    ap.add_argument(
        "--arm",
        choices=sorted(ARMS),
        default="finetune",
        help="fine-tune on corrections + replay, or the paper's retrain",
    )
    ap.add_argument(
        "--source-bank",
        type=Path,
        default=None,
        help=f"the retrain arm's source training bank (default: <cache>/{SOURCE_BANK})",
    )
    ap.add_argument("--seeds", type=int, default=None, help="seeds (the protocol: 5)")
    ap.add_argument("--budgets", type=int, nargs="+", default=None, help="run only these of the stage's budgets")
    ap.add_argument("--strategies", nargs="+", default=None, help="run only these of the stage's strategies")
    ap.add_argument(
        "--quick", action="store_true", help="tiny pipeline check: small slides, 2 seeds, budget 2, 2 steps"
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="run nothing: write the stage's report from the runs on file (while the stage is running elsewhere)",
    )
    args = ap.parse_args(argv)
    args.out = args.out or REPO / "bench" / "results" / ("protocol-quick" if args.quick else "protocol")
    cfg, stage = Config(recipe=replace(ARMS[args.arm]), arm=args.arm), replace(STAGES[args.stage])
    if args.arm == "retrain" and not args.report:  # a report trains nothing: no bank needed
        cfg.source_bank = args.source_bank or cache_dir() / SOURCE_BANK
        if not cfg.source_bank.is_file():
            ap.error(
                f"--arm retrain needs the source training bank; {cfg.source_bank} is missing "
                "(python -m models.train prepare --recipe protocol builds it, or give --source-bank)"
            )
        card = json.loads((args.model / "card.json").read_text()) if (args.model / "card.json").is_file() else {}
        if card.get("recipe", {}).get("folds") and load_bank_slides(cfg.source_bank) is None:
            ap.error(f"{cfg.source_bank} records no slide per patch; the model's members train on folds of slides")
    if args.quick:
        cfg = Config(
            pool_per_centre=1,
            eval_per_centre=1,
            side=1536,
            pool_side=1536,
            centres=["source", "blur", "nonhed"],
            quota_centres=["blur", "nonhed"],
            recipe=replace(ARMS[args.arm], steps=2, max_steps=2),
            bootstrap=500,
            verdict_seeds=2,
            arm=args.arm,
            source_bank=cfg.source_bank,
        )
        stage = replace(stage, budgets=[2], seeds=2)
        if args.stage == "sanity":
            stage.strategies = ["random", "oracle", "uga_topk"]
    if args.seeds:
        stage.seeds = args.seeds
    for name in ("budgets", "strategies"):  # a part of the stage now, the rest on a later call (resumable)
        wanted = getattr(args, name)
        if wanted:
            unknown = set(wanted) - set(getattr(stage, name))
            if unknown:
                ap.error(f"--{name} {sorted(unknown)} are not in stage {args.stage!r}: {getattr(stage, name)}")
            setattr(stage, name, [v for v in getattr(stage, name) if v in wanted])
    args.out.mkdir(parents=True, exist_ok=True)
    gate_recipe = cfg.recipe  # the arm's recipe, on which the sanity gate ran
    if stage.holdout_every is not None:
        cfg.recipe = replace(cfg.recipe, holdout_every=stage.holdout_every)
    if args.stage not in ("sanity", "control") and not args.quick:
        ok, _ = sanity_gate(current_runs(load_runs(args.out / "runs.jsonl"), gate_recipe))
        if not ok:
            print("protocol_experiment: the sanity gate has not passed; run --stage sanity first (PROTOCOL.md)")
            return 2
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="uga-protocol-"))
    try:
        if args.real:
            refs = discover_slides(args.real)
            cfg.centres = sorted({r.centre for r in refs})
            cfg.quota_centres = sorted({r.centre for r in refs if r.role == "pool"})
        elif not args.report:
            refs = local_refs(cfg)
        if args.report:
            runs = current_runs(load_runs(args.out / "runs.jsonl"), cfg.recipe)
            if not any(r["key"] == "baseline" for r in runs):
                print(f"protocol_experiment: no runs in {args.out}; run the stage first (without --report)")
                return 2
            adopt_centres(cfg, runs)
        else:
            runs = run_stage(cfg, stage, args.model, refs, args.out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(runs, cfg, args.stage, stage, args.out, None if args.report else time.time() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
