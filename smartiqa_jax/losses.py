"""Training losses for quality regression (SPEC 2; the paper's Table V).

Table V's five, as the released code computes them: `l1`, `l2`, `plcc` ("SRCC
loss"), `rank` and `pairwise` (fidelity). Two more of ours: `rank_hinge` (a margin
ranking hinge) and `fidelity` (Thurstone fidelity on the label order, with a score
noise in label units), which differ from the released pairwise forms.

Every loss takes the batch's predicted scores and its labels, both (B,) float
on the label scale (KonIQ MOS, 0..100), and returns a scalar. They are pure
functions of arrays: under `jit` with a batch sharded over devices they see
the whole global batch, so the pairwise and correlation losses compare images
across devices exactly as a single-device run would.

`get_loss(name, **params)` maps a config's `train.loss` to one of them.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], jax.Array]

# Keeps the correlation loss finite when a batch's predictions (or labels) are
# all equal, which happens at initialisation with a zero-initialised head.
_EPS = 1e-8


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error, in label units. pred, target: (B,)."""
    return jnp.mean(jnp.abs(pred - target))


def l2_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error, in squared label units. pred, target: (B,)."""
    return jnp.mean(jnp.square(pred - target))


def pearson(x: jax.Array, y: jax.Array) -> jax.Array:
    """Pearson correlation of two (B,) vectors; 0 when either is constant."""
    xc = x - jnp.mean(x)
    yc = y - jnp.mean(y)
    # eps inside the sqrt: sqrt's slope at 0 is infinite and would give NaNs.
    return jnp.sum(xc * yc) / jnp.sqrt(jnp.sum(xc * xc) * jnp.sum(yc * yc) + _EPS)


def plcc_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """1 - Pearson correlation of the batch (the paper's "SRCC loss").

    Invariant to the scale and offset of the predictions, so alone it does not
    pin scores to the label scale; range [0, 2].
    """
    return 1.0 - pearson(pred, target)


def _pair_terms(pred: jax.Array, target: jax.Array):
    """All ordered pairs (i, j): prediction and label differences, (B, B) each."""
    pred_diff = pred[:, None] - pred[None, :]
    target_diff = target[:, None] - target[None, :]
    return pred_diff, target_diff


def _distinct_label_pairs(target_diff: jax.Array) -> jax.Array:
    """(B, B) mask of the pairs i != j whose labels differ (as released: |t_i - t_j| > 1e-6)."""
    return jnp.abs(target_diff) > 1e-6


def _mean_over(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where `mask`; 0 when the mask is empty."""
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def ranking_hinge_loss(pred: jax.Array, target: jax.Array, *,
                       margin: float = 1.0) -> jax.Array:
    """Pairwise margin ranking loss over the batch.

    For each pair whose labels differ, max(0, margin - sign(t_i - t_j) *
    (p_i - p_j)): the better image must score at least `margin` (label units)
    higher. Averaged over such pairs; 0 when all labels are equal.
    """
    pred_diff, target_diff = _pair_terms(pred, target)
    order = jnp.sign(target_diff)
    return _mean_over(jnp.maximum(0.0, margin - order * pred_diff), order != 0)


def released_rank_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """The released code's pairwise rank loss (the paper's Table V "rank").

    For each pair with different labels, max(0, |p_i - p_j| - e_ij (t_i - t_j)) with
    e_ij = +1 when p_i >= p_j, else -1: a pair in the right order costs how much its
    predicted gap exceeds the label gap, a pair in the wrong order both gaps.
    Averaged over those pairs; 0 when every label is equal.
    """
    pred_diff, target_diff = _pair_terms(pred, target)
    e = jnp.where(pred_diff >= 0, 1.0, -1.0)
    loss = jnp.maximum(0.0, jnp.abs(pred_diff) - e * target_diff)
    return _mean_over(loss, _distinct_label_pairs(target_diff))


def released_fidelity_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """The released code's pairwise fidelity loss (the paper's Table V "pairwise").

    Label probability that i beats j: sigmoid(t_i - t_j) (label units); predicted:
    Phi((p_i - p_j) / (sqrt(2) * 0.1)), with Phi(x) taken as sigmoid(1.702 x) as
    released. Per pair 1 - sqrt(p p_hat + 1e-8) - sqrt((1-p)(1-p_hat) + 1e-8),
    averaged over the pairs with different labels; 0 when every label is equal.
    """
    pred_diff, target_diff = _pair_terms(pred, target)
    p = jax.nn.sigmoid(target_diff)
    p_hat = jax.nn.sigmoid(1.702 * pred_diff / (jnp.sqrt(2.0) * 0.1))
    loss = 1.0 - jnp.sqrt(p * p_hat + 1e-8) - jnp.sqrt((1.0 - p) * (1.0 - p_hat) + 1e-8)
    return _mean_over(loss, _distinct_label_pairs(target_diff))


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt with a zero gradient at 0 (plain sqrt's is infinite, giving NaNs)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def fidelity_loss(pred: jax.Array, target: jax.Array, *,
                  scale: float = 10.0) -> jax.Array:
    """Pairwise fidelity loss (Tsai et al. 2007, as used for IQA by UNIQUE).

    Under a Thurstone model the probability that image i beats image j is
    p_hat = Phi((p_i - p_j) / (sqrt(2) * scale)), with `scale` the per-score
    noise in label units (10 on a 0..100 scale keeps the probabilities away
    from saturation). The label probability is 1, 0.5 or 0 from the order of
    the labels. Loss per pair: 1 - sqrt(p p_hat) - sqrt((1-p)(1-p_hat)), mean
    over pairs i != j.
    """
    pred_diff, target_diff = _pair_terms(pred, target)
    p_hat = jax.scipy.stats.norm.cdf(pred_diff / (jnp.sqrt(2.0) * scale))
    p = 0.5 * (1.0 + jnp.sign(target_diff))
    fidelity = _safe_sqrt(p * p_hat) + _safe_sqrt((1.0 - p) * (1.0 - p_hat))
    off_diagonal = 1.0 - jnp.eye(pred.shape[0], dtype=pred.dtype)
    return jnp.sum((1.0 - fidelity) * off_diagonal) / jnp.maximum(jnp.sum(off_diagonal), 1.0)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    'l1': l1_loss,
    'l2': l2_loss,
    'plcc': plcc_loss,
    'rank': released_rank_loss,           # Table V, as released
    'pairwise': released_fidelity_loss,   # Table V, as released
    'rank_hinge': ranking_hinge_loss,     # ours: a margin ranking hinge
    'fidelity': fidelity_loss,            # ours: Thurstone fidelity on the label order
}

# Which keyword parameters each loss takes from the config's `train.loss_params`.
_LOSS_PARAMS = {'rank_hinge': ('margin',), 'fidelity': ('scale',)}


def get_loss(name: str, **params) -> LossFn:
    """The loss called `name` (a key of LOSSES) with its relevant parameters bound.

    Parameters that the chosen loss does not take are ignored, so one config
    block (`margin`, `scale`) serves every loss.
    """
    if name not in LOSSES:
        raise ValueError(f'Unknown loss {name!r}; choose one of {sorted(LOSSES)}.')
    used = {k: params[k] for k in _LOSS_PARAMS.get(name, ()) if k in params}
    return functools.partial(LOSSES[name], **used)
