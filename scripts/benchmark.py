"""Inference throughput of the JAX model against the PyTorch reference, in one run.

  python scripts/benchmark.py                       # tiny and base, batch 8 and 32, fp32
  python scripts/benchmark.py --variants tiny --batches 8 --dtype bfloat16
  python scripts/benchmark.py --train --variants tiny --batches 8    # the training step

Prints one row per (variant, batch): images/s for JAX and PyTorch, their ratio, the
model's FLOPs per image (XLA cost analysis) and the share of the machine's matmul peak
(a jitted 2048^3 fp32 matmul) that the JAX model reaches. Same machine, same weights,
same inputs. Results go to stdout and, with --json, to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA


def timed(fn, *, min_seconds: float, min_runs: int = 3) -> float:
    """Median seconds per call of `fn` (already warmed up), over at least `min_runs` calls."""
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(n: int = 2048, dtype=jnp.float32, min_seconds: float = 3.0) -> float:
    """FLOP/s of a jitted n^3 matmul: the machine's practical dense-compute ceiling."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    return 2 * n**3 / timed(lambda: f(a).block_until_ready(), min_seconds=min_seconds)


def jax_forward(variant: str, fusion: str, dtype: str, micro_batch: int | None):
    model = SmartIQA(ModelConfig(variant, fusion, dtype=dtype), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x, micro_batch=micro_batch)['score']

    return model, state, forward


def model_flops(variant: str, fusion: str, dtype: str, state, x) -> float:
    """XLA's FLOP count of the plain forward (a lax.map body would be counted only once)."""
    _, _, plain = jax_forward(variant, fusion, dtype, None)
    cost = plain.lower(state, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get('flops', 0.0))


