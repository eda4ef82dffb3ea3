"""Swin window attention as one Pallas (Triton) kernel per direction, for GPUs.

XLA writes window attention as two batched matmuls around a softmax, so every 49x49
score tile goes to GPU memory and back, forward and backward. Here one program takes
`G` windows of one head, and everything between reading q, k, v (and the output's
gradient) and writing the output (and q, k, v's gradients) stays on chip. The relative
position bias gradient is summed over the program's windows on chip too, and over the
programs by XLA.

Layout: `qkv` is the qkv projection reshaped, as it comes, to (windows, 64, 3*heads, d)
with the 49 tokens of a window padded to 64 (Triton tiles are powers of two); q, k, v
of head j are column blocks j, heads + j and 2*heads + j. Padded keys are masked out by
the bias (its padded columns hold a large negative number) and padded queries' outputs
are dropped by the caller, whose zero cotangent then gives them zero gradients.

Run on a CPU with `interpret=True` (the tests do).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TILE = 64  # tokens per window after padding
# Launch settings, read when a call is traced (scripts/benchmark_attention.py sweeps them):
# at most this many windows per program, and warps per program.
MAX_WINDOWS_PER_PROGRAM = 16
NUM_WARPS = 4


def windows_per_program(num_windows: int, limit: int | None = None) -> int:
    """The largest power of two up to `limit` (MAX_WINDOWS_PER_PROGRAM) that divides
    the number of windows."""
    limit = limit or MAX_WINDOWS_PER_PROGRAM
    g = 1
    while g < limit and num_windows % (2 * g) == 0:
        g *= 2
    return g


def _scores(q, k, bias, mask_ref, window, scale):
    s = plgpu.dot(q, k.T) * scale + bias
    if mask_ref is not None:
        s = s + mask_ref[window % mask_ref.shape[0]]
    p = jnp.exp(s - jnp.max(s, axis=-1)[:, None])
    return p / jnp.sum(p, axis=-1)[:, None]


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, *refs, scale, group, has_mask):
    mask_ref = refs[0] if has_mask else None
    o_ref = refs[-1]
    first = pl.program_id(0) * group
    bias = bias_ref[...]

    def body(g, carry):
        v = v_ref[g]
        p = _scores(q_ref[g], k_ref[g], bias, mask_ref, first + g, scale)
        o_ref[g] = plgpu.dot(p.astype(v.dtype), v).astype(o_ref.dtype)
        return carry

    jax.lax.fori_loop(0, group, body, 0)


def _backward_kernel(q_ref, k_ref, v_ref, bias_ref, *refs, scale, group, has_mask):
    mask_ref = refs[0] if has_mask else None
    do_ref, dq_ref, dk_ref, dv_ref, dbias_ref = refs[-5:]
    first = pl.program_id(0) * group
    bias = bias_ref[...]

    def body(g, dbias):
        q, k, v, do = q_ref[g], k_ref[g], v_ref[g], do_ref[g]
        p = _scores(q, k, bias, mask_ref, first + g, scale)
        dv_ref[g] = plgpu.dot(p.astype(do.dtype).T, do).astype(dv_ref.dtype)
        dp = plgpu.dot(do, v.T)
        ds = p * (dp - jnp.sum(p * dp, axis=-1)[:, None])
        ds_c = ds.astype(q.dtype)
        dq_ref[g] = (plgpu.dot(ds_c, k) * scale).astype(dq_ref.dtype)
        dk_ref[g] = (plgpu.dot(ds_c.T, q) * scale).astype(dk_ref.dtype)
        return dbias + ds

    dbias_ref[...] = jax.lax.fori_loop(0, group, body, jnp.zeros((TILE, TILE), jnp.float32))


def _launch(kernel, qkv, bias, mask, scale, interpret, *, inputs, outputs: int,
            bias_gradient: bool = False):
    """Runs `kernel` over a (window groups, heads) grid; returns its outputs as a list.

    Its inputs are q, k, v (column blocks of `qkv`), the head's bias, the mask if any,
    then `inputs` (arrays shaped like the output, (windows, 64, heads, d)); its outputs
    are `outputs` such arrays, then with `bias_gradient` the bias gradient summed over
    each program's windows, (programs along windows, heads, 64, 64) fp32.
    """
    windows, tokens, three_heads, d = qkv.shape
    heads = three_heads // 3
    group = windows_per_program(windows)

    def head_block(offset=0):   # G windows x 64 tokens x d of head `offset + j`
        return pl.BlockSpec((group, TILE, None, d), lambda i, j: (i, 0, offset + j, 0))

    in_specs = [head_block(0), head_block(heads), head_block(2 * heads),
                pl.BlockSpec((None, TILE, TILE), lambda i, j: (j, 0, 0))]
    args = [qkv, qkv, qkv, bias]
    if mask is not None:   # the whole (windows per image, 64, 64) mask, indexed in the kernel
        in_specs.append(pl.BlockSpec(mask.shape, lambda i, j: (0, 0, 0)))
        args.append(mask)
    in_specs += [head_block() for _ in inputs]
    per_head = jax.ShapeDtypeStruct((windows, tokens, heads, d), qkv.dtype)
    out_specs, out_shape = [head_block()] * outputs, [per_head] * outputs
    if bias_gradient:
        out_specs.append(pl.BlockSpec((None, None, TILE, TILE), lambda i, j: (i, j, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((windows // group, heads, TILE, TILE),
                                              jnp.float32))
    return pl.pallas_call(
        functools.partial(kernel, scale=scale, group=group, has_mask=mask is not None),
        grid=(windows // group, heads), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, name=kernel.__name__.strip('_'),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
    )(*args, *inputs)


def _forward(qkv, bias, mask, scale, interpret):
    (out,) = _launch(_forward_kernel, qkv, bias, mask, scale, interpret, inputs=(), outputs=1)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def window_attention(qkv, bias, mask, scale: float, interpret: bool = False):
    """Softmax attention inside each window, fused.

    qkv: (windows, 64, 3*heads, d) in the compute dtype, tokens padded to 64; bias:
    (heads, 64, 64) fp32, padded key columns a large negative number; mask:
    (windows_per_image, 64, 64) fp32 additive shift mask or None (window w takes mask
    w % windows_per_image). Returns (windows, 64, heads, d); rows 49..63 are padding.
    """
    return _forward(qkv, bias, mask, scale, interpret)


def _window_attention_fwd(qkv, bias, mask, scale, interpret):
    return _forward(qkv, bias, mask, scale, interpret), (qkv, bias, mask)


def _window_attention_bwd(scale, interpret, residuals, do):
    qkv, bias, mask = residuals
    dq, dk, dv, dbias = _launch(_backward_kernel, qkv, bias, mask, scale, interpret,
                                inputs=(do.astype(qkv.dtype),), outputs=3, bias_gradient=True)
    dqkv = jnp.concatenate([dq, dk, dv], axis=2)
    dmask = None if mask is None else jnp.zeros_like(mask)
    return dqkv, dbias.sum(axis=0), dmask


window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)
