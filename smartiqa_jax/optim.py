"""The optimiser: AdamW with a learning rate and schedule per parameter group.

SPEC 2: the backbone trains at 5e-7 and everything else (the "head": stage
attention, hyper network, score layers) at 10x that, both with cosine annealing to
a floor, weight decay 2e-4 and global-norm clipping at 1. The backbone group is
the released code's `swin` module, whose parameters it hands the backbone rate:
the Swin Transformer and the four local-distortion branches (`swin.lda*`, SPEC
1.6), which sit inside that module.

Every parameter gets a group label from its path (`param_labels`): a path
starting with one of BACKBONE_MODULES is 'backbone', all else 'head'. Unlabelled
parameters are an error, so a renamed module cannot silently fall outside
the optimiser. Gradient clipping runs on the whole gradient before the groups
split, as torch's `clip_grad_norm_` over all parameters does.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

GROUPS = ('backbone', 'head')
# Our modules that make up the released `swin` module: Swin and the local-distortion
# branches (their 1x1 convs and Linears).
BACKBONE_MODULES = ('backbone', 'lda_convs', 'lda_fcs')
# The layers that generate the target network's last weights and bias (w5, b5):
# the score is b5 + w5 . q, so they alone set its scale. `make_optimizer` can
# give them a group of their own ('score', see there).
SCORE_LAYERS = ('w5_fc', 'b5_fc')
Schedule = Callable[[jax.Array], jax.Array]


def _path_names(path) -> tuple[str, ...]:
    """A pytree key path as plain strings: ('backbone', 'layers_0', ...)."""
    names = []
    for key in path:
        for attr in ('key', 'name', 'idx'):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def group_of(path_names: tuple[str, ...], score_group: bool = False) -> str:
    """'backbone' for parameters under BACKBONE_MODULES, else 'head'.

    With `score_group`, the SCORE_LAYERS are 'score' instead of 'head'.
    """
    if score_group and path_names and path_names[0] in SCORE_LAYERS:
        return 'score'
    return 'backbone' if path_names and path_names[0] in BACKBONE_MODULES else 'head'


def param_labels(params, score_group: bool = False) -> Any:
    """A pytree like `params` with each leaf replaced by its group name.

    Raises if any leaf ends up without a label from GROUPS (+ 'score' with
    `score_group`).
    """
    known = GROUPS + ('score',) if score_group else GROUPS
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: group_of(_path_names(path), score_group), params)
    unlabelled = [
        '/'.join(_path_names(path))
        for path, label in jax.tree_util.tree_leaves_with_path(labels)
        if label not in known
    ]
    assert not unlabelled, f'Parameters without an optimiser group: {unlabelled}'
    return labels


def count_by_group(params) -> dict[str, int]:
    """Number of scalar parameters in each group (for the run's log line)."""
    counts = {g: 0 for g in GROUPS}
    for label, leaf in zip(jax.tree_util.tree_leaves(param_labels(params)),
                           jax.tree_util.tree_leaves(params)):
        counts[label] += int(leaf.size)
    return counts


def cosine_schedule(*, base_lr: float, min_lr: float, total_steps: int,
                    warmup_steps: int = 0, steps_per_epoch: int = 1,
                    per_epoch: bool = False) -> Schedule:
    """Linear warmup to `base_lr`, then cosine from `base_lr` to the floor `min_lr`.

    Warmup step i (0-based) uses base_lr * (i + 1) / warmup_steps, so no step
    is wasted at rate 0.

    Cosine as torch's CosineAnnealingLR with eta_min: lr = min_lr + (base_lr -
    min_lr) * (1 + cos(pi * t / T)) / 2. When min_lr > base_lr (the released
    backbone setting) the rate therefore rises; that is what the released code
    does, so it is kept and not "fixed".

    Args:
      base_lr: rate at the end of warmup.
      min_lr: rate at the end of training.
      total_steps: optimiser steps in the whole run.
      warmup_steps: steps of linear warmup (counted in `total_steps`).
      steps_per_epoch: steps in one epoch; used when `per_epoch`.
      per_epoch: hold the cosine rate constant within an epoch, stepping at
        epoch boundaries as a per-epoch torch scheduler does. Warmup is per step;
        after a warmup that ends inside an epoch, the rest of that epoch runs at
        base_lr.

    Returns:
      step (int array) -> learning rate (float32 array).
    """
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if per_epoch:   # the rate at the epoch's first step, also after a part-epoch warmup
            step_or_epoch_start = jnp.floor(step / steps_per_epoch) * steps_per_epoch
        else:
            step_or_epoch_start = step
        t = jnp.maximum(step_or_epoch_start - warmup_steps, 0.0)
        progress = jnp.clip(t / decay_steps, 0.0, 1.0)
        cosine = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        if warmup_steps <= 0:
            return cosine
        warm = base_lr * (step + 1.0) / warmup_steps
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def make_schedules(optim: ml_collections.ConfigDict, *, steps_per_epoch: int,
                   num_epochs: int) -> dict[str, Schedule]:
    """One schedule per group from `config.optim` (see configs/base.py)."""
    total_steps = steps_per_epoch * num_epochs
    warmup_steps = int(round(optim.warmup_epochs * steps_per_epoch))
    per_epoch = {'epoch': True, 'step': False}[optim.schedule_unit]
    return {
        group: cosine_schedule(
            base_lr=optim[group].lr, min_lr=optim[group].min_lr,
            total_steps=total_steps, warmup_steps=warmup_steps,
            steps_per_epoch=steps_per_epoch, per_epoch=per_epoch)
        for group in GROUPS
    }


def make_optimizer(optim: ml_collections.ConfigDict, schedules: Mapping[str, Schedule],
                   *, score_scale: float = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW per group with its schedule and decay.

    Labels come from `param_labels` at `init` time, so the transformation works
    for any parameter pytree whose top-level keys name the model's modules.

    score_scale: c != 1 puts the SCORE_LAYERS in a third group, 'score', with
      the head's rate times c and its weight decay divided by c. Together with
      those layers' initial weights multiplied by c (the trainer's
      `model.score_scale='label_std'`), that is AdamW on the reparameterisation
      w = c * theta: what training on labels divided by c would do (Adam's
      step does not depend on the gradient's scale; only eps and the global
      norm that clipping sees differ), while the parameters, and so every
      checkpoint and export, stay in label units. 1: two groups, as released.
    """
    groups = GROUPS
    lr = dict(schedules)
    decay = {group: optim[group].weight_decay for group in GROUPS}
    if score_scale != 1.0:
        groups = GROUPS + ('score',)
        head = schedules['head']
        lr['score'] = lambda step: score_scale * head(step)
        decay['score'] = optim.head.weight_decay / score_scale
    per_group = {
        group: optax.adamw(
            learning_rate=lr[group],
            b1=optim.b1, b2=optim.b2, eps=optim.eps,
            weight_decay=decay[group])
        for group in groups
    }
    parts = []
    if optim.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(optax.partition(
        per_group, functools.partial(param_labels, score_group=score_scale != 1.0)))
    return optax.chain(*parts)
