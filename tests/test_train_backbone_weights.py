"""The trainer started from a pretrained backbone file (config.model.backbone_weights)."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from configs import smoke
from smartiqa_jax import sharding, train, train_config, train_params, weights
from smartiqa_jax.models.variants import get_variant
from tests.test_swin_vs_timm import timm_swin

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def swin_files(tmp_path_factory):
    """Full timm Swin checkpoints (head and final norm included), random weights:
    nano as .safetensors (fits configs/smoke.py), pico as .pth (does not)."""
    root = tmp_path_factory.mktemp('swin')
    nano = {k: v.numpy() for k, v in timm_swin('nano', features_only=False).state_dict().items()}
    save_file(nano, root / 'swin_nano.safetensors')
    torch.save(timm_swin('pico', features_only=False, seed=1).state_dict(), root / 'swin_pico.pth')
    return {'nano': str(root / 'swin_nano.safetensors'), 'nano_state': nano,
            'pico': str(root / 'swin_pico.pth')}


def _config(demo_root, backbone_weights=''):
    config = smoke.get_config()
    config.data.root = demo_root
    config.train.num_epochs = 1
    config.train.max_steps_per_epoch = 1
    config.model.backbone_weights = backbone_weights
    return config


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, np.asarray(tree)


def test_training_starts_from_the_backbone_file(tmp_path, demo_root, swin_files, monkeypatch,
                                                capsys):
    seen = {}
    build_params, make_train_step = train_params.build_params, train.train_state.make_train_step

    def spy_build_params(*args, **kwargs):
        seen['build_kwargs'] = kwargs
        return build_params(*args, **kwargs)

    def spy_make_train_step(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def first_step_recorded(state, batch):
            if 'params' not in seen:   # explicit copies: allowed under the transfer guard
                seen['params'] = jax.device_get(state.params)
                seen['step'] = int(jax.device_get(state.step))
            return step(state, batch)
        return first_step_recorded

    monkeypatch.setattr(train, 'build_params', spy_build_params)
    monkeypatch.setattr(train.train_state, 'make_train_step', spy_make_train_step)
    config = _config(demo_root, swin_files['nano'])
    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert summary['steps'] == 1 and np.isfinite(summary['history'][0]['train_loss'])
    assert seen['step'] == 0
    assert f"Swin-nano backbone weights from {swin_files['nano']}" in capsys.readouterr().out
    start = seen['params']

    # Every backbone parameter is the file's tensor, exactly (in the JAX layout).
    entries = weights.backbone_map(get_variant('nano').depths, prefix='', layer_sep='.')
    file = swin_files['nano_state']
    for e in entries:
        np.testing.assert_array_equal(_at(start, e.jax_path), e.rule.to_jax(file[e.torch_key]),
                                      err_msg=e.torch_key)
    assert len(list(_leaves(start['backbone']))) == len(entries)     # no parameter left out
    # Spelled out for three of them, independently of the name map.
    np.testing.assert_array_equal(start['backbone']['patch_embed']['proj']['kernel'],
                                  file['patch_embed.proj.weight'].transpose(2, 3, 1, 0))
    layers = start['backbone']['layers']
    np.testing.assert_array_equal(layers[2]['blocks'][1]['attn']['qkv']['kernel'],
                                  file['layers.2.blocks.1.attn.qkv.weight'].T)
    np.testing.assert_array_equal(layers[3]['downsample']['norm']['bias'],
                                  file['layers.3.downsample.norm.bias'])

    # The head starts as without the file: the model's init and the config's head options.
    scratch = jax.device_get(build_params(
        _config(demo_root), train_config.model_config_from(config), sharding.make_mesh(),
        **seen['build_kwargs'])[2])
    head = [name for name in start if name != 'backbone']
    assert head and set(head) == {name for name in scratch if name != 'backbone'}
    for name in head:
        for path, value in _leaves(start[name], (name,)):
            np.testing.assert_array_equal(value, _at(scratch, path), err_msg=str(path))
    # ... and the backbone does not (the file was not the init by chance).
    assert not np.array_equal(start['backbone']['layers'][0]['blocks'][0]['mlp']['fc1']['bias'],
                              scratch['backbone']['layers'][0]['blocks'][0]['mlp']['fc1']['bias'])


@pytest.mark.parametrize('which, why', [
    ('absent', 'no such file'),
    ('pico', r'the weights do not fit the model[\s\S]*missing keys[\s\S]*shape mismatches'),
], ids=['missing', 'wrong_variant'])
def test_a_wrong_backbone_file_fails_before_any_data_is_read(
        which, why, tmp_path, demo_root, swin_files, monkeypatch):
    path = str(tmp_path / 'absent.safetensors') if which == 'absent' else swin_files[which]

    def no_data(*args, **kwargs):
        raise AssertionError('the input pipeline was built before the weights were checked')

    monkeypatch.setattr(train, 'TrainFeed', no_data)
    monkeypatch.setattr(train, 'EvalSet', no_data)
    with pytest.raises(weights.WeightsError,
                       match=f'^config.model.backbone_weights: {re.escape(path)}: {why}'):
        train.train_and_evaluate(_config(demo_root, path), str(tmp_path / 'run'))
    assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_cli_names_the_bad_backbone_file_without_a_traceback(tmp_path, demo_root):
    path = tmp_path / 'absent.safetensors'
    run = subprocess.run(
        [sys.executable, '-m', 'smartiqa_jax.train', '--config', 'configs/smoke.py',
         '--workdir', str(tmp_path / 'run'), f'--config.data.root={demo_root}',
         f'--config.model.backbone_weights={path}'],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO),
        capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f'config.model.backbone_weights: {path}: no such file' in run.stderr
    assert 'Traceback' not in run.stderr
