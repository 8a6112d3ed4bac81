"""Patch selection strategies: one registry, used by the service's review queue and by the experiments
(bench/protocol_experiment.py; the stress test bench/experiment.py pools or interleaves its picks), so
what is measured is what is served. Pure functions over candidates.

Each strategy returns up to ``top`` non-overlapping candidates (k x k cells), ranked:

- ``uncertainty``: the highest scores first (the paper's UGA top-k when the score is the UGA score);
- ``class_balanced``: the same ranking within predicted tumour and predicted normal, taken
  alternately (a quota of half each, the rest from whichever class has more), so corrections do
  not all teach one direction;
- ``random``: uniform at random (a draw from ``rng``; nested: a larger budget extends a smaller one);
- ``uncertainty_diversity``: the 3 x ``top`` best-scored patches, then ``top`` of them spread over
  the model's feature embedding by k-means++ seeding (the best-scored first), so the corrections are
  not ``top`` views of one failure;
- ``representative``: patches that stand for the slide's tissue: k-means on the embeddings of a
  random non-overlapping cover, the patch nearest each centre (uncertainty plays no part).

The last two need a model whose graph outputs an embedding (models/novelty.py).

The experiment's ``oracle`` is ``uncertainty`` over scores that are the true error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from service.errors import Unprocessable


@dataclass
class Candidate:
    row: int  # in cells
    col: int
    score: float
    mean_uncertainty: float
    mean_probability: float
    tissue_fraction: float
    embedding: tuple[float, ...] | None = None  # the model's feature embedding, mean over the patch


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


NEEDS_EMBEDDING = frozenset({"uncertainty_diversity", "representative"})


def _no_embedding(strategy: str) -> Unprocessable:
    return Unprocessable(
        "selection_needs_embedding",
        f"selection {strategy!r} needs a model whose graph outputs an embedding (trained with "
        "'python -m models.train --recipe protocol'); the serving model has none: choose "
        "'uncertainty', 'class_balanced' or 'random'",
    )


def require_embedding(strategy: str, embedding_dims: int) -> None:
    """Refuse (Unprocessable) a ``strategy`` that needs patch embeddings when the model has none, so a
    job fails before any work rather than after segmenting the whole slide."""
    if strategy in NEEDS_EMBEDDING and embedding_dims <= 0:
        raise _no_embedding(strategy)


def _embeddings(cands: list[Candidate], strategy: str) -> np.ndarray:
    """(n, E) standardised embeddings (Unprocessable when the model gives none)."""
    if any(c.embedding is None for c in cands):
        raise _no_embedding(strategy)
    x = np.array([c.embedding for c in cands], np.float64)
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)


def kmeans_pp(points: np.ndarray, k: int, rng: np.random.Generator, first: int | None = None) -> list[int]:
    """Indices of ``k`` seeds by k-means++ (each next one drawn with probability ∝ squared distance to
    the nearest seed so far); ``first`` fixes the first seed, else it is drawn uniformly."""
    n = len(points)
    if n == 0 or k <= 0:
        return []
    chosen = [int(rng.integers(n)) if first is None else first]
    nearest = ((points - points[chosen[0]]) ** 2).sum(axis=1)
    while len(chosen) < min(k, n):
        total = nearest.sum()
        i = int(rng.choice(n, p=nearest / total)) if total > 0 else int(rng.integers(n))
        if i in chosen:  # only possible when every remaining point coincides with a seed
            i = next(j for j in range(n) if j not in chosen)
        chosen.append(i)
        nearest = np.minimum(nearest, ((points - points[i]) ** 2).sum(axis=1))
    return chosen


def uncertainty_diversity(cands: list[Candidate], k: int, top: int, rng: np.random.Generator) -> list[Candidate]:
    pool = select_non_overlapping(cands, k, 3 * top)
    if len(pool) <= top:
        return pool
    picked = kmeans_pp(_embeddings(pool, "uncertainty_diversity"), top, rng, first=0)
    return sorted((pool[i] for i in picked), key=lambda c: -c.score)


def representative(cands: list[Candidate], k: int, top: int, rng: np.random.Generator) -> list[Candidate]:
    pool = select_non_overlapping(random_scores(cands, rng), k, 20 * top)
    if len(pool) <= top:
        return pool
    x = _embeddings(pool, "representative")
    centres = x[kmeans_pp(x, top, rng)]
    for _ in range(10):  # Lloyd iterations
        assign = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
        centres = np.array([x[assign == j].mean(axis=0) if (assign == j).any() else centres[j] for j in range(top)])
    distance = ((x[:, None, :] - centres[None]) ** 2).sum(axis=2)
    picked: list[int] = []
    for j in np.argsort(np.bincount(distance.argmin(axis=1), minlength=top))[::-1]:  # biggest clusters first
        i = next((int(i) for i in np.argsort(distance[:, j]) if int(i) not in picked), None)
        if i is not None:
            picked.append(i)
    return [pool[i] for i in picked[:top]]


STRATEGIES: dict[str, Strategy] = {
    "uncertainty": by_score,
    "class_balanced": class_balanced,
    "random": at_random,
    "uncertainty_diversity": uncertainty_diversity,
    "representative": representative,
}


def select(strategy: str, cands: list[Candidate], k: int, top: int, rng: np.random.Generator) -> list[Candidate]:
    """The ``strategy``'s ranked choice (ValueError for an unknown name)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection {strategy!r}; use one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](cands, k, top, rng)
