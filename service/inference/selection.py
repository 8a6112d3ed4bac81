"""Patch selection strategies: one registry, used by the service's review queue and by the experiment
(bench/experiment.py), so what is measured is what is served. Pure functions over candidates.

Each strategy returns up to ``top`` non-overlapping candidates (k x k cells), ranked:

- ``uncertainty``: the highest scores first (the paper's UGA top-k when the score is the UGA score);
- ``class_balanced``: the same ranking within predicted tumour and predicted normal, taken
  alternately (a quota of half each, the rest from whichever class has more), so corrections do
  not all teach one direction;
- ``random``: uniform at random (a draw from ``rng``; nested: a larger budget extends a smaller one).

The experiment's ``oracle`` is ``uncertainty`` over scores that are the true error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np


@dataclass
class Candidate:
    row: int  # in cells
    col: int
    score: float
    mean_uncertainty: float
    mean_probability: float
    tissue_fraction: float


def select_non_overlapping(candidates: list[Candidate], k: int, top: int) -> list[Candidate]:
    """Greedy: best score first, skipping any patch that overlaps one already chosen."""
    chosen: list[Candidate] = []
    for cand in sorted(candidates, key=lambda c: (-c.score, c.row, c.col)):
        if all(abs(cand.row - o.row) >= k or abs(cand.col - o.col) >= k for o in chosen):
            chosen.append(cand)
            if len(chosen) == top:
                break
    return chosen


Strategy = Callable[[list[Candidate], int, int, np.random.Generator], list[Candidate]]
TUMOUR = 0.5  # a candidate is predicted tumour when its mean probability is at least this


def by_score(cands: list[Candidate], k: int, top: int, rng: np.random.Generator) -> list[Candidate]:
    return select_non_overlapping(cands, k, top)


def random_scores(cands: list[Candidate], rng: np.random.Generator) -> list[Candidate]:
    """The candidates with uniform random scores (what ``random`` ranks by; the experiment pools them)."""
    return [replace(c, score=float(d)) for c, d in zip(cands, rng.random(len(cands)), strict=True)]


def at_random(cands: list[Candidate], k: int, top: int, rng: np.random.Generator) -> list[Candidate]:
    return select_non_overlapping(random_scores(cands, rng), k, top)


def class_balanced(cands: list[Candidate], k: int, top: int, rng: np.random.Generator) -> list[Candidate]:
    """Best-scored first within each predicted class, alternating between the classes (the class with
    the best candidate first), never two overlapping patches."""
    groups = [
        select_non_overlapping([c for c in cands if c.mean_probability >= TUMOUR], k, 2 * top),
        select_non_overlapping([c for c in cands if c.mean_probability < TUMOUR], k, 2 * top),
    ]
    groups.sort(key=lambda g: -g[0].score if g else np.inf)
    picked: list[Candidate] = []
    for i in range(max(map(len, groups))):
        for group in groups:
            if i < len(group) and len(picked) < top and not any(_overlap(group[i], o, k) for o in picked):
                picked.append(group[i])
    return picked


def _overlap(a: Candidate, b: Candidate, k: int) -> bool:
    return abs(a.row - b.row) < k and abs(a.col - b.col) < k


STRATEGIES: dict[str, Strategy] = {"uncertainty": by_score, "class_balanced": class_balanced, "random": at_random}


def select(strategy: str, cands: list[Candidate], k: int, top: int, rng: np.random.Generator) -> list[Candidate]:
    """The ``strategy``'s ranked choice (ValueError for an unknown name)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection {strategy!r}; use one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](cands, k, top, rng)
