"""Inference throughput of the JAX model against the PyTorch reference, in one run.

  python scripts/benchmark.py                       # tiny and base, batch 8 and 32, fp32
  python scripts/benchmark.py --variants tiny --batches 8 --dtype bfloat16
  python scripts/benchmark.py --train --variants tiny --batches 8    # the training step
  python scripts/benchmark.py --train --variants base --batches 32 64 128 --dtype bfloat16  # GPU
  python scripts/benchmark.py --cpu-devices 2       # the CPU split into 2 data-parallel devices

Prints one row per (variant, batch): images/s for JAX and PyTorch, their ratio, the
model's FLOPs per image (XLA cost analysis) and the share of the machine's matmul peak
(a jitted 2048^3 matmul on a CPU, 8192^3 on a GPU, in the benchmark's dtype) that the
JAX model reaches; on a GPU also the MFU against the card's datasheet dense peak. With
PyTorch it also times PyTorch's own n^3 matmul and states what the goal of 2x the
reference asks: the share of the better of the two matmul rates that the model's FLOPs
at twice PyTorch's images/s would take (over 100%: out of any implementation's reach on
this machine). Same machine, same weights, same inputs. Results go to stdout and, with
--json, to a file that is rewritten after every row (a run cut short keeps what it
measured).

PyTorch runs on the GPU when JAX does. bfloat16 means mixed precision on both sides:
fp32 parameters, bf16 matmuls (JAX: the model's compute dtype; PyTorch: autocast). On
a GPU in fp32, both use TF32 matmuls (JAX's default precision; torch is told to).

JAX's batch is sharded over all its devices (a one-axis mesh, parameters replicated, as
in the trainer). --cpu-devices N first splits the CPU into N devices
(`sharding.set_cpu_devices`), each of which runs its part of the batch on its own thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

# On a GPU, PyTorch runs in the same process: JAX must not take 75% of the card first.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smartiqa_jax import sharding
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA


# Datasheet dense (no sparsity) peaks, FLOP/s, by jax device_kind prefix: bf16, and TF32
# (what fp32 matmuls run in on these cards at JAX's default precision). The longest
# matching prefix wins: 'NVIDIA H100 PCIe' and 'NVIDIA H100 NVL' before the SXM's
# 'NVIDIA H100 80GB HBM3'.
DATASHEET_PEAK = {
    'bfloat16': {'NVIDIA H100': 989e12, 'NVIDIA H100 PCIe': 756e12, 'NVIDIA H100 NVL': 835e12,
                 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12},
    'float32': {'NVIDIA H100': 494.7e12, 'NVIDIA H100 PCIe': 378e12,
                'NVIDIA H100 NVL': 417.5e12, 'NVIDIA H200': 494.7e12, 'NVIDIA A100': 156e12},
}


def datasheet_peak(device, dtype: str = 'bfloat16') -> float | None:
    matches = [prefix for prefix in DATASHEET_PEAK[dtype]
               if device.device_kind.startswith(prefix)]
    return DATASHEET_PEAK[dtype][max(matches, key=len)] if matches else None


def devices_sharing_the_work() -> int:
    """How many times one device's peak the program has: every device of a GPU or TPU
    mesh is its own chip; CPU devices share one machine, whose whole matmul rate the
    measured peak already is."""
    return 1 if jax.devices()[0].platform == 'cpu' else jax.device_count()


def program_flops(lowered) -> float:
    """FLOPs of a lowered program by XLA's HLO cost analysis, before the backend rewrites
    matmuls into library calls (a compiled GPU program's analysis leaves cuBLAS out)."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get('flops', 0.0))


def utilisation(flops: float, batch: int, seconds: float, peak: float, dtype: str) -> dict:
    """FLOPs per image and their rate against the measured (and datasheet) peak of all the
    devices the batch is sharded over; nothing where XLA gave no count (jax 0.11 on a GPU
    gave none for the train step). `flops` is the whole (global) program's; `peak` one
    device's; MFU is against the datasheet peak of `dtype` (TF32 for float32)."""
    if not flops:
        return {}
    devices = devices_sharing_the_work()
    rate = flops / seconds
    row = dict(gflops_per_image=flops / batch / 1e9,
               jax_share_of_matmul_peak=rate / (peak * devices))
    datasheet = datasheet_peak(jax.devices()[0], dtype)
    if datasheet:
        row['jax_mfu'] = rate / (datasheet * devices)
    return row


class Torch:
    """The PyTorch side: device (cuda when JAX runs on a GPU), precision and synchronisation."""

    def __init__(self, dtype: str):
        import torch
        self.torch = torch
        self.device = torch.device('cuda' if jax.devices()[0].platform == 'gpu' else 'cpu')
        self.bf16 = dtype == 'bfloat16'
        if self.device.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True

    def autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.bf16)

    def sync(self):
        if self.device.type == 'cuda':
            self.torch.cuda.synchronize()

    def tensor(self, array: np.ndarray, nchw: bool = False):
        t = self.torch.from_numpy(np.ascontiguousarray(array))
        if nchw:
            t = t.permute(0, 3, 1, 2).contiguous()
        return t.to(self.device)

    def matmul_peak(self, n: int, min_seconds: float = 3.0) -> float:
        """FLOP/s of PyTorch's n^3 matmul in the benchmark's dtype (bf16 operands made once,
        so no cast is timed)."""
        dtype = self.torch.bfloat16 if self.bf16 else self.torch.float32
        a = self.torch.ones((n, n), device=self.device, dtype=dtype)

        def run():
            a @ a
            self.sync()

        run()
        return 2 * n**3 / timed(run, min_seconds=min_seconds)

    def reference(self, variant: str, fusion: str, model: nnx.Module):
        from smartiqa_jax import weights
        from smartiqa_jax.torch_reference import SmartIQATorch
        reference = SmartIQATorch(variant, fusion)
        reference.load_state_dict({k: self.torch.from_numpy(v)
                                   for k, v in weights.export_state_dict(model).items()})
        return reference.to(self.device)


