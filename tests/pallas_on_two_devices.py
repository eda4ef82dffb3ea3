"""Run by tests/test_window_attention.py in a process of its own, with the CPU split into
2 devices: the Pallas window attention (interpreted) under the data-parallel mesh.

Prints one JSON line: what each kernel call saw (its number of windows, per device when
the kernels run under `shard_map`) and the errors against XLA's attention on one device.
"""

import json

import jax

jax.config.update('jax_num_cpu_devices', 2)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from smartiqa_jax import losses, predict, sharding, train_state  # noqa: E402
from smartiqa_jax.models import swin  # noqa: E402
from smartiqa_jax.models import window_attention_pallas as kernels  # noqa: E402
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA  # noqa: E402

windows_seen = []
_kernel = kernels.window_attention


def recording_kernel(qkv, *args):
    windows_seen.append(qkv.shape[0])
    return _kernel(qkv, *args)


def seen() -> list[int]:
    out = sorted(set(windows_seen))
    windows_seen.clear()
    return out


kernels.window_attention = recording_kernel
mesh = sharding.make_mesh()
rng = np.random.default_rng(0)
report = {'devices': jax.device_count()}

# The attention alone, forward and backward, on a batch of 4 x 4 shifted windows.
b, nw, n, h, d = 4, 4, 49, 2, 8
qkv = jnp.asarray(rng.standard_normal((b, nw, n, 3, h, d)), jnp.float32)
bias = jnp.asarray(rng.standard_normal((h, n, n)), jnp.float32)
mask = jnp.asarray(swin.shifted_window_mask(14, 14, swin.WINDOW, 3))
cotangent = jnp.asarray(rng.standard_normal((b, nw, n, h, d)), jnp.float32)


def pallas(qkv, bias):
    return swin.window_attention_pallas(qkv, bias, mask, d ** -0.5, interpret=True)


def xla(qkv, bias):
    return swin.window_attention_xla(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
                                     bias, mask, d ** -0.5)


def loss(attention, within):
    def f(qkv, bias):
        with sharding.tracing_mesh(within):
            return (attention(qkv, bias) * cotangent).sum()
    return jax.value_and_grad(f, argnums=(0, 1))


got = jax.jit(loss(pallas, mesh))(jax.device_put(qkv, sharding.batch_sharding(mesh)), bias)
want = loss(xla, None)(qkv, bias)
report['attention_windows'] = seen()
report['attention_errors'] = dict(zip(
    ('loss', 'dqkv', 'dbias'),
    (float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)))))

# The trainer's train and eval steps and predict's scorer trace a nano model's kernels on
# each device's part of the batch (lowered only: the interpreted kernels compile slowly).
swin.PALLAS_INTERPRET = True
train_def, eval_def, params = train_state.init_params(
    lambda: SmartIQA(ModelConfig('nano', attention='pallas'), rngs=nnx.Rngs(0)), mesh)
tx = optax.adamw(1e-3)
state = sharding.replicate(train_state.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
    rng=jax.random.PRNGKey(0)), mesh)
images = rng.standard_normal((4, 224, 224, 3)).astype(np.float32)
batch = sharding.shard_batch({'image': images, 'score': np.zeros(4, np.float32)}, mesh)
seen()
train_state.make_train_step(train_def, tx, losses.get_loss('l1'), mesh,
                            jax.tree.map(lambda x: x.sharding, state)).lower(state, batch)
report['train_step_windows'] = seen()
# With each crop's mirror image too: the views go through jax.lax.map, each still split.
train_state.make_eval_step(eval_def, mesh, symmetries=2).lower(state.params, batch['image'])
report['eval_step_windows'] = seen()
scorer = predict.Scorer(nnx.merge(eval_def, params), batch_images=2, crops=2, symmetries=2)
scorer._forward.lower(scorer._graphdef, scorer._mesh, scorer.symmetries, scorer._state,
                      scorer._place(images))
report['scorer_windows'] = seen()
print(json.dumps(report))
