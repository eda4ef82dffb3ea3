"""Parameter initialisers that match the released PyTorch model's init (SPEC 1.5b).

Each initialiser samples on the host with NumPy when given a concrete key, and with
jax.random when traced (inside jit or eval_shape). Eager jax.random would compile one
small XLA program per parameter shape: about a minute to build a Swin-Base model on a
2-core CPU, against a second with NumPy. The host stream is seeded from the key, so a
given `nnx.Rngs` seed always gives the same model when built the same way; a model built
eagerly and one built under jit (as the trainer's `train_state.init_params` does) from
the same seed draw from different streams, and differ.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]


def _fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear kernel (in, out) or a Conv kernel (kh, kw, in, out)."""
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return shape[-2] * receptive, shape[-1] * receptive


def _host_rng(key: jax.Array) -> np.random.Generator | None:
    try:
        data = np.asarray(jax.random.key_data(key))
    except jax.errors.TracerArrayConversionError:
        return None
    return np.random.default_rng(data.astype(np.uint64).ravel().tolist())


def _make(host: Callable[[np.random.Generator, tuple], np.ndarray],
          device: Callable[[jax.Array, tuple, jnp.dtype], jax.Array]) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        shape = tuple(shape)
        rng = _host_rng(key)
        if rng is None:
            return device(key, shape, dtype)
        return jnp.asarray(host(rng, shape), dtype)
    return init


def normal(std: float) -> Initializer:
    """N(0, std^2). timm's trunc_normal_(std=.02) cuts at +-2 absolute, i.e. 100 std: plain normal."""
    return _make(lambda rng, s: rng.standard_normal(s) * std,
                 lambda k, s, d: jax.random.normal(k, s, d) * std)


def kaiming_normal() -> Initializer:
    """PyTorch's kaiming_normal_ (fan-in, gain sqrt 2): N(0, 2 / fan_in)."""
    def std(s):
        return np.sqrt(2.0 / _fans(s)[0])
    return _make(lambda rng, s: rng.standard_normal(s) * std(s),
                 lambda k, s, d: jax.random.normal(k, s, d) * std(s))


def torch_default_kernel() -> Initializer:
    """PyTorch's default Linear/Conv weight init (kaiming_uniform, a=sqrt 5): U(+-1/sqrt(fan_in))."""
    def bound(s):
        return 1.0 / np.sqrt(_fans(s)[0])
    return _make(lambda rng, s: rng.uniform(-bound(s), bound(s), s),
                 lambda k, s, d: jax.random.uniform(k, s, d, -bound(s), bound(s)))


def torch_default_bias(fan_in: int) -> Initializer:
    """PyTorch's default bias init: U(+-1/sqrt(fan_in)) of the layer's weight fan-in."""
    bound = 1.0 / np.sqrt(fan_in)
    return _make(lambda rng, s: rng.uniform(-bound, bound, s),
                 lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound))


def constant(value: float) -> Initializer:
    # NumPy, not jnp.full: an eager jnp op would compile a program per shape.
    return lambda key, shape, dtype=jnp.float32: jnp.asarray(np.full(tuple(shape), value), dtype)


zeros = constant(0.0)
ones = constant(1.0)
