"""Model size report (the paper's Table IV): parameters per component, FLOPs, speed.

  python scripts/model_size.py                                 # tiny, small, base
  python scripts/model_size.py --variants tiny --batch 32 --fusion multiscale
  python scripts/model_size.py --no-speed                      # counts and FLOPs only
  python scripts/model_size.py --no-speed --no-flops           # counts only: a second or two

Parameters come from the model's nnx.Param state built abstractly (nnx.eval_shape, no
memory or init time), grouped by the first name of each parameter path: the Swin
backbone; the local-distortion branches (lda_convs, lda_fcs); the stage attention
(attention_fc1/2); the hyper network (hyper_convs, weight_convs, bias_fcs, w5_fc, b5_fc,
which generate the target network's weights). The target network itself has no
parameters of its own. FLOPs per image are XLA's cost analysis of the compiled
single-image forward pass (a multiply-add counts 2). images/s: the jitted forward on
`--batch` crops of 224 with random weights, median over repeated calls, on the default
JAX device. Prints a Markdown table; --json also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Optional, Sequence

import numpy as np

# parameter path prefix -> component (every parameter must fall in one)
COMPONENTS = {
    'backbone': 'backbone',
    'lda_convs': 'local distortion', 'lda_fcs': 'local distortion',
    'attention_fc1': 'stage attention', 'attention_fc2': 'stage attention',
    'hyper_convs': 'hyper network', 'weight_convs': 'hyper network', 'bias_fcs': 'hyper network',
    'w5_fc': 'hyper network', 'b5_fc': 'hyper network',
}
COLUMNS = ('backbone', 'local distortion', 'stage attention', 'hyper network')
EXPECTED_M = {'tiny': 29.52, 'small': 50.84, 'base': 89.11}  # SPEC 1.1, attention fusion


def abstract_model(variant: str, fusion: str):
    """The SmartIQA model with jax.ShapeDtypeStruct leaves: shapes without memory."""
    from flax import nnx
    from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
    return nnx.eval_shape(lambda: SmartIQA(ModelConfig(variant, fusion), rngs=nnx.Rngs(0)))


def parameter_counts(model) -> dict[str, int]:
    """Parameters per component (COLUMNS) and 'total', from the nnx.Param state paths."""
    import jax
    from flax import nnx

    counts = dict.fromkeys(COLUMNS, 0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        first = path[0].key if hasattr(path[0], 'key') else str(path[0])
        if first not in COMPONENTS:
            raise ValueError(f'parameter {jax.tree_util.keystr(path)} belongs to no component; '
                             'add its prefix to COMPONENTS')
        counts[COMPONENTS[first]] += int(np.prod(leaf.shape))
    counts['total'] = sum(counts[c] for c in COLUMNS)
    return counts


def _forward(model):
    import jax
    from flax import nnx
    graphdef, state = nnx.split(nnx.view(model, deterministic=True))

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)['score']

    return jax.jit(forward), state


def flops_per_image(model) -> float:
    """XLA's flop count of the eval forward pass on one 224x224 image, on the lowered
    program (a compiled GPU program's count leaves out the matmuls given to cuBLAS)."""
    import jax
    import jax.numpy as jnp
    forward, state = _forward(model)
    image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    cost = forward.lower(state, image).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
        cost = cost[0]
    return float(cost['flops'])


def images_per_second(model, batch: int, min_seconds: float = 2.0) -> float:
    """Throughput of the jitted eval forward on `batch` random crops (random weights)."""
    import jax
    forward, abstract = _forward(model)
    rng = np.random.default_rng(0)
    # Small random weights straight from numpy: same speed as trained ones, no init cost.
    state = jax.tree.map(lambda s: jax.device_put(
        (rng.standard_normal(s.shape) * 0.02).astype(s.dtype)), abstract)
    images = jax.device_put(rng.standard_normal((batch, 224, 224, 3)).astype(np.float32))
    forward(state, images).block_until_ready()  # compile
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        forward(state, images).block_until_ready()
        times.append(time.perf_counter() - t)
    return batch / float(np.median(times))


def format_table(rows: list[dict], batch: int, device: str) -> str:
    """Markdown: params (M) per component, total, SPEC's total, GFLOPs/image, images/s."""
    lines = ['| variant | backbone (M) | local distortion (M) | stage attention (M) | '
             'hyper network (M) | total (M) | SPEC total (M) | GFLOPs / image | '
             f'images/s (batch {batch}, {device}) |',
             '|---|' + '---|' * 8]
    for r in rows:
        c = r['params']
        expected = EXPECTED_M.get(r['variant']) if r['fusion'] == 'attention' else None
        cells = [f'{c[k] / 1e6:.2f}' for k in COLUMNS] + [f'{c["total"] / 1e6:.2f}',
                 '-' if expected is None else f'{expected:.2f}',
                 '-' if r.get('flops') is None else f'{r["flops"] / 1e9:.2f}',
                 '-' if r.get('images_per_s') is None else f'{r["images_per_s"]:.1f}']
        lines.append(f'| {r["variant"]} ({r["fusion"]}) | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from smartiqa_jax.models.smartiqa import FUSIONS
    from smartiqa_jax.models.variants import VARIANTS

    parser = argparse.ArgumentParser(prog='scripts/model_size.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variants', nargs='+', default=['tiny', 'small', 'base'],
                        choices=list(VARIANTS))
    parser.add_argument('--fusion', default='attention', choices=FUSIONS)
    parser.add_argument('--batch', type=int, default=8, help='crops per call for images/s (default 8)')
    parser.add_argument('--no-speed', action='store_true', help='skip the images/s measurement')
    parser.add_argument('--no-flops', action='store_true', help='skip compiling for the FLOP count')
    parser.add_argument('--min-seconds', type=float, default=2.0, help='timing time per variant')
    parser.add_argument('--json', default=None, help='also write the numbers to this file')
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    import jax
    device = jax.devices()[0]
    kind = getattr(device, 'device_kind', '')
    device_name = device.platform.upper() + (f' {kind}' if kind.lower() != device.platform else '')
    rows = []
    for variant in args.variants:
        model = abstract_model(variant, args.fusion)
        row = {'variant': variant, 'fusion': args.fusion, 'params': parameter_counts(model)}
        if not args.no_flops:
            row['flops'] = flops_per_image(model)
        if not args.no_speed:
            row['images_per_s'] = images_per_second(model, args.batch, args.min_seconds)
        rows.append(row)
        print(f'{variant}: {row["params"]["total"] / 1e6:.2f} M parameters', file=sys.stderr)
    table = format_table(rows, args.batch, device_name)
    print(table)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': device_name, 'host': platform.node(), 'batch': args.batch,
                       'rows': rows}, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
