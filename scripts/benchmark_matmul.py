"""The Swin blocks' matmuls alone, forward and both backward products: JAX against PyTorch.

  python scripts/benchmark_matmul.py --variant tiny --batch 8

A train step's Linear layers (qkv, proj, fc1, fc2 of every block) each run three
matmuls: the forward y = x W, the input gradient dx = dy W^T and the weight gradient
dW = x^T dy, which contracts the long token axis (batch x tokens of the stage). This
times each of them at the variant's shapes, jitted in JAX and as `torch.matmul` on the
same machine, fp32, and sums them over the model's blocks (each shape times the number
of blocks that have it), so the share of a train step's matmul time that each kind
takes, and where JAX loses it, can be read off. With --json the rows are written too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from smartiqa_jax.models.variants import get_variant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (scripts/benchmark.py: the shared timer)

KINDS = ('forward', 'input_grad', 'weight_grad')
LAYERS = {'qkv': (1, 3), 'proj': (1, 1), 'fc1': (1, 4), 'fc2': (4, 1)}   # (in, out) x C


def _median_seconds(fn, min_seconds: float) -> float:
    fn()   # compile / warm up
    return benchmark.timed(fn, min_seconds=min_seconds, min_runs=5)


def shapes(variant: str, batch: int) -> list[dict]:
    """(tokens, in, out) of every Linear of every Swin block, with the blocks that share it."""
    v = get_variant(variant)
    rows = []
    for stage, (dim, depth) in enumerate(zip(v.stage_dims, v.depths)):
        tokens = batch * (56 // 2**stage) ** 2
        for layer, (a, b) in LAYERS.items():
            rows.append(dict(stage=stage, layer=layer, tokens=tokens, din=a * dim, dout=b * dim,
                             blocks=depth))
    return rows


def products(kind: str, x, w, dy, matmul, transpose):
    """The three matmuls of a Linear, written the same way for both libraries."""
    if kind == 'forward':
        return lambda: matmul(x, w)
    if kind == 'input_grad':
        return lambda: matmul(dy, transpose(w))
    return lambda: matmul(transpose(x), dy)


def measure(row: dict, min_seconds: float, torch=None) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((row['tokens'], row['din']), np.float32)
    w = rng.standard_normal((row['din'], row['dout']), np.float32)
    dy = rng.standard_normal((row['tokens'], row['dout']), np.float32)
    flops = 2 * row['tokens'] * row['din'] * row['dout']
    jx, jw, jdy = map(jnp.asarray, (x, w, dy))
    out = dict(row, gflop=flops / 1e9)
    for kind in KINDS:
        fn = jax.jit(lambda x, w, dy, kind=kind: products(kind, x, w, dy, jnp.matmul, jnp.transpose)())
        out[f'jax_{kind}_ms'] = 1e3 * _median_seconds(
            lambda: fn(jx, jw, jdy).block_until_ready(), min_seconds)
        if torch is not None:
            tx, tw, tdy = map(torch.from_numpy, (x, w, dy))
            run = products(kind, tx, tw, tdy, torch.matmul, lambda t: t.T)
            out[f'torch_{kind}_ms'] = 1e3 * _median_seconds(run, min_seconds)
    return out


def totals(rows: list[dict]) -> dict:
    """Milliseconds per kind summed over the model's blocks, for each library measured."""
    sums = {}
    for lib in ('jax', 'torch'):
        for kind in KINDS:
            key = f'{lib}_{kind}_ms'
            if all(key in r for r in rows):
                sums[key] = sum(r[key] * r['blocks'] for r in rows)
    return sums


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variant', default='tiny')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--min-seconds', type=float, default=1.0, help='timing window per case')
    parser.add_argument('--no-torch', action='store_true', help='skip PyTorch')
    parser.add_argument('--json', help='also write the rows and totals to this JSON file')
    args = parser.parse_args(argv)
    if jax.devices()[0].platform != 'cpu' and not args.no_torch:
        # PyTorch's side runs on the host's CPU; against JAX on an accelerator it compares
        # nothing.
        parser.error(f"a CPU benchmark: JAX's device here is {jax.devices()[0].platform}; "
                     'run it with JAX_PLATFORMS=cpu, or pass --no-torch')
    torch = None
    if not args.no_torch:
        import torch
    print(f'{args.variant}, batch {args.batch}, fp32, {jax.devices()[0].platform}; '
          'ms per call (JAX / PyTorch)', flush=True)
    rows = []
    for row in shapes(args.variant, args.batch):
        row = measure(row, args.min_seconds, torch)
        rows.append(row)
        cells = []
        for kind in KINDS:
            cell = f"{kind} {row[f'jax_{kind}_ms']:7.2f}"
            if torch is not None:
                cell += f" / {row[f'torch_{kind}_ms']:7.2f}"
            cells.append(cell)
        print(f"stage {row['stage']} {row['layer']:>4} {row['tokens']:>6}x{row['din']:<5}"
              f"->{row['dout']:<5} x{row['blocks']:<2} " + ' | '.join(cells), flush=True)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump({'variant': args.variant, 'batch': args.batch, 'rows': rows,
                           'totals_ms': totals(rows)}, f, indent=1)
    sums = totals(rows)
    print('all blocks: ' + ', '.join(f'{k[:-3]} {v:.0f} ms' for k, v in sums.items()))
    return sums


if __name__ == '__main__':
    main()
