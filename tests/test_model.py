"""Model behaviour that parity tests do not cover: randomness, modes, config, pure functions."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smartiqa_jax.models import smartiqa, swin
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
from smartiqa_jax.models.variants import VARIANTS


@pytest.fixture(scope='module')
def model():
    return SmartIQA(ModelConfig('nano', 'attention', dropout=0.3, drop_path_rate=0.3),
                    rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def crops():
    return jnp.asarray(np.random.default_rng(0).standard_normal((3, 224, 224, 3)), jnp.float32)


def test_eval_is_deterministic_and_train_follows_the_rng(model, crops):
    forward = nnx.jit(lambda m, x, rngs: m(x, rngs=rngs)['score'])
    model.eval()
    a = forward(model, crops, None)
    np.testing.assert_array_equal(a, forward(model, crops, None))
    model.train()
    try:
        r1 = forward(model, crops, nnx.Rngs(dropout=1))
        r1_again = forward(model, crops, nnx.Rngs(dropout=1))
        r2 = forward(model, crops, nnx.Rngs(dropout=2))
        with pytest.raises(ValueError, match='needs `rngs`'):
            model(crops)
    finally:
        model.eval()
    np.testing.assert_array_equal(r1, r1_again)
    assert np.abs(np.asarray(r1) - np.asarray(r2)).max() > 1e-4
    assert np.abs(np.asarray(r1) - np.asarray(a)).max() > 1e-4


def test_drop_path_alone_varies_in_training(crops):
    m = SmartIQA(ModelConfig('nano', 'backbone', dropout=0.0, drop_path_rate=0.5), rngs=nnx.Rngs(0))
    last_stage = nnx.jit(lambda m, x, rngs: m.backbone(x, rngs)[-1])
    m.train()
    f1 = last_stage(m, crops, nnx.Rngs(dropout=1))
    f2 = last_stage(m, crops, nnx.Rngs(dropout=2))
    assert np.abs(np.asarray(f1) - np.asarray(f2)).max() > 1e-3
    m.eval()
    np.testing.assert_array_equal(last_stage(m, crops, None), last_stage(m, crops, None))


def test_predict_does_not_depend_on_batch_neighbours(model, crops):
    together = model.predict(crops)
    alone = model.predict(crops[1:2])
    np.testing.assert_allclose(alone['score'], together['score'][1:2], atol=1e-5)
    np.testing.assert_allclose(together['stage_weights'].sum(-1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match='224, 224, 3'):
        model.predict(np.zeros((1, 3, 224, 224), np.float32))


def test_bfloat16_compute_keeps_fp32_params_and_stays_close(model, crops):
    fast = SmartIQA(ModelConfig('nano', 'attention', dtype='bfloat16'), rngs=nnx.Rngs(0))
    nnx.update(fast, nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(fast, nnx.Param)))
    np.testing.assert_allclose(fast.predict(crops)['score'], model.predict(crops)['score'], atol=0.05)


def test_bfloat16_matmuls_accumulate_and_write_fp32_on_cpu(crops):
    # XLA:CPU takes its fast (AMX / AVX-512-BF16) path only for bf16 x bf16 -> fp32.
    assert jax.default_backend() == 'cpu'
    fast = SmartIQA(ModelConfig('nano', 'attention', dtype='bfloat16'), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(fast)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)['score'])(state, crops[:1])

    def dots_in(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == 'dot_general':
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots_in(sub)

    dots = list(dots_in(jaxpr.jaxpr))
    bf16_dots = [e for e in dots if e.invars[0].aval.dtype == jnp.bfloat16]
    assert len(bf16_dots) >= 4 * 5          # qkv, q.k, p.v, proj, fc1, fc2 per block
    assert {e.outvars[0].aval.dtype for e in bf16_dots} == {jnp.dtype(jnp.float32)}


def test_analysis_outputs(model, crops):
    out = nnx.jit(lambda m, x: m.analyse(x))(model, crops[:2])
    assert out['target_in'].shape == (2, 224)
    assert out['hyper_feature'].shape == (2, 7, 7, 112)
    assert [f.shape[1:3] for f in out['stage_features']] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    shapes = {k: v.shape for k, v in out['target_params'].items()}
    assert shapes == {'w1': (2, 112, 224), 'b1': (2, 112), 'w2': (2, 56, 112), 'b2': (2, 56),
                      'w3': (2, 28, 56), 'b3': (2, 28), 'w4': (2, 14, 28), 'b4': (2, 14),
                      'w5': (2, 1, 14), 'b5': (2, 1)}


def test_target_network_is_the_plain_mlp():
    rng = np.random.default_rng(0)
    dims = (224, 112, 56, 28, 14, 1)
    params = {}
    for i in range(5):
        params[f'w{i + 1}'] = rng.standard_normal((dims[i + 1], dims[i])).astype(np.float32) * 0.1
        params[f'b{i + 1}'] = rng.standard_normal(dims[i + 1]).astype(np.float32)
    x = rng.standard_normal(224).astype(np.float32)
    q = x
    for i in range(1, 5):
        q = 1 / (1 + np.exp(-(params[f'w{i}'] @ q + params[f'b{i}'])))
    expected = (params['w5'] @ q + params['b5'])[0]
    np.testing.assert_allclose(smartiqa.target_network(params, x), expected, rtol=1e-5)


def test_pooling_and_layout_helpers():
    x = jnp.arange(2 * 14 * 14 * 3, dtype=jnp.float32).reshape(2, 14, 14, 3)
    pooled = smartiqa.adaptive_pool(x)
    np.testing.assert_allclose(pooled[0, 0, 0], x[0, :2, :2].mean((0, 1)))
    flat = smartiqa.flatten_channel_major(x)
    np.testing.assert_array_equal(flat[0, :14], x[0, 0, :, 0])  # channel 0, row 0 first
    m = smartiqa.conv_output_as_matrix(x[:, :7, :7, :2].repeat(2, -1), 4, 49)
    np.testing.assert_array_equal(m[0, 0], x[0, :7, :7, 0].reshape(-1))


def test_config_validation_and_defaults():
    assert ModelConfig('base').dropout == VARIANTS['base'].dropout == 0.4
    assert ModelConfig('small').drop_path_rate == 0.25
    with pytest.raises(ValueError, match='unknown model variant'):
        ModelConfig('huge')
    with pytest.raises(ValueError, match='unknown fusion'):
        ModelConfig('tiny', 'sum')
    with pytest.raises(ValueError, match='unknown model config keys'):
        ModelConfig.from_dict({'variant': 'tiny', 'colour': 'red'})
    assert ModelConfig.from_dict(ModelConfig('tiny').to_dict()) == ModelConfig('tiny')
    for rate in ({'dropout': 1.0}, {'drop_path_rate': -0.1}, {'attention_dropout': 1.5}):
        with pytest.raises(ValueError, match=f'{next(iter(rate))} must be in'):
            ModelConfig('tiny', **rate)


def test_a_rate_of_one_drops_everything_with_finite_gradients():
    x = jnp.ones((2, 3))
    key = jax.random.key(0)
    grad = jax.grad(lambda x: smartiqa.dropout(x, 1.0, key).sum())(x)
    np.testing.assert_array_equal(grad, 0.0)
    drop = swin.DropPath(1.0)
    grad = jax.grad(lambda x: drop(x, nnx.Rngs(dropout=0)).sum())(x)
    np.testing.assert_array_equal(grad, 0.0)


def test_the_backbone_refuses_inputs_of_another_size(model):
    with pytest.raises(ValueError, match=r'built for \(224, 224, 3\) inputs .* got an array of '
                                         r'shape \(1, 448, 448, 3\)'):
        model(jnp.zeros((1, 448, 448, 3)))
    with pytest.raises(ValueError, match=r'got an array of shape \(1, 3, 224, 224\)'):
        model.predict(np.zeros((1, 3, 224, 224)))   # NCHW, as PyTorch would pass it
    for size in (112, 256):    # 112: a 3.5-wide stage 3; 256: stages that do not tile
        with pytest.raises(ValueError, match=f'img_size {size} does not give four stages'):
            swin.SwinTransformer(VARIANTS['pico'], img_size=size, rngs=nnx.Rngs(0))
    built = swin.SwinTransformer(VARIANTS['pico'], img_size=448, rngs=nnx.Rngs(0))
    assert [f.shape[1] for f in built(jnp.zeros((1, 448, 448, 3)))] == [112, 56, 28, 14]


def test_layer_norm_keeps_its_precision_when_the_mean_dwarfs_the_spread():
    # mean 100, spread 0.1: mean(x^2) - mean^2 in fp32 would be off by ~0.5 after normalising
    x = np.random.default_rng(0).standard_normal((8, 1024)) * 0.1 + 100.0
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    got = swin.layer_norm(1024, rngs=nnx.Rngs(0))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-3)


def test_symmetric_views_are_the_square_symmetries():
    images = np.random.default_rng(1).standard_normal((2, 6, 6, 3)).astype(np.float32)
    rotations = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
    expected = {1: [images], 2: [images, images[:, :, ::-1]], 4: rotations,
                8: [v for r in rotations for v in (r, r[:, :, ::-1])]}
    for n, views in expected.items():
        got = np.asarray(smartiqa.symmetric_views(jnp.asarray(images), n))
        assert got.shape == (n, 2, 6, 6, 3)
        np.testing.assert_array_equal(got, np.stack(views))
    # The eight are distinct and closed under the mirror and the rotation: a group.
    eight = np.asarray(smartiqa.symmetric_views(jnp.asarray(images), 8))
    keys = {v.tobytes() for v in eight}
    assert len(keys) == 8
    assert {np.ascontiguousarray(v[:, :, ::-1]).tobytes() for v in eight} == keys
    assert {np.ascontiguousarray(np.rot90(v, 1, axes=(1, 2))).tobytes() for v in eight} == keys
    with pytest.raises(ValueError, match=r'symmetries must be one of \(1, 2, 4, 8\), got 3'):
        smartiqa.symmetric_views(jnp.asarray(images), 3)


def test_mean_over_symmetries_averages_every_output_and_keeps_none(model, crops):
    model.eval()

    def apply(x):
        out = model(x)
        return out['score'], out['stage_weights'], None

    for n in (2, 8):
        score, weights, nothing = jax.jit(
            lambda x: smartiqa.mean_over_symmetries(apply, x, n))(crops)
        views = smartiqa.symmetric_views(crops, n)
        each = [model(v) for v in views]
        np.testing.assert_allclose(score, np.mean([o['score'] for o in each], 0),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(weights, np.mean([o['stage_weights'] for o in each], 0),
                                   rtol=1e-5, atol=1e-6)
        assert nothing is None
    # A crop and its symmetries score differently: the average is not a no-op.
    one = np.asarray(model(crops)['score'])
    assert np.abs(one - np.asarray(score)).max() > 1e-4