def timed(fn, *, min_seconds: float, min_runs: int = 3, calls: int = 1, wait=None) -> float:
    """Median seconds per call of `fn` (already warmed up), over at least `min_runs` samples.

    A sample is `calls` calls back to back and then `wait()` (when given), divided by
    `calls`: how a training loop runs, dispatching the next step while the device still
    works on the last, so host work per step is hidden as long as the device is slower.
    """
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if wait is not None:
            wait()
        times.append((time.perf_counter() - t) / calls)
    return float(np.median(times))


def matmul_peak(n: int = 2048, dtype=jnp.float32, min_seconds: float = 3.0) -> float:
    """FLOP/s of a jitted n^3 matmul: the machine's practical dense-compute ceiling."""
    a = jnp.ones((n, n), dtype)
    # bf16 accumulates into fp32, as the model's matmuls do (XLA:CPU's AMX path needs it).
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    return 2 * n**3 / timed(lambda: f(a).block_until_ready(), min_seconds=min_seconds)


def jax_forward(variant: str, fusion: str, dtype: str, micro_batch: int | None,
                attention: str = 'xla', abstract: bool = False, mesh=None):
    """(model, state, jitted forward) traced under `mesh`; `abstract`: shapes only, for
    lowering."""
    def build():
        return SmartIQA(ModelConfig(variant, fusion, dtype=dtype, attention=attention),
                        rngs=nnx.Rngs(0))
    model = nnx.eval_shape(build) if abstract else build()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        with sharding.tracing_mesh(mesh):
            return nnx.merge(graphdef, state)(x, micro_batch=micro_batch)['score']

    return model, state, forward