def bench_variant(variant: str, batches: list[int], fusion: str, dtype: str, torch_too: bool,
                  min_seconds: float, peak: float, micro_batch: int | None) -> list[dict]:
    model, state, forward = jax_forward(variant, fusion, dtype, micro_batch)
    reference = None
    if torch_too:
        import torch

        from smartiqa_jax import weights
        from smartiqa_jax.torch_reference import SmartIQATorch
        reference = SmartIQATorch(variant, fusion).eval()
        reference.load_state_dict({k: torch.from_numpy(v)
                                   for k, v in weights.export_state_dict(model).items()})
    rows = []
    for batch in batches:
        x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 224, 224, 3)), jnp.float32)
        compiled = forward.lower(state, x).compile()
        flops = model_flops(variant, fusion, dtype, state, x) / batch
        compiled(state, x).block_until_ready()
        seconds = timed(lambda: compiled(state, x).block_until_ready(), min_seconds=min_seconds)
        row = dict(variant=variant, fusion=fusion, dtype=dtype, batch=batch, micro_batch=micro_batch,
                   jax_images_per_s=batch / seconds, gflops_per_image=flops / 1e9,
                   jax_share_of_matmul_peak=flops * batch / seconds / peak)
        if reference is not None:
            import torch
            xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
            with torch.inference_mode():
                reference(xt)
                t = timed(lambda: reference(xt), min_seconds=min_seconds)
            row['torch_images_per_s'] = batch / t
            row['jax_over_torch'] = row['jax_images_per_s'] / row['torch_images_per_s']
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def bench_train_step(variant: str, batches: list[int], fusion: str, dtype: str,
                     torch_too: bool, min_seconds: float) -> list[dict]:
    """Training images/s: the trainer's jitted step (forward, backward, clipping, AdamW in
    two groups; state donated) against the same recipe in PyTorch (L1 loss, SPEC 2)."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import base

    from smartiqa_jax import losses, optim, sharding, train_state
    config = base.get_config()
    mesh = sharding.make_mesh()
    model_config = ModelConfig(variant, fusion, dtype=dtype)
    train_graphdef, _, params = train_state.init_params(
        lambda: SmartIQA(model_config, rngs=nnx.Rngs(0)), mesh)
    tx = optim.make_optimizer(config.optim, optim.make_schedules(
        config.optim, steps_per_epoch=100, num_epochs=config.train.num_epochs))
    state = sharding.replicate(train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0)), mesh)
    step = train_state.make_train_step(train_graphdef, tx, losses.get_loss('l1'), mesh,
                                       jax.tree.map(lambda x: x.sharding, state))
    torch_step = None
    if torch_too:
        import torch

        from smartiqa_jax import weights
        from smartiqa_jax.torch_reference import SmartIQATorch
        reference = SmartIQATorch(variant, fusion).train()
        reference.load_state_dict({k: torch.from_numpy(v) for k, v in weights.export_state_dict(
            nnx.merge(train_graphdef, jax.device_get(params))).items()})
        groups = {'backbone': [], 'head': []}
        for name, p in reference.named_parameters():
            groups['backbone' if name.startswith('swin.backbone.') else 'head'].append(p)
        opt = torch.optim.AdamW([{'params': groups[g], 'lr': config.optim[g].lr,
                                  'weight_decay': config.optim[g].weight_decay} for g in groups])

        def step_torch(x, y):
            opt.zero_grad(set_to_none=True)
            loss = (reference(x)['score'] - y).abs().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), config.optim.grad_clip_norm)
            opt.step()
        torch_step = step_torch

    rows = []
    for batch in batches:
        rng = np.random.default_rng(0)
        images = rng.standard_normal((batch, 224, 224, 3)).astype(np.float32)
        scores = rng.uniform(0, 100, batch).astype(np.float32)
        data = jax.device_put({'image': images, 'score': scores}, sharding.batch_sharding(mesh))
        holder = {'state': state}

        def run():
            holder['state'], metrics = step(holder['state'], data)
            metrics['loss'].block_until_ready()

        run()
        seconds = timed(run, min_seconds=min_seconds)
        state = holder['state']
        row = dict(variant=variant, fusion=fusion, dtype=dtype, batch=batch, micro_batch=None,
                   mode='train', jax_images_per_s=batch / seconds)
        if torch_step is not None:
            import torch
            x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
            y = torch.from_numpy(scores)
            torch_step(x, y)
            row['torch_images_per_s'] = batch / timed(lambda: torch_step(x, y),
                                                      min_seconds=min_seconds)
            row['jax_over_torch'] = row['jax_images_per_s'] / row['torch_images_per_s']
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _format_row(row: dict) -> str:
    text = (f"{row.get('mode', 'infer'):>5} {row['variant']:>5} {row['fusion']:>10} {row['dtype']:>8} "
            f"batch {row['batch']:>3} "
            f"(micro-batch {row['micro_batch'] or '-'}): "
            f"JAX {row['jax_images_per_s']:7.2f} img/s")
    if 'torch_images_per_s' in row:
        text += f", PyTorch {row['torch_images_per_s']:7.2f} img/s, ratio {row['jax_over_torch']:.2f}x"
    if 'gflops_per_image' in row:
        text += (f", {row['gflops_per_image']:.2f} GFLOP/img, "
                 f"{100 * row['jax_share_of_matmul_peak']:.0f}% of matmul peak")
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variants', nargs='+', default=['tiny', 'base'])
    parser.add_argument('--batches', nargs='+', type=int, default=[8, 32])
    parser.add_argument('--fusion', default='attention')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--micro-batch', type=int, default=0,
                        help='JAX: run the high-resolution stages this many images at a time '
                             '(0: off); see SwinTransformer.__call__')
    parser.add_argument('--train', action='store_true',
                        help='time the training step (AdamW, L1) instead of inference')
    parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference')
    parser.add_argument('--min-seconds', type=float, default=5.0, help='timing window per case')
    parser.add_argument('--json', help='also write the rows to this JSON file')
    args = parser.parse_args()

    device = jax.devices()[0]
    peak_dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
    peak = matmul_peak(dtype=peak_dtype, n=8192 if device.platform == 'gpu' else 2048)
    print(f'{device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, {platform.machine()}; '
          f'jax {jax.__version__}; matmul peak {peak / 1e9:.0f} GFLOP/s ({args.dtype})', flush=True)
    rows = []
    for variant in args.variants:
        if args.train:
            rows += bench_train_step(variant, args.batches, args.fusion, args.dtype,
                                     not args.no_torch, args.min_seconds)
            continue
        rows += bench_variant(variant, args.batches, args.fusion, args.dtype, not args.no_torch,
                              args.min_seconds, peak, args.micro_batch or None)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': str(device), 'matmul_peak_flops': peak, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
