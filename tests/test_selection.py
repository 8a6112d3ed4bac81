"""The selection strategies the queue and the experiment share, on candidates whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import Unprocessable
from service.inference.queue import CellStats, build_queue, score_candidates
from service.inference.selection import STRATEGIES, Candidate, kmeans_pp, select
from service.vocabulary import SELECTIONS


def cand(row: int, col: int, score: float, prob: float, embedding=None) -> Candidate:
    """A candidate whose embedding (unless given) is its predicted class and position."""
    return Candidate(row, col, score, score, prob, 1.0, embedding or (4 * prob, row / 3, col / 3))


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


def test_kmeans_pp_seeds_land_in_separate_clusters():
    rng = np.random.default_rng(0)
    clusters = [rng.normal(centre, 0.05, (30, 2)) for centre in ((0, 0), (5, 0), (0, 5))]
    seeds = kmeans_pp(np.vstack(clusters), 3, rng, first=0)
    assert seeds[0] == 0 and sorted(i // 30 for i in seeds) == [0, 1, 2]


def _two_kinds(n_a: int = 8, n_b: int = 6) -> list[Candidate]:
    """Kind A (embedding near 0) holds the eight best scores; kind B (near 10) follows within the top 3k."""
    a = [cand(0, 2 * i, 1.0 - i / 100, 0.8, (0.0 + i / 100, 0.0)) for i in range(n_a)]
    b = [cand(4, 2 * i, 0.8 - i / 100, 0.8, (10.0 + i / 100, 10.0)) for i in range(n_b)]
    return a + b


def test_uncertainty_diversity_spreads_the_top_over_the_embedding_where_top_k_does_not():
    cands, rng = _two_kinds(), np.random.default_rng(0)
    top = select("uncertainty", cands, 1, 4, rng)
    assert all(c.embedding[0] < 5 for c in top)  # four views of the same kind
    diverse = select("uncertainty_diversity", cands, 1, 4, rng)
    assert diverse[0] == top[0] and {c.embedding[0] > 5 for c in diverse} == {True, False}
    assert [c.score for c in diverse] == sorted((c.score for c in diverse), reverse=True)


def test_representative_takes_each_kind_of_tissue_whatever_its_score():
    cands = [cand(0, 2 * i, 0.0, 0.1, (0.0 + i / 100, 0.0)) for i in range(30)]
    cands += [cand(4, 2 * i, 0.0, 0.1, (10.0 + i / 100, 0.0)) for i in range(30)]
    cands += [cand(8, 2 * i, 0.0, 0.1, (0.0, 10.0 + i / 100)) for i in range(30)]
    picked = select("representative", cands, 1, 3, np.random.default_rng(3))
    assert sorted(c.row for c in picked) == [0, 4, 8]


def test_diversity_needs_a_model_with_an_embedding():
    plain = [Candidate(c.row, c.col, c.score, c.score, c.mean_probability, 1.0) for c in GRID]
    for name in ("uncertainty_diversity", "representative"):
        with pytest.raises(Unprocessable, match="needs a model whose graph outputs an embedding") as err:
            select(name, plain, 1, 3, np.random.default_rng(0))
        assert err.value.code == "selection_needs_embedding"


def test_a_patch_embedding_is_the_tissue_weighted_mean_of_its_cells():
    tissue = np.full((4, 4), 64.0 * 64)
    tissue[0, 0] = 0.0  # a glass cell does not count
    embedding = np.stack([np.arange(16.0).reshape(4, 4) * tissue, -np.ones((4, 4)) * tissue])
    stats = CellStats(64, tissue, tissue * 0.5, tissue * 0.2, np.zeros((4, 4)), embedding)
    first = next(c for c in score_candidates(stats, 2) if (c.row, c.col) == (0, 0))
    assert first.embedding == pytest.approx(((1 + 4 + 5) / 3, -1.0))
    items = build_queue(
        stats, patch_px=128, top=2, scoring="mean", min_tissue=0.5, mpp=1.0, level0_mpp=0.5,
        slide_key="s", measure="uga", model_version="v", selection="uncertainty_diversity",
    )  # fmt: skip
    assert len(items) == 2 and all(i["selection"] == "uncertainty_diversity" for i in items)