def bench_variant(variant: str, batches: list[int], fusion: str, dtype: str, torch_too: bool,
                  min_seconds: float, peak: float, micro_batch: int | None, report,
                  attentions: tuple[str, ...] = ('xla',)) -> None:
    """Inference images/s for each window-attention implementation in `attentions` (same
    weights: the model is built once, the others only as graphs) and PyTorch's."""
    mesh = sharding.make_mesh()
    model, state, forward = jax_forward(variant, fusion, dtype, micro_batch, attentions[0],
                                        mesh=mesh)
    forwards = {a: forward if a == attentions[0]
                else jax_forward(variant, fusion, dtype, micro_batch, a, True, mesh)[2]
                for a in attentions}
    # FLOPs are counted on the plain program: no lax.map, no fused-attention custom call.
    plain = (forwards['xla'] if 'xla' in forwards and not micro_batch
             else jax_forward(variant, fusion, dtype, None, abstract=True, mesh=mesh)[2])
    side = reference = None
    if torch_too:
        side = Torch(dtype)
        reference = side.reference(variant, fusion, model).eval()
    state = jax.device_put(state, sharding.replicated(mesh))
    for batch in batches:
        images = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
        x = jax.device_put(images, sharding.batch_sharding(mesh))
        # XLA's FLOP count of the plain forward (a lax.map body would be counted only once).
        lowered = {a: fn.lower(state, x) for a, fn in forwards.items()}
        flops = program_flops(lowered['xla'] if plain is forwards.get('xla')
                              else plain.lower(state, x))
        torch_row = {}
        if reference is not None:
            xt = side.tensor(images, nchw=True)

            def run_torch():
                with side.torch.inference_mode(), side.autocast():
                    reference(xt)
                side.sync()

            run_torch()
            torch_row['torch_images_per_s'] = batch / timed(run_torch, min_seconds=min_seconds)
        for attention in forwards:
            compiled = lowered[attention].compile()
            compiled(state, x).block_until_ready()
            seconds = timed(lambda: compiled(state, x).block_until_ready(),
                            min_seconds=min_seconds)
            row = dict(mode='infer', variant=variant, fusion=fusion, dtype=dtype, batch=batch,
                       devices=jax.device_count(), platform=jax.devices()[0].platform,
                       micro_batch=micro_batch, attention=attention,
                       jax_images_per_s=batch / seconds,
                       **utilisation(flops, batch, seconds, peak, dtype), **torch_row)
            report(_with_ratio(row))


def _with_ratio(row: dict) -> dict:
    if 'torch_images_per_s' in row:
        row['jax_over_torch'] = row['jax_images_per_s'] / row['torch_images_per_s']
    return row


def _base_recipe():
    """`base.py`'s config and its optimiser (AdamW in two groups, clipping)."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import base

    from smartiqa_jax import optim
    config = base.get_config()
    tx = optim.make_optimizer(config.optim, optim.make_schedules(
        config.optim, steps_per_epoch=100, num_epochs=config.train.num_epochs))
    return config, tx


def _jitted_step(train_graphdef, tx, mesh, state):
    from smartiqa_jax import losses, train_state
    return train_state.make_train_step(train_graphdef, tx, losses.get_loss('l1'), mesh,
                                       jax.tree.map(lambda x: x.sharding, state))


def train_step_setup(variant: str, fusion: str, dtype: str, attention: str = 'xla'):
    """The trainer's jitted step (forward, backward, clipping, AdamW in two groups; state
    donated) for `base.py`'s optimiser, with its state. Returns (config, mesh, graphdef,
    params, state, step)."""
    from smartiqa_jax import sharding, train_state
    config, tx = _base_recipe()
    mesh = sharding.make_mesh()
    model_config = ModelConfig(variant, fusion, dtype=dtype, attention=attention)
    train_graphdef, _, params = train_state.init_params(
        lambda: SmartIQA(model_config, rngs=nnx.Rngs(0)), mesh)
    state = sharding.replicate(train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0)), mesh)
    return config, mesh, train_graphdef, params, state, _jitted_step(train_graphdef, tx, mesh, state)


def graph_train_step(variant: str, fusion: str, dtype: str, state, mesh, attention: str = 'xla'):
    """The same train step with another window attention (by default XLA's, whose FLOPs
    XLA counts, unlike a fused kernel's): only its graph is built; the parameters and
    optimiser state are the benchmark's."""
    abstract = nnx.eval_shape(lambda: SmartIQA(
        ModelConfig(variant, fusion, dtype=dtype, attention=attention), rngs=nnx.Rngs(0)))
    abstract.train()
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return _jitted_step(graphdef, _base_recipe()[1], mesh, state)


def train_batch(batch: int, mesh):
    """A random (images, scores) batch on the host, and the same batch sharded over `mesh`."""
    from smartiqa_jax import sharding
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, 224, 224, 3)).astype(np.float32)
    scores = rng.uniform(0, 100, batch).astype(np.float32)
    data = jax.device_put({'image': images, 'score': scores}, sharding.batch_sharding(mesh))
    return images, scores, data


# Train steps per timed sample, dispatched back to back as the trainer does (it reads
# the metrics only every log_every_steps), then one wait: per-step host work overlaps
# the device's work on both sides.
STEPS_IN_FLIGHT = 4


