"""scripts/attention_analysis.py (Fig. 6) and scripts/model_size.py (Table IV) produce
their outputs; the cli dispatches to each command."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from smartiqa_jax import checkpoint, cli
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
from tests import test_data_fixtures as fixtures

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts')
FAST = ['--crops', '1', '--crop-mode', 'center', '--batch-size', '4']


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpt')
    out = {}
    for fusion in ('attention', 'multiscale'):
        out[fusion] = str(checkpoint.save_model(
            root / fusion, SmartIQA(ModelConfig('nano', fusion), rngs=nnx.Rngs(0))))
    return out


def test_attention_figure_from_a_dataset(checkpoints, tmp_path, capsys):
    fixtures.make_kadid(str(tmp_path / 'kadid'), refs=10, per_ref=2)
    out = tmp_path / 'fig'
    analysis = _script('attention_analysis')
    status = analysis.main(['--checkpoint', checkpoints['attention'], '--dataset', 'kadid',
                            '--root', str(tmp_path / 'kadid'), '--split', 'all',
                            '--pick', 'lowest,highest', '--count', '2', '--out', str(out), *FAST])
    assert status == 0
    with open(out / 'stage_weights.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['pick'] for r in rows] == ['lowest', 'lowest', 'highest', 'highest']
    labels = [float(r['label']) for r in rows]
    assert labels[0] <= labels[1] <= labels[2] <= labels[3]
    for r in rows:
        assert sum(float(r[f'weight_stage{i}']) for i in range(1, 5)) == pytest.approx(1, abs=1e-5)
    assert len(json.loads((out / 'stage_weights.json').read_text())) == 4
    png = out / 'attention.png'
    assert png.stat().st_size > 10_000
    with Image.open(png) as img:
        assert img.width > 300 and img.height > 300
    assert 'mean stage weights' in capsys.readouterr().out


def test_attention_analysis_refuses_models_without_attention(checkpoints, tmp_path, capsys):
    image = fixtures.write_image(str(tmp_path / 'a.png'))
    analysis = _script('attention_analysis')
    assert analysis.main(['--checkpoint', checkpoints['multiscale'], image,
                          '--out', str(tmp_path / 'o'), *FAST]) == 2
    assert "fusion 'multiscale'" in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()
    # Explicit images work too, without labels.
    assert analysis.main(['--checkpoint', checkpoints['attention'], image,
                          '--out', str(tmp_path / 'p'), *FAST]) == 0
    assert (tmp_path / 'p' / 'attention.png').stat().st_size > 0


def test_size_table_nano_with_speed_and_tiny_params(tmp_path, capsys):
    size = _script('model_size')
    assert size.main(['--variants', 'nano', '--batch', '2', '--min-seconds', '0.2',
                      '--json', str(tmp_path / 'nano.json')]) == 0
    table = capsys.readouterr().out
    row = [line for line in table.splitlines() if line.startswith('| nano')][0]
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert float(cells[7]) > 0 and float(cells[8]) > 0  # GFLOPs/image, images/s
    numbers = json.loads((tmp_path / 'nano.json').read_text())['rows'][0]
    assert numbers['flops'] > 1e8

    assert size.main(['--variants', 'tiny', '--no-speed', '--no-flops']) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| tiny')][0]
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[5] == cells[6] == '29.52'  # total == SPEC's
    assert sum(float(c) for c in cells[1:5]) == pytest.approx(29.52, abs=0.02)


def test_cli_dispatches_and_reports_unknown_commands(capsys, monkeypatch):
    assert cli.main([]) == 2
    assert cli.main(['--help']) == 0
    assert 'predict' in capsys.readouterr().out
    assert cli.main(['frobnicate']) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    seen = {}
    from smartiqa_jax import evaluate, predict
    monkeypatch.setattr(predict, 'main', lambda argv: seen.setdefault('predict', argv) and 1)
    monkeypatch.setattr(evaluate, 'main', lambda argv: seen.setdefault('evaluate', argv) and 0)
    assert cli.main(['predict', '--checkpoint', 'c', 'x.jpg']) == 1
    assert cli.main(['evaluate', '--datasets', 'koniq']) == 0
    assert seen == {'predict': ['--checkpoint', 'c', 'x.jpg'], 'evaluate': ['--datasets', 'koniq']}
    assert cli.main(['convert', '--help']) == 0  # argparse's sys.exit becomes a status
    assert cli.main(['convert', 'to-pytorch']) == 2
    capsys.readouterr()
    # The trainer is an absl app: its --help lists its own flags under `smartiqa train` too.
    argv0 = sys.argv[0]
    assert cli.main(['train', '--help']) == 0
    out = capsys.readouterr().out
    assert all(f in out for f in ('--config:', '--workdir:', '--[no]distributed:')), out
    assert sys.argv[0] == argv0


def _scaled_tanh(x):
    return jnp.tanh(x * 3.0)


def test_profile_summary_puts_device_time_on_our_source_lines():
    """scripts/profile_step.py: kernels of a device trace -> HLO instructions -> lines of ours."""
    profile = _script('profile_step')
    x = jnp.ones((8, 8))
    hlo = jax.jit(jax.grad(lambda x: _scaled_tanh(x).sum())).lower(x).compile().as_text()
    sources = profile.hlo_sources(hlo)
    line = _scaled_tanh.__code__.co_firstlineno + 1
    where = f'test_analysis_scripts.py:{line} _scaled_tanh'
    forward = [op for op, s in sources.items() if s == where]
    backward = [op for op, s in sources.items() if s == where + ' [bwd]']
    assert forward and backward, sorted(set(sources.values()))

    op = forward[0]
    kernel = re.sub(r'\.(\d+)$', r'_\1', op)          # how a CUDA graph's kernel is named
    meta = [{'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
            {'ph': 'M', 'pid': 9, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
            {'ph': 'M', 'pid': 1, 'tid': 5, 'name': 'thread_name', 'args': {'name': 'Stream #5'}},
            {'ph': 'M', 'pid': 1, 'tid': 6, 'name': 'thread_name', 'args': {'name': 'XLA Ops'}}]
    events = [
        {'ph': 'X', 'pid': 1, 'tid': 5, 'ts': 0, 'dur': 3000, 'name': kernel,
         'args': {'hlo_op': 'command_buffer_7'}},
        {'ph': 'X', 'pid': 1, 'tid': 5, 'ts': 4000, 'dur': 1000, 'name': 'nvjet_gemm',
         'args': {'hlo_op': 'custom-call.1'}},
        {'ph': 'X', 'pid': 1, 'tid': 6, 'ts': 0, 'dur': 4000, 'name': op},   # derived lane
        {'ph': 'X', 'pid': 9, 'tid': 1, 'ts': 0, 'dur': 9000, 'name': 'python'},
    ]
    summary = profile.device_time({'traceEvents': meta + events}, sources, steps=2)
    assert summary['device_ms_per_step'] == pytest.approx(2.0)
    assert summary['by_source_line'] == [[where, 1.5], ['?', 0.5]]
    assert summary['by_hlo_op'] == [[op, 1.5], ['custom-call.1', 0.5]]
    assert dict(summary['by_lane']) == {'Stream #5': 2.0, 'XLA Ops': 2.0}

    # A CPU trace: no device lanes; XLA's worker threads name each instruction they run.
    cpu = [{'ph': 'M', 'pid': 9, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
           {'ph': 'M', 'pid': 9, 'tid': 1, 'name': 'thread_name', 'args': {'name': 'tf_XLAEigen/1'}},
           {'ph': 'X', 'pid': 9, 'tid': 1, 'ts': 0, 'dur': 5000, 'name': 'ThunkExecutor::Execute'},
           {'ph': 'X', 'pid': 9, 'tid': 1, 'ts': 0, 'dur': 3000, 'name': op},
           {'ph': 'X', 'pid': 9, 'tid': 1, 'ts': 0, 'dur': 1000, 'name': backward[0]}]
    summary = profile.device_time({'traceEvents': cpu}, sources, steps=1)
    assert not summary['on_device'] and summary['device_ms_per_step'] == pytest.approx(4.0)
    assert summary['by_source_line'] == [[where, 3.0], [where + ' [bwd]', 1.0]]


def test_benchmark_states_what_twice_pytorch_asks_of_the_machine(tmp_path, monkeypatch):
    """scripts/benchmark.py against the PyTorch reference on the CPU: both matmul peaks,
    and per row the share of the better one that 2x PyTorch's images/s would need."""
    bench = _script('benchmark')
    bound = bench.goal_bound({'torch_images_per_s': 10.0, 'gflops_per_image': 20.0}, 400e9)
    assert bound == pytest.approx({'torch_share_of_best_peak': 0.5,
                                   'two_x_torch_share_of_best_peak': 1.0})
    assert bench.goal_bound({'jax_images_per_s': 1.0, 'gflops_per_image': 20.0}, 400e9) == {}

    out = tmp_path / 'bench.json'
    monkeypatch.setattr('sys.argv', ['benchmark.py', '--variants', 'pico', '--batches', '2',
                                     '--min-seconds', '0', '--json', str(out)])
    bench.main()
    report = json.loads(out.read_text())
    (row,) = report['rows']
    assert report['matmul_peak_flops'] > 0 and report['torch_matmul_peak_flops'] > 0
    best = max(report['matmul_peak_flops'], report['torch_matmul_peak_flops'])
    torch_flops = row['torch_images_per_s'] * row['gflops_per_image'] * 1e9
    assert row['gflops_per_image'] > 0.1 and row['jax_images_per_s'] > 0
    assert row['two_x_torch_share_of_best_peak'] == pytest.approx(2 * torch_flops / best)
    assert row['jax_over_torch'] == pytest.approx(
        row['jax_images_per_s'] / row['torch_images_per_s'])

    # The train step: images/s and the page faults per timed step; no bound without PyTorch.
    monkeypatch.setattr('sys.argv', ['benchmark.py', '--train', '--variants', 'pico',
                                     '--batches', '2', '--no-torch', '--min-seconds', '0',
                                     '--json', str(out)])
    bench.main()
    (row,) = json.loads(out.read_text())['rows']
    assert row['mode'] == 'train' and row['jax_images_per_s'] > 0
    assert row['jax_page_faults_per_step'] >= 0 and 'two_x_torch_share_of_best_peak' not in row


