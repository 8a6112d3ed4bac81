"""How many "beats random" / "loses to random" verdicts would chance alone give? (exploratory)

The protocol's verdicts (bench/PROTOCOL.md) are one 95 % interval each; the comparison stage draws
many of them (strategies × centre rows × budgets). This prints, for the budgets whose five seeds are
all in:

- the family: how many strategy − random intervals there are, and how many exclude 0 each way;
- the nominal expectation if no strategy differed from random (2.5 % of the family each way);
- a relabelling null: within each (budget, seed), which of the compared runs is called "random" is
  shuffled, the whole family recomputed, and the count of exclusions kept. It keeps every
  correlation of the real design (all strategies share one random run per seed) and the bootstrap's
  own behaviour with five seeds;
- how often each strategy's point estimate is above random, across rows and budgets.

It changes no verdict and no rule: it is read beside the report. Usage:

    python bench/protocol_multiplicity.py [--runs bench/results/protocol/runs.jsonl] [--perms 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.protocol_experiment import (  # noqa: E402
    ARMS,
    STAGES,
    bootstrap_mean,
    centre_slides,
    current_runs,
    load_runs,
    paired_deltas,
    run_key,
)
from models.data.localshift import LOCAL_CENTRES  # noqa: E402

PATCH_UM = 256
SEEDS = 5


def complete_budgets(runs: list[dict], arms: list[str]) -> list[int]:
    """Budgets of the comparison stage where every arm has all five seeds."""
    have = {r["key"] for r in runs}
    return [
        b
        for b in STAGES["compare"].budgets
        if all(run_key(a, b, PATCH_UM, s) in have for a in arms for s in range(SEEDS))
    ]


def family(runs: list[dict], strategies: list[str], budgets: list[int], resamples: int) -> list[tuple]:
    """(budget, strategy, row, Δ, lo, hi) of every strategy − random interval, as the report draws them."""
    slides = centre_slides(runs)
    covered = [c for c in slides if c in LOCAL_CENTRES and LOCAL_CENTRES[c].covered and c != "source"]
    rows = {c: [c] for c in slides} | {"pooled (covered)": covered}
    out = []
    for budget in budgets:
        for strategy in strategies:
            for row, centres in rows.items():
                deltas = [paired_deltas(runs, strategy, "random", budget, PATCH_UM, slides[c]) for c in centres]
                out.append((budget, strategy, row, *bootstrap_mean(deltas, resamples)))
    return out


def relabelled(runs: list[dict], arms: list[str], budgets: list[int], rng: np.random.Generator) -> list[dict]:
    """The runs with, in each (budget, seed), the arms' labels shuffled among their runs."""
    by_key = {r["key"]: r for r in runs}
    kept = [r for r in runs if not (r.get("budget") in budgets and r.get("strategy") in arms)]
    for budget in budgets:
        for seed in range(SEEDS):
            for arm, source in zip(arms, rng.permutation(arms), strict=True):
                run = by_key[run_key(str(source), budget, PATCH_UM, seed)]
                kept.append({**run, "key": run_key(arm, budget, PATCH_UM, seed), "strategy": arm})
    return kept


def spread(runs: list[dict], strategies: list[str], budgets: list[int]) -> tuple[float, float, float]:
    """Standard deviations of a Δ's seed effect, slide effect and residual (two-way ANOVA on each
    strategy × centre × budget (seeds, slides) table, variance components averaged)."""
    slides = centre_slides(runs)
    parts = []
    for budget in budgets:
        for strategy in strategies:
            for keys in slides.values():
                d = paired_deltas(runs, strategy, "random", budget, PATCH_UM, keys)
                s, n = d.shape
                resid = d - d.mean(1, keepdims=True) - d.mean(0, keepdims=True) + d.mean()
                ms_e = (resid**2).sum() / ((s - 1) * (n - 1))
                ms_seed, ms_slide = n * d.mean(1).var(ddof=1), s * d.mean(0).var(ddof=1)
                parts.append((max(0.0, (ms_seed - ms_e) / n), max(0.0, (ms_slide - ms_e) / s), ms_e))
    return tuple(float(np.sqrt(v)) for v in np.mean(parts, axis=0))


