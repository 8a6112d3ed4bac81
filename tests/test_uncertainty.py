import numpy as np
import pytest

from service.inference import uncertainty as u


def test_entropy_hand_values():
    # H(0.5) = 1 bit; H(0.25) = 0.811278 bits; H(0)≈0
    np.testing.assert_allclose(u.binary_entropy(np.array([0.5, 0.25, 0.0])), [1.0, 0.811278, 0.0], atol=1e-4)


def test_measures_for_two_disagreeing_members():
    probs = np.array([[0.1], [0.9]], np.float32)  # M=2, one pixel
    m = u.all_measures(probs)
    h01 = -(0.1 * np.log2(0.1) + 0.9 * np.log2(0.9))  # 0.468996
    assert m["probability"][0] == pytest.approx(0.5)
    assert m["entropy"][0] == pytest.approx(1.0, abs=1e-5)
    assert m["mutual_information"][0] == pytest.approx(1.0 - h01, abs=1e-5)
    # UGA: mean_m CE(0.5, p_m) = -(0.5 log2 0.1 + 0.5 log2 0.9) for both members
    ce = -(0.5 * np.log2(0.1) + 0.5 * np.log2(0.9))
    assert m["uga"][0] == pytest.approx(ce, abs=1e-5)
    assert ce == pytest.approx(1.736966, abs=1e-5)


def test_uga_equals_entropy_plus_mean_kl():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.01, 0.99, (5, 50)).astype(np.float32)
    pbar = probs.mean(0)
    kl = pbar * np.log2(pbar / probs) + (1 - pbar) * np.log2((1 - pbar) / (1 - probs))
    np.testing.assert_allclose(u.uga_score(probs), u.binary_entropy(pbar) + kl.mean(0), atol=1e-5)


def test_agreeing_members_have_zero_mutual_information_and_uga_equals_entropy():
    probs = np.full((5, 4), 0.3, np.float32)
    m = u.all_measures(probs)
    np.testing.assert_allclose(m["mutual_information"], 0.0, atol=1e-6)
    np.testing.assert_allclose(m["uga"], m["entropy"], atol=1e-5)
    np.testing.assert_allclose(m["entropy"], u.binary_entropy(np.float32(0.3)), atol=1e-6)


def test_all_measures_match_single_functions():
    rng = np.random.default_rng(1)
    probs = rng.uniform(0, 1, (5, 8, 8)).astype(np.float32)
    m = u.all_measures(probs)
    np.testing.assert_allclose(m["entropy"], u.predictive_entropy(probs), atol=1e-5)
    np.testing.assert_allclose(m["mutual_information"], u.mutual_information(probs), atol=1e-5)
    np.testing.assert_allclose(m["uga"], u.uga_score(probs), atol=1e-5)
    assert (m["uga"] >= m["entropy"] - 1e-5).all()  # KL >= 0


def test_storage_roundtrip_within_quantisation():
    vals = np.linspace(0, 4, 101, dtype=np.float32)
    back = u.from_uint8(u.to_uint8(vals, "uga"), "uga")
    assert np.abs(back - vals).max() <= 4 / 255 / 2 + 1e-6
    assert u.to_uint8(np.array([9.0]), "uga")[0] == 255  # clipped, not wrapped