def test_benchmark_utilisation_is_over_every_chip_and_the_dtypes_peak(monkeypatch):
    """The FLOPs of a sharded step are the whole batch's: over 8 GPUs they are measured
    against 8 chips' peak, and an fp32 (TF32) step against the TF32 datasheet peak. CPU
    devices share one machine, whose peak the measured one already is."""
    bench = _script('benchmark')

    class Device:
        def __init__(self, platform, kind):
            self.platform, self.device_kind = platform, kind

    gpus = [Device('gpu', 'NVIDIA H100 80GB HBM3')] * 8
    monkeypatch.setattr(bench.jax, 'devices', lambda: gpus)
    monkeypatch.setattr(bench.jax, 'device_count', lambda: len(gpus))
    row = bench.utilisation(8 * 494.7e12, batch=64, seconds=1.0, peak=700e12, dtype='bfloat16')
    assert row['jax_mfu'] == pytest.approx(494.7 / 989)
    assert row['jax_share_of_matmul_peak'] == pytest.approx(494.7 / 700)
    assert bench.utilisation(8 * 494.7e12, 64, 1.0, 700e12, 'float32')['jax_mfu'] == \
        pytest.approx(1.0)
    cpus = [Device('cpu', 'cpu')] * 2
    monkeypatch.setattr(bench.jax, 'devices', lambda: cpus)
    monkeypatch.setattr(bench.jax, 'device_count', lambda: len(cpus))
    row = bench.utilisation(100e9, batch=16, seconds=1.0, peak=200e9, dtype='float32')
    assert row == pytest.approx({'gflops_per_image': 6.25, 'jax_share_of_matmul_peak': 0.5})
    # The PCIe and NVL H100s have lower peaks than the SXM card their names begin like.
    assert [bench.datasheet_peak(Device('gpu', kind)) for kind in (
        'NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H100 NVL', 'NVIDIA H200',
        'Tesla T4')] == [989e12, 756e12, 835e12, 989e12, None]
    row = dict(variant='base', fusion='attention', dtype='bfloat16', batch=64, devices=8,
               platform='gpu', micro_batch=None, jax_images_per_s=800.0,
               torch_images_per_s=200.0, jax_over_torch=4.0)
    assert 'ratio 4.00x (JAX on 8 devices, PyTorch on 1)' in bench._format_row(row)


