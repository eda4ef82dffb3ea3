"""The Flax Swin backbone against timm's, with the same (random) weights, fp32, eval mode."""

import jax
import numpy as np
import pytest
import timm
import torch
from flax import nnx

from smartiqa_jax import weights
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
from smartiqa_jax.models.variants import get_variant


def timm_swin(variant: str, features_only: bool = True, seed: int = 0):
    """timm's Swin at one of our variants' sizes, random weights (biases and norms too).

    Variants timm has no model for (nano, pico) are timm's Swin class at their widths.
    """
    torch.manual_seed(seed)
    kwargs = dict(features_only=True, out_indices=(0, 1, 2, 3)) if features_only else {}
    v = get_variant(variant)
    if v.timm_name is None:
        kwargs.update(embed_dim=v.embed_dim, depths=v.depths, num_heads=v.num_heads)
    model = timm.create_model(v.timm_name or 'swin_tiny_patch4_window7_224', pretrained=False,
                              **kwargs)
    # timm's init leaves biases and LayerNorms at 0/1; randomise them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias') or 'norm' in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize('variant', ['tiny', 'base'])
def test_stage_features_match_timm(variant):
    reference = timm_swin(variant)
    # timm's features_only names stages layers_N; a plain timm checkpoint says layers.N.
    state = {k.replace('layers_', 'layers.'): v for k, v in reference.state_dict().items()}
    model = SmartIQA(ModelConfig(variant, 'attention'), rngs=nnx.Rngs(1))
    weights.load_timm_backbone(model, state)

    x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = [f.numpy() for f in reference(torch.from_numpy(x).permute(0, 3, 1, 2))]
    got = jax.jit(lambda m, x: m.backbone(x))(model, x)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert e.shape == g.shape, (i, e.shape, g.shape)  # timm returns NHWC too
        np.testing.assert_allclose(np.asarray(g), e, atol=1e-4, rtol=0, err_msg=f'stage {i}')


def test_full_timm_checkpoint_ignores_head_and_final_norm():
    state = timm_swin('tiny', features_only=False).state_dict()
    assert 'head.fc.weight' in state and 'norm.weight' in state
    model = SmartIQA(ModelConfig('tiny', 'attention'), rngs=nnx.Rngs(1))
    weights.load_timm_backbone(model, state)
    np.testing.assert_array_equal(
        np.asarray(model.backbone.layers[2].blocks[5].mlp.fc2.kernel[...]),
        state['layers.2.blocks.5.mlp.fc2.weight'].numpy().T)


def test_microsoft_layout_with_buffers():
    """Microsoft's release: downsample at the end of the previous stage, index/mask buffers stored."""
    reference = timm_swin('tiny')
    state = {}
    for k, v in reference.state_dict().items():
        k = k.replace('layers_', 'layers.')
        parts = k.split('.')
        if parts[2] == 'downsample':
            parts[1] = str(int(parts[1]) - 1)
        state['.'.join(parts)] = v
    state['layers.0.blocks.1.attn_mask'] = torch.zeros(64, 49, 49)
    state['layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(49, 49, dtype=torch.long)
    model = SmartIQA(ModelConfig('tiny', 'attention'), rngs=nnx.Rngs(1))
    weights.load_timm_backbone(model, {'model': state})
    x = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2))[-1].numpy()
    np.testing.assert_allclose(np.asarray(model.backbone(x)[-1]), expected, atol=1e-4, rtol=0)


def test_wrong_variant_is_refused_with_a_list():
    state = {k.replace('layers_', 'layers.'): v for k, v in timm_swin('tiny').state_dict().items()}
    model = SmartIQA(ModelConfig('small', 'attention'), rngs=nnx.Rngs(1))
    with pytest.raises(weights.WeightsError, match=r'missing keys \(\d+\):[\s\S]*layers.2.blocks.6'):
        weights.load_timm_backbone(model, state)
    model = SmartIQA(ModelConfig('base', 'attention'), rngs=nnx.Rngs(1))
    with pytest.raises(weights.WeightsError, match='shape mismatches'):
        weights.load_timm_backbone(model, state)
