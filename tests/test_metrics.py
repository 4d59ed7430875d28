"""Metrics of cage_lens.metrics pinned on hand-computable inputs (definitions: docs/metrics.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cage_lens import metrics
from cage_lens.errors import InputError
from cage_lens.generation.methods import eos_id
from cage_lens.testing import random_model



def test_normalised_curve_and_rise_by_hand():
    curve = metrics.normalize_curve([-1.0, -3.0, -2.0, -5.0])
    # (s − s_last)/|s_0 − s_last| = [1, .5, .75, 0] → running min [1, .5, .5, 0]
    assert curve.tolist() == [1.0, 0.5, 0.5, 0.0]
    # trapezoid: (.75 + .5 + .25) / 3 steps
    assert metrics.rise(curve) == pytest.approx(0.5)
    assert metrics.normalize_curve([2.0, 2.0, 2.0]).tolist() == [0.0, 0.0, 0.0]  # no effect: no NaN
    assert metrics.normalize_curve([0.0, 1.0, -4.0]).tolist() == [1.0, 1.0, 0.0]  # clipped to [0, 1]


def test_density_mas_and_rise_ap_by_hand():
    scores = [3.0, -1.0, 0.0]  # removal order: 0 (3), 2 (0), 1 (−1); |mass| 3, 0, 1 of 4
    assert metrics.ranking(scores) == [0, 2, 1]
    assert metrics.attribution_density(scores).tolist() == [1.0, 0.25, 0.25, 0.0]
    curve = [1.0, 0.5, 0.5, 0.0]  # + |curve − density| = [1, .75, .75, 0]
    assert metrics.rise_ap(curve, scores) == pytest.approx(2 / 3)
    assert metrics.mas(curve, scores) == pytest.approx(2 / 3)  # already in [0, 1]
    # min–max scaling matters: curve + penalty = [1, 2, 2, 0] → [.5, 1, 1, 0]
    assert metrics.rise_ap([1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0]) == pytest.approx(1.5)
    assert metrics.mas([1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0]) == pytest.approx(0.75)
    assert metrics.attribution_density([0.0, 0.0]).tolist() == [1.0, 0.5, 0.0]


def test_deletion_logprobs_match_manual_ablation():
    model = random_model("gpt2", n_layers=1, dtype=torch.float64)
    prompt = model.to_tokens("the cat sat on the mat .").cpu()
    P = prompt.shape[1]
    tokens = torch.cat([prompt, torch.tensor([[19, 23]])], dim=1)
    spans, scores = [(0, 2), (2, 4), (4, P)], [0.1, 0.5, -1.0]
    s = metrics.deletion_logprobs(model, tokens, P, spans, scores, chunk_size=2)

    def total(seq):
        with torch.no_grad():
            lp = model(seq)[0].double().log_softmax(-1)
        return float(sum(lp[P - 1 + t, int(tokens[0, P + t])] for t in range(2)))

    eos, seq = eos_id(model), tokens.clone()
    expected = [total(seq)]
    for a, b in [(2, 4), (0, 2), (4, P)]:  # most relevant first
        seq[0, a:b] = eos
        expected.append(total(seq))
    assert s.tolist() == pytest.approx(expected, abs=1e-10)  # float64; batched vs one-by-one forwards
    result = metrics.deletion_metrics(model, tokens, P, spans, scores)
    assert result.order == [1, 0, 2] and 0 <= result.rise <= 1 and 0 <= result.mas <= 1
    with pytest.raises(InputError, match="inside the prompt"):
        metrics.deletion_logprobs(model, tokens, P, [(0, P + 1)], [1.0])


def test_attribution_coverage_by_hand():
    scores = [0.5, -0.3, 0.2, 0.0]  # shares of |attribution|: .5, .3, .2, 0
    assert metrics.attribution_coverage(scores, [0, 1]) == {"double": 1.0, "lower": 1.0, "mean": 0.0}
    # K = 3, E = 1/3: double band [1/6, 1/2] holds all three; only .5 exceeds E
    cov = metrics.attribution_coverage(scores, [0, 1, 2])
    assert cov["double"] == 1.0 and cov["lower"] == 1.0 and cov["mean"] == pytest.approx(1 / 3)
    assert metrics.attribution_coverage([0.9, 0.05, 0.05], [1, 2]) == {"double": 0.0, "lower": 0.0, "mean": 0.0}
    assert metrics.attribution_coverage([0.0, 0.0], [0])["double"] == 0.0
    with pytest.raises(InputError):
        metrics.attribution_coverage(scores, [])


def test_precision_at_k_and_auroc_by_hand():
    scores = [0.9, 0.1, 0.8, 0.1]
    assert metrics.precision_at_k(scores, [0, 1]) == 0.5
    assert metrics.precision_at_k(scores, [0, 1], k=3) == pytest.approx(2 / 3)  # 0, 2, then 1 (tie, index order)
    assert metrics.precision_at_k(scores, [1], candidates=[1, 3]) == 1.0  # tie broken by index
    # pos {.9, .1} vs neg {.8, .1}: 1 + 1 + 0 + ½ of 4 pairs
    assert metrics.auroc(scores, [0, 1]) == pytest.approx(0.625)
    with pytest.raises(InputError, match="AUROC"):
        metrics.auroc(scores, [0, 1, 2, 3])


def test_auroc_equals_brute_force_pair_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 4, size=9).astype(float)  # many ties
        truth = rng.choice(9, size=3, replace=False).tolist()
        pairs = [(p, n) for p, n in itertools.product(truth, set(range(9)) - set(truth))]
        brute = sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs) / len(pairs)
        assert metrics.auroc(scores, truth) == pytest.approx(brute)


def test_bootstrap_ci_and_paired_wins():
    assert metrics.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    values = np.arange(10.0)
    mean, lo, hi = metrics.bootstrap_ci(values, n=500, seed=3)
    rng = np.random.default_rng(3)
    means = values[rng.integers(0, 10, size=(500, 10))].mean(1)
    assert mean == 4.5 and (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert lo < mean < hi
    assert metrics.paired_wins([1, 2, 3, 4], [2, 2, 1, 0]) == {"wins": 2, "losses": 1, "ties": 1}
    assert metrics.paired_wins([1, 2, 3, 4], [2, 2, 1, 0], higher_is_better=False) == {"wins": 1, "losses": 2, "ties": 1}
    with pytest.raises(InputError):
        metrics.bootstrap_ci([1.0, float("nan")])
