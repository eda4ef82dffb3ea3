"""The whole SMART-IQA model against the PyTorch reference of the released model, both ways."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from smartiqa_jax import weights
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
from smartiqa_jax.torch_reference import SmartIQATorch, infer_config

ATOL = 1e-4


def randomised_reference(variant, fusion, seed=0):
    """A reference model whose every parameter matters: random biases and norms, and stage
    attention scaled up so that its softmax is far from uniform."""
    torch.manual_seed(seed)
    model = SmartIQATorch(variant, fusion)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias') or 'norm' in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.startswith('multiscale_attention'):
                p.mul_(100.0)
    return model.eval()


def images(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 224, 224, 3)).astype(np.float32)


def torch_outputs(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2))


@jax.jit
def jax_outputs(model, x):
    return model.analyse(x)


def assert_outputs_match(jax_out, torch_out):
    np.testing.assert_allclose(np.asarray(jax_out['target_in']), torch_out['target_in'].numpy(),
                               atol=ATOL, rtol=1e-4)
    for i in range(1, 6):
        for kind in 'wb':
            np.testing.assert_allclose(
                np.asarray(jax_out['target_params'][f'{kind}{i}']),
                torch_out['target_params'][f'fc{i}{kind}'].numpy(), atol=ATOL, rtol=1e-4,
                err_msg=f'{kind}{i}')
    np.testing.assert_allclose(np.asarray(jax_out['score']), torch_out['score'].numpy(), atol=ATOL,
                               rtol=0)
    if torch_out['stage_weights'] is None:
        assert jax_out['stage_weights'] is None
    else:
        np.testing.assert_allclose(np.asarray(jax_out['stage_weights']),
                                   torch_out['stage_weights'].numpy(), atol=ATOL, rtol=0)


CASES = [('tiny', f) for f in ('attention', 'multiscale', 'backbone')] + [
    ('base', f) for f in ('attention', 'multiscale', 'backbone')] + [
    ('nano', 'attention'), ('pico', 'attention')]


@pytest.mark.parametrize('variant,fusion', CASES)
def test_import_pytorch_matches(variant, fusion):
    reference = randomised_reference(variant, fusion)
    model = weights.load_pytorch(reference.state_dict())
    assert (model.config.variant, model.config.fusion) == (variant, fusion)
    x = images(1 if variant == 'base' else 2)
    expected = torch_outputs(reference, x)
    if fusion == 'attention':  # the test is only as good as the attention is far from uniform
        assert expected['stage_weights'].max() > 0.4
    assert_outputs_match(jax_outputs(model, x), expected)


@pytest.mark.parametrize('variant,fusion', [('tiny', 'attention'), ('tiny', 'backbone'),
                                            ('base', 'multiscale')])
def test_export_loads_strict_and_matches(variant, fusion, tmp_path):
    model = SmartIQA(ModelConfig(variant, fusion), rngs=nnx.Rngs(3))
    state = {k: torch.from_numpy(v) for k, v in weights.export_state_dict(model).items()}
    reference = SmartIQATorch(variant, fusion).eval()
    reference.load_state_dict(state, strict=True)
    x = images(1, seed=1)
    assert_outputs_match(jax_outputs(model, x), torch_outputs(reference, x))


def test_round_trip_is_bit_identical(tmp_path):
    model = SmartIQA(ModelConfig('tiny', 'attention'), rngs=nnx.Rngs(5))
    path = tmp_path / 'model.pth'
    torch.save({k: torch.from_numpy(v) for k, v in weights.export_state_dict(model).items()}, path)
    back = weights.load_pytorch(path)
    original = jax.tree.leaves(nnx.state(model, nnx.Param))
    restored = jax.tree.leaves(nnx.state(back, nnx.Param))
    assert len(original) == len(restored) == 210
    for a, b in zip(original, restored):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_without_patch_norm_both_ways():
    """ModelConfig(patch_norm=False), the demo's: the reference without the norm, detected
    on import from the missing keys, exported without them, loaded strict, same outputs."""
    torch.manual_seed(1)
    reference = SmartIQATorch('pico', 'attention', patch_norm=False).eval()
    state = reference.state_dict()
    assert not any('patch_embed.norm' in k for k in state)
    assert infer_config(state) == {'variant': 'pico', 'fusion': 'attention', 'patch_norm': False}
    model = weights.load_pytorch(state)
    assert model.config.patch_norm is False
    x = images(2, seed=2)
    assert_outputs_match(jax_outputs(model, x), torch_outputs(reference, x))

    exported = {k: torch.from_numpy(v) for k, v in weights.export_state_dict(model).items()}
    again = SmartIQATorch('pico', 'attention', patch_norm=False).eval()
    again.load_state_dict(exported, strict=True)
    assert_outputs_match(jax_outputs(model, x), torch_outputs(again, x))
    # The norm matters: the same weights with it give other scores.
    with_norm = weights.load_pytorch({**state, **{
        f'swin.backbone.patch_embed.norm.{k}': v for k, v in
        SmartIQATorch('pico', 'attention').swin.backbone.patch_embed.norm.state_dict().items()}})
    assert with_norm.config.patch_norm is True
    a, b = (np.asarray(jax_outputs(m, x)['target_in']) for m in (with_norm, model))
    assert np.abs(a - b).max() > 0.1 * np.abs(b).max()


def test_gradients_match_pytorch():
    """Every parameter's gradient of the summed scores, against PyTorch autograd on the
    reference: checks the backward passes written by hand (`swin.softmax`) and the exact
    GELU's, with shifted windows and their mask (nano's third stage)."""
    reference = randomised_reference('nano', 'attention', seed=3)
    model = weights.load_pytorch(reference.state_dict())
    x = images(2, seed=4)
    reference.zero_grad()
    reference(torch.from_numpy(x).permute(0, 3, 1, 2))['score'].sum().backward()
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}

    grads = nnx.jit(nnx.grad(lambda m: m(x)['score'].sum()))(model)
    flat = dict(nnx.to_flat_state(grads))
    entries = weights.name_map(model.config)
    assert len(entries) == len(expected)
    for e in entries:
        value = flat[e.jax_path]
        got = e.rule.to_torch(np.asarray(getattr(value, 'get_value', lambda: value)()))
        want = expected[e.torch_key]
        scale = max(np.abs(want).max(), 1e-3)
        np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0, err_msg=e.torch_key)
