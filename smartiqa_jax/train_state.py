"""The training state and the jitted train and eval steps (pure functions).

The model is split once into a static graph and its parameters
(`nnx.split(model, nnx.Param)`); the steps rebuild it with `nnx.merge` inside
`jit`, so the state that crosses the jit boundary is a plain pytree of arrays:
the parameters as a pure nested dict (`nnx.to_pure_dict`), the optax state,
the step and the run's base RNG key. Pure dicts, not `nnx.State`: every step
flattens its input state and rebuilds its output in Python, and with
Swin-Base's ~1100 leaves wrapped in `nnx.Variable`s that took ~16 ms of host
time a step (12 ms of an 83 ms step on an H200 went by before the GPU
started), against ~0.5 ms for dicts of arrays. Train and
eval use two graph definitions (NNX keeps `deterministic` as a static
attribute), taken from the model after `model.train()` / `model.eval()`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import optax
from flax import nnx

from smartiqa_jax import sharding
from smartiqa_jax.models import smartiqa


@flax.struct.dataclass
class TrainState:
    """Everything the train step reads and writes.

    step: int32 scalar, optimiser steps taken. params: the model's nnx.Param
    as a pure nested dict of arrays. opt_state: optax state for `params`. rng: uint32 (2,)
    base key; the step's dropout key is `fold_in(rng, step)`, so the random
    stream depends only on the step number and a resumed run draws exactly
    what an uninterrupted one would.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def make_train_step(train_graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    mesh: jax.sharding.Mesh, state_sharding: Any):
    """A jitted `(state, batch) -> (state, metrics)`; `state` is donated.

    batch: {'image': (B, 224, 224, 3) float32 NHWC, 'score': (B,) float32
    labels}, a global batch sharded over the mesh's 'data' axis. metrics:
    {'loss': scalar, 'grad_norm': scalar (global norm before clipping), 'param_norm':
    scalar (global norm of the updated parameters: inf or NaN once they diverge, as a
    square over 3.4e38 overflows float32)}.
    """

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(state.rng, state.step)

        def loss_of(params):
            model = nnx.merge(train_graphdef, params)
            with sharding.tracing_mesh(mesh):
                scores = model(batch['image'], rngs=nnx.Rngs(dropout=key))['score']
            return loss_fn(scores, batch['score'])

        loss, grads = jax.value_and_grad(loss_of)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads),
                           'param_norm': optax.tree.norm(params)}

    replicated = sharding.replicated(mesh)
    metrics_sharding = dict.fromkeys(('loss', 'grad_norm', 'param_norm'), replicated)
    return jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_sharding, metrics_sharding))


def make_eval_step(eval_graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, symmetries: int = 1):
    """A jitted `(params, images) -> scores`: (B, 224, 224, 3) -> (B,), sharded like the batch.

    symmetries: each crop's score is the mean over that many of its symmetries
    (`smartiqa.symmetric_views`: 1 the crop, 2 with its mirror image, 4 rotations, 8 all).
    """

    def step_fn(params, images):
        with sharding.tracing_mesh(mesh):
            model = nnx.merge(eval_graphdef, params)
            return smartiqa.mean_over_symmetries(lambda x: model(x)['score'], images,
                                                 symmetries)

    return jax.jit(step_fn, out_shardings=sharding.batch_sharding(mesh))


def init_params(build_model: Callable[[], nnx.Module], mesh: jax.sharding.Mesh):
    """Builds the model and returns (train_graphdef, eval_graphdef, params).

    params is a pure nested dict of arrays (`nnx.to_pure_dict`); `nnx.merge`
    with either graph definition takes it as it is.

    The initialisers run inside one jit whose outputs are replicated over the
    mesh: one compilation instead of one per parameter, and every process
    computes the same values without any transfer.
    """
    abstract = nnx.eval_shape(build_model)
    abstract.eval()
    eval_graphdef, _ = nnx.split(abstract, nnx.Param)
    abstract.train()
    train_graphdef, _ = nnx.split(abstract, nnx.Param)

    def create():
        return nnx.to_pure_dict(nnx.state(build_model(), nnx.Param))

    params = jax.jit(create, out_shardings=sharding.replicated(mesh))()
    return train_graphdef, eval_graphdef, params
