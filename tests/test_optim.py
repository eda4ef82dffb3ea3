"""Parameter groups, per-group learning rates and the schedules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from smartiqa_jax import optim


def _optim_config(backbone_lr=1e-3, head_lr=1e-2, weight_decay=0.0, clip=0.0):
    c = ml_collections.ConfigDict()
    c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
    c.grad_clip_norm = clip
    c.warmup_epochs = 0.0
    c.schedule_unit = 'step'
    c.backbone = dict(lr=backbone_lr, min_lr=backbone_lr, weight_decay=weight_decay)
    c.head = dict(lr=head_lr, min_lr=head_lr, weight_decay=weight_decay)
    return ml_collections.ConfigDict(c)


def _params():
    return {'backbone': {'layers_0': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}},
            'hyper_convs': {0: {'kernel': jnp.ones((2, 2))}},
            'b5_fc': {'bias': jnp.ones(1)}}


def test_labels_follow_the_backbone_prefix():
    params = {**_params(), 'lda_convs': {0: {'kernel': jnp.ones((1, 1, 2, 2))}},
              'lda_fcs': {3: {'kernel': jnp.ones((2, 2))}}}
    labels = optim.param_labels(params)
    assert labels['backbone']['layers_0']['kernel'] == 'backbone'
    # The released code's `swin` module holds the local-distortion branches too (SPEC 1.6:
    # swin.lda*), and hands them the backbone rate.
    assert labels['lda_convs'][0]['kernel'] == labels['lda_fcs'][3]['kernel'] == 'backbone'
    assert labels['hyper_convs'][0]['kernel'] == 'head'
    assert labels['b5_fc']['bias'] == 'head'


def test_every_model_parameter_has_a_group():
    from flax import nnx
    from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
    abstract = nnx.eval_shape(lambda: SmartIQA(ModelConfig(variant='nano'), rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    counts = optim.count_by_group(params)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert counts['backbone'] > 0 and counts['head'] > 0
    assert counts['backbone'] + counts['head'] == total
    labels = jax.tree.leaves(optim.param_labels(params))
    assert set(labels) == {'backbone', 'head'}
    # By the released names: 'backbone' is exactly what the released `swin.` prefix holds.
    from smartiqa_jax import weights
    released = {e.jax_path: e.torch_key for e in weights.name_map(abstract.config)}
    by_path = dict(jax.tree_util.tree_leaves_with_path(
        optim.param_labels(nnx.to_pure_dict(params))))
    for path, label in by_path.items():
        key = tuple(getattr(k, 'key', getattr(k, 'idx', k)) for k in path)
        assert (label == 'backbone') == released[key].startswith('swin.'), (key, label)


def test_each_group_moves_at_its_own_learning_rate():
    config = _optim_config(backbone_lr=1e-3, head_lr=1e-2)
    schedules = optim.make_schedules(config, steps_per_epoch=10, num_epochs=1)
    tx = optim.make_optimizer(config, schedules)
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves each weight by lr * g / |g| = lr.
    np.testing.assert_allclose(updates['backbone']['layers_0']['kernel'], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(updates['hyper_convs'][0]['kernel'], -1e-2, rtol=1e-4)
    np.testing.assert_allclose(updates['b5_fc']['bias'], -1e-2, rtol=1e-4)


def test_weight_decay_is_per_group_and_scaled_by_the_rate():
    config = _optim_config(backbone_lr=1e-3, head_lr=1e-2, weight_decay=0.5)
    config.backbone.weight_decay = 0.0
    tx = optim.make_optimizer(config, optim.make_schedules(config, steps_per_epoch=1, num_epochs=1))
    params = _params()
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates['backbone']['layers_0']['kernel'], 0.0)
    # AdamW (as torch): the decay step is lr * weight_decay * param.
    np.testing.assert_allclose(updates['b5_fc']['bias'], -1e-2 * 0.5, rtol=1e-5)


def test_gradient_clipping_is_global_over_both_groups():
    config = _optim_config(clip=1.0)
    config.eps = 1e3  # Adam's step is then ~ lr * g / eps: it shows the clipped gradient
    tx = optim.make_optimizer(config, optim.make_schedules(config, steps_per_epoch=1, num_epochs=1))
    params = _params()
    grads = jax.tree.map(lambda x: 100.0 * jnp.ones_like(x), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    size = sum(x.size for x in jax.tree.leaves(params))
    g = 1.0 / np.sqrt(size)  # every entry after clipping all of them to norm 1 together
    np.testing.assert_allclose(updates['backbone']['layers_0']['bias'], -1e-3 * g / (g + 1e3),
                               rtol=1e-4)
    np.testing.assert_allclose(updates['b5_fc']['bias'], -1e-2 * g / (g + 1e3), rtol=1e-4)


def test_cosine_with_floor_and_warmup():
    s = optim.cosine_schedule(base_lr=1.0, min_lr=0.1, total_steps=110, warmup_steps=10)
    assert float(s(0)) == pytest.approx(0.1)           # warmup: (step + 1) / warmup
    assert float(s(9)) == pytest.approx(1.0)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55)          # halfway through the cosine
    assert float(s(110)) == pytest.approx(0.1)
    assert float(s(1000)) == pytest.approx(0.1)         # the floor holds after the end


def test_per_epoch_schedule_is_constant_within_an_epoch():
    s = optim.cosine_schedule(base_lr=1.0, min_lr=0.0, total_steps=40, steps_per_epoch=10,
                              per_epoch=True)
    values = [float(s(i)) for i in range(40)]
    for epoch in range(4):
        assert len(set(values[epoch * 10:(epoch + 1) * 10])) == 1
    assert values[0] == 1.0 and values[10] == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))
    # A warmup that ends inside an epoch: that epoch's rest at base_lr, then whole epochs.
    s = optim.cosine_schedule(base_lr=1.0, min_lr=0.0, total_steps=12, warmup_steps=2,
                              steps_per_epoch=4, per_epoch=True)
    values = [float(s(i)) for i in range(12)]
    np.testing.assert_allclose(values[:4], [0.5, 1.0, 1.0, 1.0])
    for epoch in (1, 2):
        assert len(set(values[epoch * 4:(epoch + 1) * 4])) == 1
    assert values[4] == pytest.approx(0.5 * (1 + np.cos(np.pi * 2 / 10)))


def test_floor_above_the_start_makes_the_rate_rise():
    # The released backbone setting: 5e-7 annealed "down" to eta_min 1e-6.
    s = optim.cosine_schedule(base_lr=5e-7, min_lr=1e-6, total_steps=10)
    assert float(s(0)) == pytest.approx(5e-7) and float(s(10)) == pytest.approx(1e-6)
    assert float(s(5)) > float(s(0))


def test_score_group_is_adamw_on_score_layers_reparameterised_by_the_scale():
    # score_scale c on w equals plain AdamW on theta = w / c with loss f(c * theta):
    # what training on labels divided by c does, while w stays in label units.
    c = 20.0
    config = _optim_config(backbone_lr=1e-3, head_lr=1e-2, weight_decay=0.1)
    schedules = optim.make_schedules(config, steps_per_epoch=10, num_epochs=1)
    scaled = optim.make_optimizer(config, schedules, score_scale=c)
    plain = optim.make_optimizer(config, schedules)
    target = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), _params())

    def loss(p):
        return sum(jnp.sum(jnp.cos(a) * (a - t) ** 2)
                   for a, t in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

    def to_theta(p, factor):
        return {**p, 'b5_fc': jax.tree.map(lambda x: x * factor, p['b5_fc'])}

    w = to_theta(_params(), c)                     # the score layer starts c times larger
    theta = _params()
    w_state, theta_state = scaled.init(w), plain.init(theta)
    for _ in range(5):
        updates, w_state = scaled.update(jax.grad(loss)(w), w_state, w)
        w = jax.tree.map(lambda a, u: a + u, w, updates)
        grads = jax.grad(lambda t: loss(to_theta(t, c)))(theta)
        updates, theta_state = plain.update(grads, theta_state, theta)
        theta = jax.tree.map(lambda a, u: a + u, theta, updates)
    for got, want in zip(jax.tree.leaves(w), jax.tree.leaves(to_theta(theta, c))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(w['b5_fc']['bias'], c)  # it did move


def test_score_group_labels_only_with_a_scale():
    labels = optim.param_labels(_params(), score_group=True)
    assert labels['b5_fc']['bias'] == 'score'
    assert labels['hyper_convs'][0]['kernel'] == 'head'
    assert labels['backbone']['layers_0']['kernel'] == 'backbone'