def test_benchmark_times_several_attention_implementations_on_the_same_weights(
        tmp_path, monkeypatch):
    """`--attention xla pallas`: one row each (Pallas interpreted on this CPU), FLOPs
    counted on XLA's program for both, the same PyTorch figure beside both."""
    from smartiqa_jax.models import swin
    monkeypatch.setattr(swin, 'PALLAS_INTERPRET', True)
    bench = _script('benchmark')
    out = tmp_path / 'bench.json'
    monkeypatch.setattr('sys.argv', ['benchmark.py', '--variants', 'pico', '--batches', '2',
                                     '--attention', 'xla', 'pallas', '--min-seconds', '0',
                                     '--json', str(out)])
    bench.main()
    rows = json.loads(out.read_text())['rows']
    assert [r['attention'] for r in rows] == ['xla', 'pallas']
    assert rows[0]['gflops_per_image'] == rows[1]['gflops_per_image'] > 0.1
    assert rows[0]['torch_images_per_s'] == rows[1]['torch_images_per_s']
    for row in rows:
        assert row['jax_over_torch'] == pytest.approx(
            row['jax_images_per_s'] / row['torch_images_per_s'])


def test_matmul_benchmark_times_the_three_products_of_every_linear(tmp_path):
    """scripts/benchmark_matmul.py: the shapes of every Swin Linear, the three matmuls each
    runs in a train step (checked against NumPy), and totals weighted by block count."""
    bench = _script('benchmark_matmul')
    rows = bench.shapes('tiny', 8)
    assert len(rows) == 16
    assert rows[0] == dict(stage=0, layer='qkv', tokens=8 * 56 * 56, din=96, dout=288, blocks=2)
    assert rows[-1] == dict(stage=3, layer='fc2', tokens=8 * 7 * 7, din=3072, dout=768, blocks=2)

    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s).astype(np.float32) for s in ((10, 3), (3, 4), (10, 4)))
    want = {'forward': x @ w, 'input_grad': dy @ w.T, 'weight_grad': x.T @ dy}
    for kind in bench.KINDS:
        got = bench.products(kind, jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy),
                             jnp.matmul, jnp.transpose)()
        np.testing.assert_allclose(np.asarray(got), want[kind], rtol=1e-5, atol=1e-5)

    out = tmp_path / 'matmul.json'
    sums = bench.main(['--variant', 'pico', '--batch', '1', '--min-seconds', '0',
                       '--json', str(out)])
    report = json.loads(out.read_text())
    assert len(report['rows']) == 16 and report['totals_ms'] == pytest.approx(sums)
    for lib in ('jax', 'torch'):
        for kind in bench.KINDS:
            key = f'{lib}_{kind}_ms'
            assert sums[key] == pytest.approx(sum(r[key] * r['blocks'] for r in report['rows']))
            assert all(r[key] > 0 for r in report['rows'])


def test_ops_benchmark_times_both_versions_alone_and_in_the_train_step(capsys):
    """scripts/benchmark_ops.py: our softmax and GELU against jax.nn's, then the train step
    built with each; the model's own ops are back in place afterwards."""
    from smartiqa_jax.models import swin
    ours = (swin.softmax, swin.gelu)
    results = _script('benchmark_ops').main(['--variant', 'pico', '--batch', '1',
                                             '--window', '0', '--train-step'])
    assert (swin.softmax, swin.gelu) == ours
    assert all(t > 0 for op in ('softmax', 'gelu') for t in results[op])
    assert len(results['train_step']) == 8 and all(r > 0 for r in results['train_step'])
    out = capsys.readouterr().out
    assert 'softmax  (1, 64, 1, 49, 49)' in out and "batch 1, jax.nn's ops: median" in out