class Stepper:
    """Runs a compiled train step on one batch, carrying the (donated) state along.
    `run` dispatches a step without waiting; `wait` waits for the last one. Warmed up."""

    def __init__(self, compiled, state, data):
        self.compiled, self.state, self.data, self.steps = compiled, state, data, 0
        self.run()
        self.wait()
        self.steps = 0   # counts the timed steps only

    def run(self):
        self.state, self.metrics = self.compiled(self.state, self.data)
        self.steps += 1

    def wait(self):
        self.metrics['loss'].block_until_ready()


def bench_train_step(variant: str, batches: list[int], fusion: str, dtype: str,
                     torch_too: bool, min_seconds: float, peak: float, report,
                     attentions: tuple[str, ...] = ('xla',)) -> None:
    """Training images/s: the trainer's jitted step, for each window-attention
    implementation in `attentions` (same weights and optimiser state), against the same
    recipe in PyTorch (L1 loss, SPEC 2)."""
    config, mesh, train_graphdef, params, state, step = train_step_setup(variant, fusion, dtype,
                                                                         attentions[0])
    steps = {a: step if a == attentions[0]
             else graph_train_step(variant, fusion, dtype, state, mesh, a) for a in attentions}
    flop_step = steps.get('xla') or graph_train_step(variant, fusion, dtype, state, mesh)
    torch_step = None
    if torch_too:
        side = Torch(dtype)
        torch = side.torch
        reference = side.reference(variant, fusion,
                                   nnx.merge(train_graphdef, jax.device_get(params))).train()
        groups = {'backbone': [], 'head': []}
        for name, p in reference.named_parameters():
            # the released `swin` module (Swin and the lda branches): optim.BACKBONE_MODULES
            groups['backbone' if name.startswith('swin.') else 'head'].append(p)
        opt = torch.optim.AdamW([{'params': groups[g], 'lr': config.optim[g].lr,
                                  'weight_decay': config.optim[g].weight_decay} for g in groups])

        def step_torch(x, y):
            opt.zero_grad(set_to_none=True)
            with side.autocast():
                loss = (reference(x)['score'].float() - y).abs().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), config.optim.grad_clip_norm)
            opt.step()
        torch_step = step_torch

    for batch in batches:
        images, scores, data = train_batch(batch, mesh)
        # Forward, backward and AdamW as XLA counts them (the step's whole program).
        lowered = {a: jitted.lower(state, data) for a, jitted in steps.items()}
        flops = program_flops(lowered['xla'] if flop_step is steps.get('xla')
                              else flop_step.lower(state, data))
        torch_row = {}
        if torch_step is not None:
            x, y = side.tensor(images, nchw=True), side.tensor(scores)
            torch_step(x, y)
            side.sync()
            torch_row['torch_images_per_s'] = batch / timed(
                lambda: torch_step(x, y), min_seconds=min_seconds, calls=STEPS_IN_FLIGHT,
                wait=side.sync)
        for attention in steps:
            t = time.perf_counter()
            compiled = lowered[attention].compile()
            print(f'  compiled the train step ({attention} attention) for batch {batch} in '
                  f'{time.perf_counter() - t:.0f} s', flush=True)
            stepper = Stepper(compiled, state, data)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = timed(stepper.run, min_seconds=min_seconds, calls=STEPS_IN_FLIGHT,
                            wait=stepper.wait)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            state = stepper.state
            row = dict(mode='train', variant=variant, fusion=fusion, dtype=dtype, batch=batch,
                       devices=jax.device_count(), platform=jax.devices()[0].platform,
                       micro_batch=None, attention=attention,
                       jax_images_per_s=batch / seconds,
                       # host memory freshly mapped per step (BENCHMARKS.md, "Page faults")
                       jax_page_faults_per_step=faults / stepper.steps,
                       **utilisation(flops, batch, seconds, peak, dtype), **torch_row)
            report(_with_ratio(row))


def goal_bound(row: dict, best_peak: float) -> dict:
    """What the issues' goal of 2x the PyTorch reference asks of the machine: the share of
    the best matmul rate measured here (JAX's or PyTorch's) that the model's FLOPs at twice
    PyTorch's images/s would take. Above 100% no implementation can reach the goal, since
    a model is never faster than its matmuls run alone."""
    if 'torch_images_per_s' not in row or 'gflops_per_image' not in row:
        return {}
    torch_flops = row['torch_images_per_s'] * row['gflops_per_image'] * 1e9
    return dict(torch_share_of_best_peak=torch_flops / best_peak,
                two_x_torch_share_of_best_peak=2 * torch_flops / best_peak)


