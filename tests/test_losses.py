"""Losses: values on hand-checked cases, gradients finite, invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartiqa_jax import losses


def test_l1_and_l2_values():
    pred = jnp.array([1.0, 2.0, 4.0])
    target = jnp.array([1.0, 4.0, 1.0])
    assert losses.l1_loss(pred, target) == pytest.approx(5.0 / 3)
    assert losses.l2_loss(pred, target) == pytest.approx(13.0 / 3)


def test_plcc_loss_matches_numpy_and_ignores_affine_maps():
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 100, 16).astype(np.float32)
    pred = (target + rng.normal(0, 20, 16)).astype(np.float32)
    expected = 1 - np.corrcoef(pred, target)[0, 1]
    assert losses.plcc_loss(pred, target) == pytest.approx(expected, abs=1e-5)
    assert losses.plcc_loss(3 * pred + 7, target) == pytest.approx(expected, abs=1e-5)
    assert losses.plcc_loss(target, target) == pytest.approx(0.0, abs=1e-6)


def test_plcc_loss_is_finite_for_constant_predictions():
    target = jnp.array([1.0, 2.0, 3.0])
    value, grad = jax.value_and_grad(losses.plcc_loss)(jnp.zeros(3), target)
    assert value == pytest.approx(1.0)
    assert np.all(np.isfinite(grad))


def test_ranking_hinge_counts_only_ordered_pairs():
    target = jnp.array([10.0, 20.0, 20.0])
    # Pairs with different labels: (0,1), (0,2) and their mirrors. Pred order is
    # right for (0,1) by a margin of 5 and wrong for (0,2) by 1.
    pred = jnp.array([0.0, 5.0, -1.0])
    loss = losses.ranking_hinge_loss(pred, target, margin=1.0)
    # (0,1): max(0, 1 - 5) = 0; (0,2): max(0, 1 - (-1)*(-1)...) -> 1 + 1 = 2.
    assert loss == pytest.approx((0 + 2 + 0 + 2) / 4)
    assert losses.ranking_hinge_loss(pred, jnp.full(3, 7.0)) == 0.0


def test_fidelity_loss_small_when_order_is_right_and_grad_finite():
    target = jnp.array([10.0, 50.0, 90.0, 50.0])
    right = jnp.array([0.0, 100.0, 200.0, 100.0])
    wrong = -right
    good = losses.fidelity_loss(right, target)
    bad = losses.fidelity_loss(wrong, target)
    assert 0.0 <= good < 0.1 < bad <= 1.0
    grad = jax.grad(losses.fidelity_loss)(right, target)
    assert np.all(np.isfinite(grad))


def _released_pairwise(pred, target, per_pair):
    """Mean of per_pair(dp, dt) over the ordered pairs i != j with distinct labels (loops)."""
    values = [per_pair(pi - pj, ti - tj)
              for i, (pi, ti) in enumerate(zip(pred, target))
              for j, (pj, tj) in enumerate(zip(pred, target))
              if i != j and abs(ti - tj) > 1e-6]
    return np.mean(values) if values else 0.0


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))     # = 1 / (1 + exp(-x)), without overflow


def test_table_v_pairwise_losses_are_the_released_formulas():
    rng = np.random.default_rng(0)
    target = np.round(rng.uniform(0, 100, 12), 0)
    target[3] = target[7]                                  # a tie: left out
    pred = target + rng.normal(0, 15, 12)
    pred[5] = pred[2]                                      # equal predictions: e = +1

    def rank(dp, dt):
        return max(0.0, abs(dp) - (1.0 if dp >= 0 else -1.0) * dt)

    def fidelity(dp, dt):
        p, q = _sigmoid(dt), _sigmoid(1.702 * dp / (np.sqrt(2) * 0.1))
        return 1 - np.sqrt(p * q + 1e-8) - np.sqrt((1 - p) * (1 - q) + 1e-8)

    for name, per_pair in (('rank', rank), ('pairwise', fidelity)):
        for scale in (1.0, 0.02):          # also small gaps, where the sigmoids do not saturate
            p, t = pred * scale, target * scale
            got = losses.get_loss(name)(jnp.asarray(p, jnp.float32), jnp.asarray(t, jnp.float32))
            assert got == pytest.approx(_released_pairwise(p, t, per_pair), rel=1e-4, abs=1e-6)
        # One image, or all labels equal: no pair to compare, loss 0 and a finite gradient.
        for p, t in ((jnp.ones(1), jnp.ones(1)), (jnp.arange(4.0), jnp.full(4, 3.0))):
            value, grad = jax.value_and_grad(losses.get_loss(name))(p, t)
            assert value == 0.0 and np.all(np.isfinite(grad))


def test_every_loss_is_finite_on_a_batch_of_one():
    for name in losses.LOSSES:
        value, grad = jax.value_and_grad(losses.get_loss(name))(jnp.ones(1), jnp.full(1, 5.0))
        assert np.isfinite(value) and np.all(np.isfinite(grad)), name


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_every_loss_decreases_under_gradient_descent(name):
    target = jnp.array([10.0, 30.0, 50.0, 70.0, 90.0])
    loss_fn = losses.get_loss(name, margin=1.0, scale=10.0)
    pred = jnp.array([50.0, 40.0, 60.0, 45.0, 55.0])
    if name == 'pairwise':
        # Its predicted probabilities saturate beyond gaps of ~0.5 (released sigma 0.1):
        # a start with every prediction close, as from a fresh head.
        pred = 50.0 + 0.01 * (pred - 50.0)
    start = loss_fn(pred, target)
    step = {'l2': 0.1, 'plcc': 100.0, 'pairwise': 0.01}.get(name, 10.0)
    for _ in range(20):
        pred = pred - step * jax.grad(loss_fn)(pred, target)
    assert loss_fn(pred, target) < start


def test_get_loss_rejects_unknown_names():
    with pytest.raises(ValueError, match='Unknown loss'):
        losses.get_loss('srcc')
