"""Metrics agree with scipy and handle degenerate inputs."""

import math

import numpy as np
import pytest
import scipy.stats

from smartiqa_jax.metrics import quality_metrics


def test_metrics_match_scipy():
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 100, 50)
    pred = target + rng.normal(0, 15, 50)
    m = quality_metrics(pred, target)
    assert m['srcc'] == pytest.approx(scipy.stats.spearmanr(pred, target)[0])
    assert m['plcc'] == pytest.approx(scipy.stats.pearsonr(pred, target)[0])
    assert m['krcc'] == pytest.approx(scipy.stats.kendalltau(pred, target)[0])
    assert m['rmse'] == pytest.approx(np.sqrt(np.mean((pred - target) ** 2)))


def test_perfect_and_reversed_order():
    target = np.arange(10.0)
    assert quality_metrics(target, target)['srcc'] == pytest.approx(1.0)
    assert quality_metrics(-target, target)['krcc'] == pytest.approx(-1.0)


def test_constant_predictions_give_nan_correlations():
    m = quality_metrics(np.ones(5), np.arange(5.0))
    assert math.isnan(m['srcc']) and math.isnan(m['plcc'])
    assert m['rmse'] == pytest.approx(np.sqrt(np.mean((1 - np.arange(5.0)) ** 2)))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        quality_metrics(np.ones(3), np.ones(4))
