"""Where the training step's time goes: a device trace, summed by kernel and by source line.

  python scripts/profile_step.py --variant base --batches 128 --dtype bfloat16 --out prof/
  python scripts/profile_step.py ... --attention pallas     # with the Pallas kernels (GPU)

For each batch size: compiles the trainer's step (scripts/benchmark.py's setup: Swin,
SMART-IQA head, L1, clipping, AdamW), times it, then traces a few steps with
`jax.profiler` and writes to --out:

  step_b{B}.json       images/s, and the device time summed per kernel, per HLO
                       instruction and per source line of ours (from the optimised HLO's
                       metadata), largest first;
  trace_b{B}.json.gz   the Perfetto trace (open it at ui.perfetto.dev);
  hlo_b{B}.txt.gz      the optimised HLO, to read what each fusion holds.

On a CPU the same summary is made from XLA's worker threads, in thread-ms per step
(with several threads this can exceed the step's wall time, or fall short of it when
threads wait).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (scripts/benchmark.py)


_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_FRAME = re.compile(r'op_name="([^"]*)".*?stack_frame_id=(\d+)')


def _table(hlo_text: str, section: str) -> dict[int, str]:
    """One of the HLO text's numbered tables (FileNames, FileLocations, ...): id -> text."""
    start = hlo_text.find(f'\n{section}\n')
    if start < 0:
        return {}
    rows = {}
    for line in hlo_text[start + len(section) + 2:].splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(' ')
        rows[int(key)] = value.strip().strip('"')
    return rows


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> 'file.py:line function' of the innermost frame of ours, with
    ' [bwd]' where the op comes from differentiation (a fusion carries its root's metadata)."""
    files, functions = _table(hlo_text, 'FileNames'), _table(hlo_text, 'FunctionNames')
    locations = {}
    for key, text in _table(hlo_text, 'FileLocations').items():
        fields = dict(re.findall(r'(\w+)=(\d+)', text))
        locations[key] = (f"{os.path.basename(files.get(int(fields['file_name_id']), '?'))}:"
                          f"{fields['line']} {functions.get(int(fields['function_name_id']), '?')}")
    frames = {key: int(dict(re.findall(r'(\w+)=(\d+)', text))['file_location_id'])
              for key, text in _table(hlo_text, 'StackFrames').items()}
    sources = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        f = m and _FRAME.search(m.group(2))
        if f:
            where = locations.get(frames.get(int(f.group(2)), -1), '?')
            sources[m.group(1)] = where + (' [bwd]' if 'transpose(' in f.group(1) else '')
    return sources


def _instruction(kernel: str, hlo_op: str, sources: dict[str, str]) -> str:
    """The HLO instruction a kernel ran. Inside a CUDA graph the trace's hlo_op names the
    command buffer, and the kernel is named after its fusion ('loop_add_fusion_13' for
    %loop_add_fusion.13); library calls (cuBLAS) keep their own names."""
    for name in (hlo_op, kernel, re.sub(r'_(\d+)$', r'.\1', kernel)):
        if name in sources:
            return name
    return hlo_op or kernel


def device_time(trace: dict, sources: dict[str, str], steps: int) -> dict:
    """Device time in ms per step, summed by kernel, HLO instruction and source line.

    On a GPU, kernels are read from the device's stream lanes only: the trace's derived
    lanes ('XLA Ops', 'XLA Modules') repeat the same time under other names. On a CPU
    (no device lanes) the XLA worker threads run one traced event per HLO instruction;
    their times are summed over the threads (thread-ms, not wall time).
    """
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    processes = {e['pid']: str(e.get('args', {}).get('name', '')) for e in events
                 if e.get('ph') == 'M' and e.get('name') == 'process_name'}
    on_device = any(name.startswith('/device:') for name in processes.values())
    lanes = {(e['pid'], e.get('tid')): str(e.get('args', {}).get('name', ''))
             for e in events if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
    by_lane, by_kernel, by_op, by_line = (collections.Counter() for _ in range(4))
    for e in events:
        if e.get('ph') != 'X' or processes.get(e.get('pid'), '').startswith('/device:') != on_device:
            continue
        ms = e.get('dur', 0.0) / 1e3 / steps
        lane = lanes.get((e['pid'], e.get('tid')), '?')
        op = _instruction(e['name'], str(e.get('args', {}).get('hlo_op', '')), sources)
        if on_device:
            by_lane[lane] += ms
            if not lane.startswith('Stream'):
                continue
        elif op not in sources:     # host events that are not XLA's work
            continue
        else:
            by_lane[lane] += ms
        by_kernel[e['name']] += ms
        by_op[op] += ms
        by_line[sources.get(op, '?')] += ms

    def top(counter, n=80):
        return [[k, round(v, 4)] for k, v in counter.most_common(n)]

    return dict(device_ms_per_step=sum(by_kernel.values()), on_device=on_device,
                by_lane=top(by_lane), by_source_line=top(by_line), by_hlo_op=top(by_op),
                by_kernel=top(by_kernel))


def profile(step, state, data, batch: int, out: str, steps: int, min_seconds: float,
            keep_hlo: bool = True, flop_step=None):
    """flop_step: the same step with XLA's window attention, whose FLOPs XLA counts (it
    leaves a fused kernel's out); None: `step` is that one."""
    lowered = step.lower(state, data)
    flops = benchmark.program_flops((flop_step or step).lower(state, data))
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    stepper = benchmark.Stepper(compiled, state, data)
    seconds = benchmark.timed(stepper.run, min_seconds=min_seconds,
                              calls=benchmark.STEPS_IN_FLIGHT, wait=stepper.wait)
    tmp = tempfile.mkdtemp()
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(steps):     # back to back, as the trainer runs
        stepper.run()
    stepper.wait()
    jax.profiler.stop_trace()
    traces = glob.glob(os.path.join(tmp, '**', 'perfetto_trace.json.gz'), recursive=True)
    hlo = compiled.as_text()
    summary = {}
    if traces:
        shutil.copy(traces[0], os.path.join(out, f'trace_b{batch}.json.gz'))
        with gzip.open(traces[0], 'rt') as f:
            summary = device_time(json.load(f), hlo_sources(hlo), steps)
    if keep_hlo:
        with gzip.open(os.path.join(out, f'hlo_b{batch}.txt.gz'), 'wt') as f:
            f.write(hlo)
    shutil.rmtree(tmp, ignore_errors=True)
    return dict(batch=batch, compile_s=compile_s, step_ms=seconds * 1e3,
                images_per_s=batch / seconds,
                # None where XLA gave no count (jax 0.11 on a GPU, for the train step)
                gflops_per_image=flops / batch / 1e9 if flops else None,
                **summary), stepper.state


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variant', default='base')
    parser.add_argument('--fusion', default='attention')
    parser.add_argument('--batches', nargs='+', type=int, default=[128])
    parser.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
    parser.add_argument('--attention', default='xla', choices=['xla', 'pallas', 'cudnn'],
                        help='Swin window attention implementation (pallas, cudnn: GPUs)')
    parser.add_argument('--steps', type=int, default=3, help='steps in the trace')
    parser.add_argument('--min-seconds', type=float, default=3.0)
    parser.add_argument('--no-hlo', action='store_true', help='do not write the optimised HLO')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    _, mesh, _, _, state, step = benchmark.train_step_setup(args.variant, args.fusion, args.dtype,
                                                            args.attention)
    flop_step = None
    if args.attention != 'xla':
        flop_step = benchmark.graph_train_step(args.variant, args.fusion, args.dtype, state, mesh)
    for batch in args.batches:
        _, _, data = benchmark.train_batch(batch, mesh)
        row, state = profile(step, state, data, batch, args.out, args.steps, args.min_seconds,
                             not args.no_hlo, flop_step)
        row.update(variant=args.variant, dtype=args.dtype, attention=args.attention,
                   device=jax.devices()[0].device_kind, jax=jax.__version__)
        with open(os.path.join(args.out, f'step_b{batch}.json'), 'w') as f:
            json.dump(row, f, indent=1)
        print(f'{args.variant} {args.dtype} batch {batch}: {row["images_per_s"]:.1f} img/s, '
              f'step {row["step_ms"]:.1f} ms, {"device busy" if row.get("on_device") else "XLA threads busy"} '
              f'{row.get("device_ms_per_step", 0):.1f} ms, '
              f'compile {row["compile_s"]:.0f} s', flush=True)
        for line, ms in row.get('by_source_line', [])[:15]:
            print(f'  {ms:8.2f} ms  {line}')


if __name__ == '__main__':
    main()
