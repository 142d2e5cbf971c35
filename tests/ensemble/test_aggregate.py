"""Aggregation functions: pure numpy, checked against their definitions and their properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from carclf.ensemble import aggregate as agg
from carclf.errors import InvalidInput


def _rows(rng, members, batch, classes):
    logits = rng.normal(size=(members, batch, classes)) * 3
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


def test_each_method_matches_its_definition_element_by_element():
    rng = np.random.default_rng(0)
    probs = _rows(rng, 3, 4, 5)
    w = np.array([0.5, 1.0, 2.5])
    wn = w / w.sum()
    for b in range(4):
        for c in range(5):
            assert agg.mean(probs)[b, c] == pytest.approx(sum(probs[m, b, c] for m in range(3)) / 3, rel=1e-6)
            assert agg.weighted_mean(probs, w)[b, c] == pytest.approx(
                sum(wn[m] * probs[m, b, c] for m in range(3)), rel=1e-6)
        geo = [math.prod(probs[m, b, c] ** wn[m] for m in range(3)) for c in range(5)]
        assert agg.geometric_mean(probs, w)[b] == pytest.approx(np.array(geo) / sum(geo), rel=1e-5)


probabilities = st.integers(1, 4).flatmap(lambda m: st.integers(1, 3).flatmap(lambda b: st.integers(2, 6).flatmap(
    lambda c: arrays(np.float64, (m, b, c), elements=st.floats(0.01, 1.0)))))


@settings(max_examples=60, deadline=None)
@given(raw=probabilities, data=st.data())
def test_properties(raw, data):
    probs = raw / raw.sum(-1, keepdims=True)
    m = probs.shape[0]
    w = np.array(data.draw(st.lists(st.floats(0.1, 10.0), min_size=m, max_size=m)))
    for method in agg.AGGREGATORS:
        out = agg.aggregate(method, probs, w)
        assert out.shape == probs.shape[1:] and out.dtype == np.float32
        np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
        # scaling all weights changes nothing
        np.testing.assert_allclose(agg.aggregate(method, probs, w * 7.0), out, rtol=1e-5, atol=1e-7)
        # identical members: the ensemble is that member
        same = np.repeat(probs[:1], m, axis=0)
        np.testing.assert_allclose(agg.aggregate(method, same, w), probs[0], rtol=1e-5, atol=1e-6)
    # equal weights: weighted mean is the mean
    np.testing.assert_allclose(agg.weighted_mean(probs, np.ones(m)), agg.mean(probs), rtol=1e-6)
    # the weighted mean lies between the members, class by class
    out = agg.weighted_mean(probs, w)
    assert np.all(out >= probs.min(0) - 1e-6) and np.all(out <= probs.max(0) + 1e-6)


def test_geometric_mean_punishes_disagreement_more_than_mean():
    probs = np.array([[[0.9, 0.1]], [[0.02, 0.98]], [[0.6, 0.4]]])
    # class 0 gets 0.507 on average, but one member nearly vetoes it
    assert agg.mean(probs)[0, 0] > 0.5
    assert agg.geometric_mean(probs)[0, 0] < agg.mean(probs)[0, 0]


def test_hard_zero_does_not_veto_everything():
    probs = np.array([[[0.0, 1.0]], [[1.0, 0.0]]])
    out = agg.geometric_mean(probs)
    assert np.all(np.isfinite(out)) and out[0] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("probs,weights,match", [
    (np.ones((2, 3)), None, "members, batch, classes"),
    (np.ones((0, 1, 3)), None, "no member"),
    (np.ones((2, 1, 3)), [1.0], "1 weights for 2 members"),
    (np.ones((2, 1, 3)), [1.0, -1.0], "weights must be"),
    (np.ones((2, 1, 3)), [0.0, 0.0], "weights must be"),
    (np.ones((2, 1, 3)), [float("nan"), 1.0], "weights must be"),
])
def test_bad_arguments(probs, weights, match):
    with pytest.raises(InvalidInput, match=match):
        agg.weighted_mean(probs, weights)


def test_unknown_method():
    with pytest.raises(InvalidInput, match="median"):
        agg.aggregate("median", np.ones((1, 1, 2)) / 2)


def test_top_k_orders_best_first_and_breaks_ties_by_class_id():
    probs = np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]])
    ids, p = agg.top_k(probs, 3)
    assert ids.tolist() == [[1, 3, 0], [0, 1, 2]]
    np.testing.assert_allclose(p, np.take_along_axis(probs, ids, 1))
    assert agg.top_k(probs, 99)[0].shape == (2, 4)


def test_fit_weights_prefers_the_informative_member():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=200)
    good = np.full((200, 4), 0.1)
    good[np.arange(200), y] = 0.7
    noise = _rows(rng, 1, 200, 4)[0]
    w = agg.fit_weights(np.stack([noise, good]), y)
    assert w.sum() == pytest.approx(1.0) and w[1] > w[0] > 0
    assert agg.fit_weights(np.stack([noise, good]), y).tolist() == w.tolist()  # deterministic
    # two identical members: the tie resolves to equal weights
    assert agg.fit_weights(np.stack([good, good]), y).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("method", ["weighted_mean", "geometric_mean"])
def test_weights_whose_sum_overflows_share_the_vote_as_their_ratios_say(method):
    """Each weight finite, their sum not: the normalised weights read 0 and the answer was all zeros."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=(2, 5))
    np.testing.assert_allclose(agg.aggregate(method, probs, [1e308, 1e308]), agg.aggregate(method, probs, [1, 1]),
                               rtol=1e-6)
    np.testing.assert_allclose(agg.aggregate(method, probs, [1e308, 5e307]), agg.aggregate(method, probs, [2, 1]),
                               rtol=1e-6)
