"""Swin window attention alone, forward + backward: XLA's, the Pallas kernels, cuDNN's.

  python scripts/benchmark_attention.py --variant base --batch 128                 # GPU
  python scripts/benchmark_attention.py --variant tiny --batch 8 --impls xla fused-xla  # CPU check

For every stage of the variant (and, where the stage shifts, with the shift mask) it
times one jitted forward + backward of the attention between the qkv projection and
the output projection (gradients for qkv and the relative position bias), as the
train step runs it, and checks each implementation against XLA in fp32: the largest
error of the output and of each gradient, relative to the largest reference value.
With --json the rows are written as they come (a run cut short keeps them).

Implementations: 'xla' (the model's default), 'pallas' (`window_attention_pallas`, one
Triton kernel per direction), 'cudnn' (`window_attention_fused`, the 49 tokens padded to
50), 'cudnn64' (padded to 64); 'fused-xla' and 'pallas-interpret' run the cuDNN layout
through XLA and the Pallas kernels in interpret mode, to check them on any machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from smartiqa_jax.models import swin
from smartiqa_jax.models import window_attention_pallas as kernels
from smartiqa_jax.models.variants import get_variant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (scripts/benchmark.py: the shared timer)


def _split(attention, **kwargs):
    """An implementation taking q, k and v as one (B, nW, N, 3, heads, d) array."""
    def run(qkv, bias, mask, scale):
        return attention(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], bias, mask,
                         scale, **kwargs)
    return run


IMPLS = {
    'xla': _split(swin.window_attention_xla),
    'cudnn': _split(swin.window_attention_fused),
    'cudnn64': _split(swin.window_attention_fused, tokens=64),
    'fused-xla': _split(swin.window_attention_fused, implementation='xla'),
    'pallas': swin.window_attention_pallas,
    'pallas-interpret': functools.partial(swin.window_attention_pallas, interpret=True),
}


def loss_and_grads(impl, mask, scale):
    """Forward and backward from the qkv projection's output to the output projection's
    input, as in the model; gradients for qkv and the bias."""
    def loss(qkv, bias, cotangent):
        out = impl(qkv, bias, mask, scale)
        return (out.astype(jnp.float32) * cotangent).sum(), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@contextlib.contextmanager
def implementation(impl: str):
    """Yields IMPLS[impl]; for 'pallas:wN' / 'pallas:warpsN', the Pallas kernels with at
    most N windows per program / N warps. Those settings are read when a call is traced,
    forward and backward, so trace (call once) inside the `with`."""
    if ':' not in impl:
        yield IMPLS[impl]
        return
    setting = impl.split(':')[1]
    name = 'NUM_WARPS' if setting.startswith('warps') else 'MAX_WINDOWS_PER_PROGRAM'
    saved = getattr(kernels, name)
    setattr(kernels, name, int(setting.removeprefix('warps').removeprefix('w')))
    try:
        yield IMPLS['pallas' if jax.default_backend() == 'gpu' else 'pallas-interpret']
    finally:
        setattr(kernels, name, saved)


def relative_error(x, reference) -> float:
    x, reference = np.asarray(x, np.float32), np.asarray(reference, np.float32)
    return float(np.abs(x - reference).max() / max(np.abs(reference).max(), 1e-30))


def median_seconds(fn, min_seconds: float) -> float:
    fn()   # compile / warm up
    return benchmark.timed(lambda: jax.block_until_ready(fn()), min_seconds=min_seconds,
                           min_runs=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variant', default='base')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
    parser.add_argument('--impls', nargs='+', default=['xla', 'pallas', 'cudnn'],
                        choices=sorted(IMPLS))
    parser.add_argument('--min-seconds', type=float, default=1.0)
    parser.add_argument('--pallas-windows', nargs='+', type=int, default=[],
                        help='also time pallas with at most these windows per program')
    parser.add_argument('--pallas-warps', nargs='+', type=int, default=[],
                        help='also time pallas with these warps per program')
    parser.add_argument('--json', help='also write the rows to this JSON file')
    args = parser.parse_args()

    impls = list(args.impls)
    for windows in args.pallas_windows:
        impls.append(f'pallas:w{windows}')
    for warps in args.pallas_warps:
        impls.append(f'pallas:warps{warps}')
    variant = get_variant(args.variant)
    dtype = jnp.dtype(args.dtype)
    print(f'{jax.devices()[0].device_kind}; jax {jax.__version__}; {args.variant}, '
          f'batch {args.batch}, {args.dtype}', flush=True)
    rows, totals = [], {impl: 0.0 for impl in impls}
    rng = np.random.default_rng(0)
    for stage in range(4):
        side = 56 >> stage
        nw, heads = max(side // swin.WINDOW, 1) ** 2, variant.num_heads[stage]
        d = variant.stage_dims[stage] // heads
        blocks = variant.depths[stage]
        shifted_blocks = blocks // 2 if side > swin.WINDOW else 0
        for shifted, count in ((False, blocks - shifted_blocks), (True, shifted_blocks)):
            if not count:
                continue
            mask = (jnp.asarray(swin.shifted_window_mask(side, side, swin.WINDOW, swin.WINDOW // 2))
                    if shifted else None)
            shape = (args.batch, nw, swin.WINDOW ** 2, heads, d)
            qkv = jnp.asarray(rng.standard_normal(shape[:3] + (3,) + shape[3:]), jnp.float32)
            g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
            bias = jnp.asarray(0.02 * rng.standard_normal((heads, 49, 49)), jnp.float32)
            scale = d ** -0.5
            (_, ref_out), ref_grads = loss_and_grads(IMPLS['xla'], mask, scale)(qkv, bias, g)
            qkv_c = qkv.astype(dtype)
            row = dict(stage=stage, shifted=shifted, blocks=count, shape=list(shape))
            for impl in impls:
                try:
                    with implementation(impl) as attention:
                        fn = loss_and_grads(attention, mask, scale)
                        (_, out), grads = fn(qkv_c, bias, g)
                    seconds = median_seconds(lambda: fn(qkv_c, bias, g), args.min_seconds)
                except Exception as e:  # noqa: BLE001 - report and go on to the next case
                    row[impl] = dict(error=f'{type(e).__name__}: {str(e)[:2000]}')
                    print(f'stage {stage} shifted={shifted} {impl}: {row[impl]["error"]}', flush=True)
                    totals[impl] = float('nan')
                    continue
                errors = [relative_error(out, ref_out)] + [relative_error(a, b)
                                                           for a, b in zip(grads, ref_grads)]
                row[impl] = dict(ms=1e3 * seconds, errors=errors)
                totals[impl] += count * seconds
                print(f'stage {stage} shifted={shifted!s:5} x{count:2} {impl:>9}: '
                      f'{1e3 * seconds:7.3f} ms; relative error out/dqkv/dbias '
                      + ' '.join(f'{e:.1e}' for e in errors), flush=True)
            rows.append(row)
            if args.json:
                write_json(args, rows, totals)
    print('per train step (all blocks): '
          + ', '.join(f'{impl} {1e3 * t:.1f} ms' for impl, t in totals.items()), flush=True)


def write_json(args, rows, totals):
    with open(args.json, 'w') as f:
        json.dump({'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
                   'variant': args.variant, 'batch': args.batch, 'dtype': args.dtype,
                   'rows': rows, 'total_ms': {k: 1e3 * v for k, v in totals.items()}},
                  f, indent=1)


if __name__ == '__main__':
    main()
