"""The window attention implementations compute what the plain XLA one computes.

The fused ones run on a CPU here: the cuDNN layout through `jax.nn.dot_product_attention`
with implementation='xla', the Pallas kernels in interpret mode. What is checked is
everything of ours around and inside the kernels: padding, layouts, the shift mask per
window, grouping windows per program, and the gradients (the bias table's included).
"""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smartiqa_jax import checkpoint
from smartiqa_jax.models import swin
from smartiqa_jax.models import window_attention_pallas as kernels
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA


def fused_on_cpu(q, k, v, bias, mask, scale):
    return swin.window_attention_fused(q, k, v, bias, mask, scale, implementation='xla')


def pallas_interpreted(q, k, v, bias, mask, scale):
    return swin.window_attention_pallas(jnp.stack([q, k, v], axis=3), bias, mask, scale,
                                        interpret=True)


def test_softmax_with_its_written_backward_is_jax_nn_softmax():
    """`swin.softmax` (the xla attention's, with a hand-written backward) against
    jax.nn.softmax: values and gradients, with the shift mask's -100s and logits far
    beyond exp's range."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 4, 49, 49)).astype(np.float32) * 5
    logits[0] += swin.shifted_window_mask(14, 14, 7, 3)
    logits[1, 0] *= 1000.0
    weights = jnp.asarray(rng.standard_normal(logits.shape), jnp.float32)

    def loss(f):
        return lambda x: (f(x) * weights).sum()

    np.testing.assert_allclose(swin.softmax(logits), jax.nn.softmax(logits, axis=-1),
                               atol=1e-6, rtol=1e-5)
    got = jax.jit(jax.grad(loss(swin.softmax)))(logits)
    want = jax.jit(jax.grad(loss(lambda x: jax.nn.softmax(x, axis=-1))))(logits)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('implementation', [fused_on_cpu, pallas_interpreted])
@pytest.mark.parametrize('batch,side,shift', [(3, 14, False), (3, 14, True), (2, 21, True),
                                              (5, 7, False)])
def test_attention_matches_xla_with_gradients(implementation, batch, side, shift):
    heads, d = 3, 16
    windows = (side // swin.WINDOW) ** 2
    rng = np.random.default_rng(side + shift)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, windows, 49, heads, d)), jnp.float32)
               for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((heads, 49, 49)), jnp.float32)
    mask = jnp.asarray(swin.shifted_window_mask(side, side, swin.WINDOW, 3)) if shift else None
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(attention):
        return lambda *args: (attention(*args, mask, d ** -0.5) * cotangent).sum()

    expected = swin.window_attention_xla(q, k, v, bias, mask, d ** -0.5)
    np.testing.assert_allclose(implementation(q, k, v, bias, mask, d ** -0.5), expected,
                               atol=1e-5, rtol=1e-5)
    want = jax.grad(loss(swin.window_attention_xla), argnums=(0, 1, 2, 3))(q, k, v, bias)
    got = jax.grad(loss(implementation), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for name, a, b in zip(('dq', 'dk', 'dv', 'dbias'), got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5, err_msg=name)
    # The shift mask matters here: without it the answer would differ.
    if shift:
        unmasked = swin.window_attention_xla(q, k, v, bias, None, d ** -0.5)
        assert float(jnp.abs(unmasked - expected).max()) > 0.1


def test_windows_per_program():
    assert [kernels.windows_per_program(n) for n in (1, 3, 12, 64, 8192, 96)] == [1, 1, 4, 16, 16, 16]


@pytest.mark.parametrize('attention', ['pallas', 'cudnn'])
def test_model_with_fused_attention_matches_xla(monkeypatch, attention):
    monkeypatch.setattr(swin, 'PALLAS_INTERPRET', True)
    monkeypatch.setattr(swin, 'FUSED_IMPLEMENTATION', 'xla')
    dtype = 'bfloat16' if attention == 'cudnn' else 'float32'
    crops = jnp.asarray(np.random.default_rng(0).standard_normal((2, 224, 224, 3)), jnp.float32)
    reference = SmartIQA(ModelConfig('nano', dtype=dtype), rngs=nnx.Rngs(0))
    fused = SmartIQA(ModelConfig('nano', dtype=dtype, attention=attention), rngs=nnx.Rngs(0))
    # Same parameters: the implementation is not part of the model's state.
    assert jax.tree.structure(nnx.state(fused)) == jax.tree.structure(nnx.state(reference))
    nnx.update(fused, nnx.state(reference))
    want, got = reference.predict(crops), fused.predict(crops)
    # bf16 (cuDNN's case) adds its bias in bf16, the plain path in fp32.
    tolerance = 1e-4 if dtype == 'float32' else 2e-2
    np.testing.assert_allclose(got['score'], want['score'], atol=tolerance * 100, rtol=tolerance)
    np.testing.assert_allclose(got['stage_weights'], want['stage_weights'], atol=tolerance)


def test_config_validation_and_load_leaves_the_implementation_to_auto(tmp_path):
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        ModelConfig('nano', attention='flash')
    with pytest.raises(ValueError, match="needs dtype='bfloat16'"):
        ModelConfig('nano', attention='cudnn')
    model = SmartIQA(ModelConfig('nano', attention='pallas'), rngs=nnx.Rngs(0))
    # Not on a CPU: a clear error, not a Triton lowering failure.
    with pytest.raises(ValueError, match="attention='pallas' runs on GPUs .*'cpu'"):
        model.predict(jnp.zeros((1, 224, 224, 3)))
    path = checkpoint.save_model(tmp_path / 'ckpt', model)
    # The trained-with implementation is not kept: 'auto', XLA's on this CPU.
    loaded = checkpoint.load(path)
    assert (loaded.config.attention, loaded.backbone.attention) == ('auto', 'xla')
    assert checkpoint.load(path, attention='pallas').backbone.attention == 'pallas'


@pytest.mark.parametrize('backend,capability,dtype,expected', [
    ('gpu', '9.0', 'bfloat16', 'pallas'),    # H100/H200
    ('gpu', '8.0', jnp.bfloat16, 'pallas'),  # A100
    ('gpu', '9.0', 'float32', 'xla'),        # Pallas measured in bf16 only
    ('gpu', '9.0', None, 'xla'),
    ('gpu', '7.5', 'bfloat16', 'xla'),       # T4: no bf16 tensor cores
    ('gpu', 'gfx90a', 'bfloat16', 'xla'),    # ROCm
    ('cpu', None, 'bfloat16', 'xla'),
    ('tpu', None, 'bfloat16', 'xla'),
])
def test_auto_attention_picks_pallas_for_bf16_on_recent_nvidia_gpus(
        monkeypatch, backend, capability, dtype, expected):
    monkeypatch.setattr(jax, 'default_backend', lambda: backend)
    device = types.SimpleNamespace(platform=backend)
    if capability is not None:
        device.compute_capability = capability
    monkeypatch.setattr(jax, 'devices', lambda *a: [device])
    assert swin.resolve_attention('auto', dtype) == expected
    # A named implementation is kept as it is.
    assert swin.resolve_attention('cudnn', dtype) == 'cudnn'


@pytest.mark.parametrize('platform_version,attention,runs', [
    ('cuda 12080', 'cudnn', True),
    ('cuda 12080', 'pallas', True),
    ('rocm 60300', 'cudnn', False),     # JAX's ROCm builds have no cuDNN
    ('rocm 60300', 'pallas', True),     # Triton
    ('rocm 60300', 'xla', True),
])
def test_cudnn_attention_is_refused_on_rocm_gpus(monkeypatch, platform_version, attention,
                                                 runs):
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    device = types.SimpleNamespace(
        platform='gpu', client=types.SimpleNamespace(platform_version=platform_version))
    monkeypatch.setattr(jax, 'devices', lambda *a: [device])
    monkeypatch.setattr(swin, 'FUSED_IMPLEMENTATION', 'cudnn')
    if runs:
        swin.check_attention_backend(attention)
    else:
        with pytest.raises(ValueError, match=r"'cudnn' runs on NVIDIA GPUs .*ROCm.*'xla'"):
            swin.check_attention_backend(attention)


def test_auto_attention_is_the_default_and_xla_on_this_cpu():
    assert ModelConfig('nano').attention == 'auto'
    for dtype in ('float32', 'bfloat16'):
        model = nnx.eval_shape(lambda: SmartIQA(ModelConfig('nano', dtype=dtype),
                                                rngs=nnx.Rngs(0)))
        assert model.backbone.attention == 'xla'
        assert {block.attn.attention for stage in model.backbone.layers
                for block in stage.blocks} == {'xla'}


def test_pallas_kernels_run_per_device_under_the_data_mesh():
    """XLA cannot split a Pallas kernel over devices: on 2 devices each must run the kernels
    on its half of the windows (shard_map), with the same results and gradients (the
    bias gradient summed over the devices), in the train and eval steps and predict (the
    last two with each crop's mirror image too)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           'PYTHONPATH': repo + os.pathsep + os.environ.get('PYTHONPATH', '')}
    env.pop('XLA_FLAGS', None)
    run = subprocess.run([sys.executable, os.path.join(repo, 'tests', 'pallas_on_two_devices.py')],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report['devices'] == 2
    # 4 images x 4 windows: 8 per device.
    assert report['attention_windows'] == [8]
    for name, error in report['attention_errors'].items():
        assert error < 2e-5, (name, error)
    # nano on 4 images of 224: 64, 16, 4 and 1 windows per image and stage; 2 per device.
    for step in ('train_step_windows', 'eval_step_windows', 'scorer_windows'):
        assert report[step] == [2, 8, 32, 128], (step, report[step])


def test_attention_benchmark_script_runs_and_checks_errors(tmp_path, monkeypatch):
    """scripts/benchmark_attention.py on a CPU: every case of nano, the fused paths and
    a Pallas settings sweep, each with fp32 errors at rounding level."""
    from tests.test_analysis_scripts import _script
    out = tmp_path / 'attention.json'
    monkeypatch.setattr('sys.argv', [
        'benchmark_attention.py', '--variant', 'nano', '--batch', '1', '--dtype', 'float32',
        '--impls', 'xla', 'fused-xla', 'pallas-interpret', '--pallas-windows', '4',
        '--pallas-warps', '8', '--min-seconds', '0', '--json', str(out)])
    _script('benchmark_attention').main()
    report = json.loads(out.read_text())
    impls = ['xla', 'fused-xla', 'pallas-interpret', 'pallas:w4', 'pallas:warps8']
    # nano's depths are 1, 1, 2, 1: a shifted block only in stage 2; stage 3 is one window.
    assert [(r['stage'], r['shifted']) for r in report['rows']] == [
        (0, False), (1, False), (2, False), (2, True), (3, False)]
    for row in report['rows']:
        for impl in impls:
            assert len(row[impl]['errors']) == 3 and max(row[impl]['errors']) < 1e-5, (row, impl)
    assert set(report['total_ms']) == set(impls)
