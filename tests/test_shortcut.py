"""The shortcut gate's statistics on data whose answer is known."""

import numpy as np

from models.data.shortcut import balanced, balanced_index, block_features, cv_accuracy


def test_separable_features_are_found_and_noise_is_chance():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200), np.ones(200)]
    separable = rng.normal(size=(400, 5)) + y[:, None] * np.array([0, 0, 0, 3.0, 0])
    assert cv_accuracy(separable, y)[0] > 0.9
    noise = rng.normal(size=(400, 5))
    assert abs(cv_accuracy(noise, y)[0] - 0.5) < 0.1


def test_block_features_see_sharpness_and_colour():
    flat = np.full((64, 64, 3), 128, np.uint8)
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    f_flat, f_checker = block_features(flat), block_features(checker)
    assert f_flat[3] < 1e-9 and f_checker[3] > 1  # high-frequency energy: none on a flat block
    assert abs(f_flat[0] - 128 / 255) < 1e-4 and f_flat[4] < 1e-6 and f_checker[4] > 0.4
    x, y = balanced(np.arange(10.0)[:, None], np.r_[np.ones(3), np.zeros(7)])
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]


def test_a_slides_chance_association_is_not_a_shortcut_when_slides_are_held_out():
    """Each slide shifts one class's feature by its own random sign: within a slide the classes
    differ, but holding a slide out shows that no rule carries over to another slide."""
    rng = np.random.default_rng(1)
    xs, ys, groups = [], [], []
    for slide, sign in enumerate([1, -1, 1, -1]):
        y = np.r_[np.zeros(100), np.ones(100)]
        slide_offset = rng.normal(size=5) * 3  # each slide its own level of every feature
        x = rng.normal(size=(200, 5)) + slide_offset + sign * 1.5 * y[:, None] * np.array([0, 0, 0, 1.0, 0])
        xs.append(x)
        ys.append(y)
        groups.append(np.full(200, slide))
    x, y, g = np.vstack(xs), np.concatenate(ys), np.concatenate(groups)
    assert cv_accuracy(x, y, groups=g)[0] < 0.6
    keep = balanced_index(y, groups=g)
    assert all((y[keep][g[keep] == s] == 1).sum() == (y[keep][g[keep] == s] == 0).sum() for s in range(4))
    separable = rng.normal(size=(800, 5)) + y[:, None] * np.array([0, 0, 0, 3.0, 0])
    assert cv_accuracy(separable, y, groups=g)[0] > 0.9  # a real rule still carries over
