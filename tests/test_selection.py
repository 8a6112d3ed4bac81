"""The selection strategies the queue and the experiment share, on candidates whose answer is known."""

from __future__ import annotations

import numpy as np

from service.inference.selection import STRATEGIES, Candidate, select
from service.vocabulary import SELECTIONS


def cand(row: int, col: int, score: float, prob: float) -> Candidate:
    return Candidate(row, col, score, score, prob, 1.0)


# a 10 x 10 grid of 1-cell patches: tumour in the left half, the most uncertain ones all tumour
GRID = [cand(r, c, score=1.0 - (r * 10 + c) / 100 if c < 5 else 0.3 - (r * 10 + c) / 1000, prob=0.8 if c < 5 else 0.1)
        for r in range(10) for c in range(10)]  # fmt: skip


def test_every_selection_of_the_options_is_a_registered_strategy():
    assert set(STRATEGIES) == set(SELECTIONS)


def test_uncertainty_takes_the_top_scores_and_class_balanced_alternates_classes():
    rng = np.random.default_rng(0)
    top = select("uncertainty", GRID, 1, 6, rng)
    assert all(c.mean_probability > 0.5 for c in top)  # the paper's top-k: one-sided here
    balanced = select("class_balanced", GRID, 1, 6, rng)
    assert [c.mean_probability > 0.5 for c in balanced] == [True, False] * 3
    assert balanced[0] == top[0]  # the best candidate still leads
    tumour_only = [c for c in GRID if c.mean_probability > 0.5]
    assert len(select("class_balanced", tumour_only, 1, 6, rng)) == 6  # one class: filled from it


def test_no_strategy_returns_overlapping_patches():
    k = 3
    for name in STRATEGIES:
        chosen = select(name, GRID, k, 5, np.random.default_rng(1))
        for i, a in enumerate(chosen):
            for b in chosen[i + 1 :]:
                assert abs(a.row - b.row) >= k or abs(a.col - b.col) >= k, name


def test_random_is_reproducible_by_its_generator_and_nested_across_budgets():
    small = select("random", GRID, 1, 3, np.random.default_rng(7))
    large = select("random", GRID, 1, 8, np.random.default_rng(7))
    assert large[:3] == small
    assert select("random", GRID, 1, 8, np.random.default_rng(8)) != large