def null_exclusion_rate(sd: tuple[float, float, float], shape: tuple[int, int], centres: int, sims: int) -> float:
    """Share of simulated no-effect intervals that exclude 0 (``centres`` > 1: a pooled interval, the
    centres' seed effects drawn independently)."""
    rng = np.random.default_rng(5)
    s, n = shape
    excluded = 0
    for i in range(sims):
        deltas = [
            rng.normal(0, sd[0], (s, 1)) + rng.normal(0, sd[1], (1, n)) + rng.normal(0, sd[2], (s, n))
            for _ in range(centres)
        ]
        _, lo, hi = bootstrap_mean(deltas, 2000, i)
        excluded += lo > 0 or hi < 0
    return excluded / sims


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=REPO / "bench" / "results" / "protocol" / "runs.jsonl")
    ap.add_argument("--arm", choices=list(ARMS), default="retrain")
    ap.add_argument("--perms", type=int, default=200, help="relabellings of the null")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval in the null")
    ap.add_argument("--sims", type=int, default=1000, help="simulated no-effect tables for the coverage check")
    args = ap.parse_args(argv)

    runs = current_runs(load_runs(args.runs), ARMS[args.arm])
    strategies = [s for s in STAGES["compare"].strategies if s != "random"]
    arms = [*strategies, "random"]
    budgets = complete_budgets(runs, arms)
    if not budgets:
        print("no budget of the comparison has all five seeds of every strategy yet", file=sys.stderr)
        return 2
    observed = family(runs, strategies, budgets, 10_000)
    wins = sum(lo > 0 for *_, lo, hi in observed)
    losses = sum(hi < 0 for *_, lo, hi in observed)
    n = len(observed)
    rng = np.random.default_rng(1)
    null_wins, null_losses = [], []
    for i in range(args.perms):
        fam = family(relabelled(runs, arms, budgets, rng), strategies, budgets, args.resamples)
        null_wins.append(sum(lo > 0 for *_, lo, hi in fam))
        null_losses.append(sum(hi < 0 for *_, lo, hi in fam))
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{args.perms} relabellings", file=sys.stderr)
    nw, nl = np.array(null_wins), np.array(null_losses)

    print(f"# Multiplicity of the comparison (arm {args.arm}, budgets {', '.join(map(str, budgets))}; exploratory)\n")
    print(
        f"Family: {len(strategies)} strategies × {n // len(strategies) // len(budgets)} rows × {len(budgets)} budgets"
    )
    print(f"= {n} intervals against random; observed {wins} beat random, {losses} lose to it.\n")
    print("| if no strategy differed from random | beats random | loses to random |")
    print("|---|---|---|")
    print(f"| nominal (2.5 % of {n} each way) | {0.025 * n:.1f} | {0.025 * n:.1f} |")
    print(f"| relabelling null, mean ({args.perms} shuffles) | {nw.mean():.1f} | {nl.mean():.1f} |")
    print(f"| relabelling null, 90th percentile | {np.percentile(nw, 90):.0f} | {np.percentile(nl, 90):.0f} |")
    print(f"| shuffles with at least the observed count | {np.mean(nw >= wins):.2f} | {np.mean(nl >= losses):.2f} |")
    sd = spread(runs, strategies, budgets)
    shape = (SEEDS, len(centre_slides(runs)["stain"]) if "stain" in centre_slides(runs) else 4)
    per_centre = null_exclusion_rate(sd, shape, 1, args.sims)
    pooled = null_exclusion_rate(sd, shape, 4, args.sims)
    print(
        f"\nNo-effect intervals that exclude 0, simulated with the data's spread (seed {sd[0]:.4f}, slide "
        f"{sd[1]:.4f}, residual {sd[2]:.4f}; {args.sims} simulations): one centre {100 * per_centre:.0f} %, "
        f"pooled {100 * pooled:.0f} % (nominal 5 %)."
    )
    print("\n| strategy | point estimate above random (rows × budgets) | beats | loses |")
    print("|---|---|---|---|")
    for s in strategies:
        mine = [r for r in observed if r[1] == s]
        above = sum(r[3] > 0 for r in mine)
        print(f"| {s} | {above} of {len(mine)} | {sum(r[4] > 0 for r in mine)} | {sum(r[5] < 0 for r in mine)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
