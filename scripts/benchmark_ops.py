"""The model's own softmax and exact GELU against jax.nn's, alone and in the train step.

  python scripts/benchmark_ops.py --variant pico --batch 8
  python scripts/benchmark_ops.py --variant pico --batch 16 --cpu-devices 2 --train-step

`swin.softmax` (the xla window attention's, with its backward written out) and
`swin.gelu` (PyTorch's formula, x/2 * (1 + erf(x/sqrt 2))) replace jax.nn.softmax and
jax.nn.gelu(approximate=False). For each op: milliseconds of forward + backward (one
jitted value-and-grad) on the variant's largest tensor for that op at this batch (stage
0's attention logits; stage 0's MLP hidden layer), both versions in the same process.

--train-step: the trainer's whole step (scripts/benchmark.py's setup) built once with
jax.nn's ops and once with ours, timed in alternating windows in one process, so that
this VM's drift (10-40% between runs) falls on both alike; prints the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROUNDS = 8
LABEL = {'jax.nn': "jax.nn's ops", 'ours': 'our ops'}


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variant', default='pico')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--cpu-devices', type=int, default=0,
                        help='split the CPU into this many XLA devices (as train.cpu_devices)')
    parser.add_argument('--train-step', action='store_true',
                        help='also time the whole train step both ways')
    parser.add_argument('--window', type=float, default=3.0, help='seconds per timed window')
    return parser.parse_args(argv)


def main(argv=None):
    """Prints the timings; returns {op: (jax.nn ms, our ms)}, with 'train_step': the
    per-round ratios of our step's images/s to jax.nn's, under --train-step."""
    args = _parse(argv)
    if args.cpu_devices > 1:
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform'
                                   f'_device_count={args.cpu_devices}')
    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import benchmark  # noqa: E402  (scripts/benchmark.py)
    from smartiqa_jax.models import swin
    from smartiqa_jax.models.variants import VARIANTS

    theirs = {'softmax': lambda x: jax.nn.softmax(x, axis=-1),
              'gelu': lambda x: jax.nn.gelu(x, approximate=False)}
    ours = {'softmax': swin.softmax, 'gelu': swin.gelu}
    v = VARIANTS[args.variant]
    side = 224 // swin.PATCH
    windows = (side // swin.WINDOW) ** 2
    n = swin.WINDOW ** 2
    shapes = {'softmax': (args.batch, windows, v.num_heads[0], n, n),
              'gelu': (args.batch * side * side, 4 * v.embed_dim)}
    print(f'{jax.devices()[0].platform}, {jax.device_count()} device(s); jax {jax.__version__}')
    results = {}
    for op, shape in shapes.items():
        x = jax.random.normal(jax.random.key(0), shape) * 3
        g = jax.random.normal(jax.random.key(1), shape)
        row = {}
        for who, f in (('jax.nn', theirs[op]), ('ours', ours[op])):
            value_and_grad = jax.jit(jax.value_and_grad(lambda x, f=f: (f(x) * g).sum()))
            jax.block_until_ready(value_and_grad(x))
            row[who] = 1e3 * benchmark.timed(lambda: jax.block_until_ready(value_and_grad(x)),
                                             min_seconds=args.window, min_runs=10)
        print(f'{op:8s} {shape}: forward + backward jax.nn {row["jax.nn"]:.2f} ms, ours '
              f'{row["ours"]:.2f} ms ({row["jax.nn"] / row["ours"]:.2f}x)')
        results[op] = (row['jax.nn'], row['ours'])
    if args.train_step:
        results['train_step'] = _train_step(args, benchmark, swin, theirs, ours)
    return results


def _train_step(args, benchmark, swin, theirs, ours):
    import jax
    _, mesh, graphdef, _, state, _ = benchmark.train_step_setup(args.variant, 'attention',
                                                                'float32')
    _, _, data = benchmark.train_batch(args.batch, mesh)
    steppers = {}
    try:
        for who, ops in (('jax.nn', theirs), ('ours', ours)):
            swin.softmax, swin.gelu = ops['softmax'], ops['gelu']   # read when it is traced
            t = time.perf_counter()
            compiled = benchmark._jitted_step(graphdef, benchmark._base_recipe()[1], mesh,
                                              state).lower(state, data).compile()
            print(f'  compiled the train step with {LABEL[who]} in '
                  f'{time.perf_counter() - t:.0f} s')
            steppers[who] = benchmark.Stepper(compiled, jax.tree.map(lambda x: x.copy(), state),
                                              data)
    finally:
        swin.softmax, swin.gelu = ours['softmax'], ours['gelu']
    rates = {who: [] for who in steppers}
    for r in range(ROUNDS):
        for who in (list(steppers) if r % 2 == 0 else list(steppers)[::-1]):
            s = steppers[who]
            seconds = benchmark.timed(s.run, min_seconds=args.window,
                                      calls=benchmark.STEPS_IN_FLIGHT, wait=s.wait)
            rates[who].append(args.batch / seconds)
    for who, r in rates.items():
        print(f'train step {args.variant} batch {args.batch}, {LABEL[who]}: median '
              f'{np.median(r):.2f} img/s ({" ".join(f"{x:.1f}" for x in r)})')
    ratios = np.array(rates['ours']) / np.array(rates['jax.nn'])
    print(f'ours / jax.nn per round: {" ".join(f"{x:.3f}" for x in ratios)}; '
          f'median {np.median(ratios):.3f}')
    return ratios


if __name__ == '__main__':
    main()