def _format_row(row: dict) -> str:
    text = (f"{row.get('mode', 'infer'):>5} {row['variant']:>5} {row['fusion']:>10} {row['dtype']:>8} "
            f"{row.get('attention', 'xla'):>5} "
            f"batch {row['batch']:>3} "
            + (f"on {row['devices']} devices " if row.get('devices', 1) > 1 else '') +
            f"(micro-batch {row['micro_batch'] or '-'}): "
            f"JAX {row['jax_images_per_s']:7.2f} img/s")
    if 'torch_images_per_s' in row:
        text += f", PyTorch {row['torch_images_per_s']:7.2f} img/s, ratio {row['jax_over_torch']:.2f}x"
        if row.get('devices', 1) > 1 and row.get('platform', 'cpu') != 'cpu':
            text += f" (JAX on {row['devices']} devices, PyTorch on 1)"
    if 'gflops_per_image' in row:
        text += (f", {row['gflops_per_image']:.2f} GFLOP/img, "
                 f"{100 * row['jax_share_of_matmul_peak']:.0f}% of matmul peak")
    if 'jax_page_faults_per_step' in row:
        text += f", {row['jax_page_faults_per_step']:,.0f} page faults/step"
    if 'two_x_torch_share_of_best_peak' in row:
        need = row['two_x_torch_share_of_best_peak']
        text += (f"; PyTorch at {100 * row['torch_share_of_best_peak']:.0f}% of the best "
                 f"matmul peak, 2x PyTorch would need {100 * need:.0f}%")
    if 'jax_mfu' in row:
        text += f", MFU {100 * row['jax_mfu']:.0f}% of the datasheet peak"
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variants', nargs='+', default=['tiny', 'base'])
    parser.add_argument('--batches', nargs='+', type=int, default=[8, 32])
    parser.add_argument('--fusion', default='attention')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument('--attention', nargs='+', default=['xla'],
                        choices=['xla', 'cudnn', 'pallas'],
                        help="Swin window attention: XLA's, the Pallas kernels (GPU) or cuDNN's "
                             "fused kernel (GPU, bf16); several are timed in turn, same weights")
    parser.add_argument('--micro-batch', type=int, default=0,
                        help='JAX: run the high-resolution stages this many images at a time '
                             '(0: off); see SwinTransformer.__call__')
    parser.add_argument('--train', action='store_true',
                        help='time the training step (AdamW, L1) instead of inference')
    parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch reference')
    parser.add_argument('--min-seconds', type=float, default=5.0, help='timing window per case')
    parser.add_argument('--json', help='also write the rows to this JSON file')
    parser.add_argument('--cpu-devices', type=int, default=0,
                        help='split the CPU into this many data-parallel JAX devices (0: one)')
    args = parser.parse_args()
    sharding.set_cpu_devices(args.cpu_devices)

    device = jax.devices()[0]
    peak_dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
    n = 8192 if device.platform == 'gpu' else 2048
    peak_seconds = min(3.0, args.min_seconds)
    peak = matmul_peak(dtype=peak_dtype, n=n, min_seconds=peak_seconds)
    torch_peak = None if args.no_torch else Torch(args.dtype).matmul_peak(n, peak_seconds)
    best_peak = max(peak, torch_peak or 0.0)
    print(f'{device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, {platform.machine()}; '
          f'jax {jax.__version__}; matmul peak {peak / 1e9:.0f} GFLOP/s ({args.dtype})'
          + (f', PyTorch {torch_peak / 1e9:.0f}' if torch_peak else ''), flush=True)
    rows = []

    def report(row):
        row.update(goal_bound(row, best_peak))
        rows.append(row)
        print(_format_row(row), flush=True)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump({'device': device.device_kind, 'platform': device.platform,
                           'jax': jax.__version__, 'matmul_peak_flops': peak,
                           'torch_matmul_peak_flops': torch_peak,
                           'dtype': args.dtype, 'rows': rows}, f, indent=1)

    for variant in args.variants:
        if args.train:
            bench_train_step(variant, args.batches, args.fusion, args.dtype, not args.no_torch,
                             args.min_seconds, peak, report, tuple(args.attention))
        else:
            bench_variant(variant, args.batches, args.fusion, args.dtype, not args.no_torch,
                          args.min_seconds, peak, args.micro_batch or None, report,
                          tuple(args.attention))


if __name__ == '__main__':
    main()
