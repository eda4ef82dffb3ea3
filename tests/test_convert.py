"""Conversion CLI, orbax model checkpoints and the refusal of bad weight files."""

import os
import pickle

import numpy as np
import pytest
import timm
import torch
from flax import nnx
from safetensors.numpy import save_file

import smartiqa_jax
from smartiqa_jax import checkpoint, convert, train_params, weights
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
from smartiqa_jax.torch_reference import SmartIQATorch


@pytest.fixture(scope='module')
def reference():
    torch.manual_seed(0)
    return SmartIQATorch('tiny', 'attention').eval()


@pytest.fixture()
def crops():
    return np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)


def torch_score(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2))['score'].numpy()


def test_from_pytorch_then_to_pytorch_cli(reference, crops, tmp_path):
    src = tmp_path / 'released.pth'
    # The released training script nests the weights and keeps DataParallel's prefix.
    torch.save({'epoch': 3, 'model_state_dict': {f'module.{k}': v for k, v in
                                                 reference.state_dict().items()}}, src)
    ckpt = tmp_path / 'ckpt'
    assert convert.main(['from-pytorch', str(src), '--out', str(ckpt)]) == 0
    model = smartiqa_jax.load(ckpt)
    assert (model.config.variant, model.config.fusion) == ('tiny', 'attention')
    np.testing.assert_allclose(model.predict(crops)['score'], torch_score(reference, crops), atol=1e-4)

    for suffix in ('.pth', '.safetensors'):
        out = tmp_path / f'exported{suffix}'
        assert convert.main(['to-pytorch', str(ckpt), '--out', str(out)]) == 0
        back = SmartIQATorch('tiny', 'attention').eval()
        back.load_state_dict(SmartIQATorch.from_released(str(out)).state_dict(), strict=True)
        np.testing.assert_allclose(torch_score(back, crops), torch_score(reference, crops), atol=1e-6)
    # An existing output is not overwritten silently.
    assert convert.main(['to-pytorch', str(ckpt), '--out', str(tmp_path / 'exported.pth')]) == 1


def test_from_timm_cli(tmp_path, crops):
    torch.manual_seed(1)
    swin = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False)
    src = tmp_path / 'swin_tiny.safetensors'
    save_file({k: v.numpy() for k, v in swin.state_dict().items()}, src)
    ckpt = tmp_path / 'ckpt'
    assert convert.main(['from-timm', str(src), '--variant', 'tiny', '--fusion', 'multiscale',
                         '--out', str(ckpt)]) == 0
    model = smartiqa_jax.load(ckpt)
    assert model.config.fusion == 'multiscale'
    # Its head is untrained: labelled so, and fine-tuning maps nothing from it.
    from smartiqa_jax.models.smartiqa import UNTRAINED_HEAD
    assert model.config.label_name == UNTRAINED_HEAD
    assert train_params.init_label_map(model.config, (1.0, 5.0)) is None
    trained = ModelConfig('tiny', 'multiscale')            # KonIQ's 0..100
    assert train_params.init_label_map(trained, (1.0, 5.0)) == pytest.approx((0.04, 1.0))
    np.testing.assert_array_equal(np.asarray(model.backbone.layers[3].blocks[1].attn.qkv.bias[...]),
                                  swin.state_dict()['layers.3.blocks.1.attn.qkv.bias'].numpy())
    # Wrong variant: a readable error and exit status 1, nothing written.
    out = tmp_path / 'wrong'
    assert convert.main(['from-timm', str(src), '--variant', 'base', '--out', str(out)]) == 1
    assert not out.exists()


@pytest.mark.parametrize('argv', [
    ['from-timm', 'x.pth', '--variant', 'huge', '--out', 'y'],
    ['to-pytorch', 'ckpt', '--out', 'y.npz'],     # refused before any model is loaded
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    assert e.value.code == 2
    if argv[0] == 'to-pytorch':
        assert '--out y.npz: must end in .pth, .pt, .safetensors' in capsys.readouterr().err


def test_force_replaces_only_a_model_checkpoint_an_empty_folder_or_a_file(ckpt, tmp_path, capsys):
    photos = tmp_path / 'photos'
    photos.mkdir()
    (photos / 'a.jpg').write_bytes(b'a photo')
    for argv in (['from-pytorch', 'pico.pth'], ['from-timm', 'swin.pth', '--variant', 'tiny']):
        assert convert.main([*argv, '--out', str(photos), '--force']) == 1
        assert f'{photos} is a folder that is not a model checkpoint' in capsys.readouterr().err
        assert (photos / 'a.jpg').read_bytes() == b'a photo'
    (tmp_path / 'x.pth').mkdir()
    assert convert.main(['to-pytorch', ckpt, '--out', str(tmp_path / 'x.pth'), '--force']) == 1
    assert f'{tmp_path / "x.pth"} is a folder; --out names the file' in capsys.readouterr().err
    # A model checkpoint and a file are replaced.
    exported = tmp_path / 'nano.safetensors'
    exported.write_text('an old export')
    assert convert.main(['to-pytorch', ckpt, '--out', str(exported), '--force']) == 0
    old = tmp_path / 'old'
    checkpoint.save_model(old, SmartIQA(ModelConfig('pico', 'backbone'), rngs=nnx.Rngs(0)))
    (tmp_path / 'notes.txt').write_text('a file')
    (tmp_path / 'empty').mkdir()
    for out in (old, tmp_path / 'notes.txt', tmp_path / 'empty'):
        assert convert.main(['from-pytorch', str(exported), '--out', str(out), '--force']) == 0
        assert smartiqa_jax.load(out).config.variant == 'nano'


def test_a_missing_or_unwritable_output_is_one_line(ckpt, tmp_path, capsys):
    out = tmp_path / 'nodir' / 'x.safetensors'
    assert convert.main(['to-pytorch', ckpt, '--out', str(out)]) == 2
    assert capsys.readouterr().err == f'error: --out {out}: no such folder {out.parent}\n'
    (tmp_path / 'd.safetensors').mkdir()
    with pytest.raises(OSError, match='d.safetensors: cannot write it'):
        convert.save_state_dict({'a': np.zeros(2, np.float32)}, str(tmp_path / 'd.safetensors'))


def test_save_load_keeps_parameters_and_config(tmp_path):
    from smartiqa_jax import checkpoint
    model = SmartIQA(ModelConfig('nano', 'backbone', dropout=0.2, label_name='demo pseudo-MOS'),
                     rngs=nnx.Rngs(7))
    checkpoint.save_model(tmp_path / 'm', model)
    back = smartiqa_jax.load(tmp_path / 'm')
    assert back.config == model.config
    for a, b in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                    nnx.to_flat_state(nnx.state(back, nnx.Param))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1].get_value()), np.asarray(b[1].get_value()))
    with pytest.raises(checkpoint.CheckpointError, match='not a SMART-IQA checkpoint'):
        smartiqa_jax.load(tmp_path)


# ----------------------------------------------------------------------------- bad files


def released_state(reference):
    return {k: v.numpy() for k, v in reference.state_dict().items()}


def test_missing_extra_and_mismatched_keys_are_all_listed(reference):
    state = released_state(reference)
    del state['fc3b_fc.bias']
    state['fc6w_fc.weight'] = np.zeros((3, 3), np.float32)
    state['swin.lda2_fc.weight'] = np.zeros((16, 64), np.float32)
    with pytest.raises(weights.WeightsError) as e:
        weights.load_pytorch(state)
    message = str(e.value)
    assert 'missing keys (1):\n    fc3b_fc.bias' in message
    assert 'unexpected keys (1):\n    fc6w_fc.weight' in message
    assert 'swin.lda2_fc.weight: (16, 64) vs (16, 512)' in message


def test_an_incomplete_state_dict_names_what_is_missing(reference):
    state = released_state(reference)
    partial = {k: v for k, v in state.items()
               if k.startswith('swin.backbone.patch_embed') or k.endswith('blocks.0.norm1.weight')}
    with pytest.raises(weights.WeightsError, match='an incomplete SMART-IQA state_dict: missing '
                                                   r'keys swin\.backbone\.layers_0\.blocks\.0'
                                                   r'\.attn\.relative_position_bias_table'):
        weights.load_pytorch(partial)


def test_a_parameter_with_and_without_the_dataparallel_prefix_is_refused(reference, tmp_path):
    state = released_state(reference)
    state['module.fc5b_fc.bias'] = state['fc5b_fc.bias'] + 1.0
    with pytest.raises(weights.WeightsError, match=r"both.safetensors: parameter 'fc5b_fc.bias' "
                                                   'appears twice'):
        weights.read_state_dict(_saved(state, tmp_path / 'both.safetensors'))
    # A prefix applied twice (DataParallel around DataParallel) is stripped whole.
    twice = {'module.module.' + k: v for k, v in released_state(reference).items()}
    assert set(weights.read_state_dict(_saved(twice, tmp_path / 'twice.safetensors'))) == \
        set(released_state(reference))


def _saved(state, path):
    save_file(state, path)
    return path


def test_a_smartiqa_file_given_as_backbone_weights_says_what_it_is(reference, tmp_path):
    path = _saved(released_state(reference), tmp_path / 'smartiqa.safetensors')
    model = SmartIQA(ModelConfig('tiny', 'attention'), rngs=nnx.Rngs(0))
    with pytest.raises(weights.WeightsError, match='smartiqa.safetensors: a whole SMART-IQA '
                                                   r'model .* config.model.init_from'):
        weights.load_timm_backbone(model, path)


def test_wrong_variant_for_given_config(reference):
    with pytest.raises(weights.WeightsError, match='missing keys'):
        weights.load_pytorch(released_state(reference), ModelConfig('small', 'attention'))


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_truncated_file(reference, tmp_path, suffix):
    path = tmp_path / f'w{suffix}'
    if suffix == '.pth':
        torch.save(reference.state_dict(), path)
    else:
        save_file(released_state(reference), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(weights.WeightsError, match=str(path)):
        weights.load_pytorch(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(weights.WeightsError, match='empty'):
        weights.read_state_dict(tmp_path / 'empty.pth')
    with pytest.raises(weights.WeightsError, match='no such file'):
        weights.read_state_dict(tmp_path / 'absent.pth')
    (tmp_path / 'notes.pth').write_text('not a checkpoint\n')
    with pytest.raises(weights.WeightsError, match='notes.pth: not a PyTorch checkpoint'):
        weights.read_state_dict(tmp_path / 'notes.pth')


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('container', ['torch.save', 'raw pickle'])
def test_code_in_a_pickle_is_never_run(tmp_path, container):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    payload = {'swin.backbone.patch_embed.proj.weight': torch.zeros(96, 3, 4, 4),
               'payload': _Exploit(marker)}
    if container == 'torch.save':
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(weights.WeightsError, match='refused on purpose'):
        weights.read_state_dict(path)
    assert not marker.exists()


def test_state_dicts_as_training_scripts_save_them(reference, crops, tmp_path):
    """Metrics saved beside the weights (numpy scalars and arrays, as scipy returns them),
    weights nested twice, and names without a known suffix all load; weights under a key
    nobody uses are named in the error."""
    state = reference.state_dict()
    files = {
        'metrics.pth': {'epoch': 3, 'model_state_dict': state, 'best_srcc': np.float64(0.93),
                        'val_history': np.array([0.5, 0.7]), 'dtype': np.dtype('float32')},
        'lightning.pth.tar': {'state_dict': {'model': state}},
        'no_suffix': state,
    }
    expected = torch_score(reference, crops)
    for name, payload in files.items():
        torch.save(payload, tmp_path / name)
        model = smartiqa_jax.load(tmp_path / name)
        np.testing.assert_allclose(model.predict(crops)['score'], expected, atol=1e-4,
                                   err_msg=name)
    back = SmartIQATorch.from_released(str(tmp_path / 'metrics.pth')).eval()
    np.testing.assert_allclose(torch_score(back, crops), expected, atol=1e-6)
    save_file(released_state(reference), tmp_path / 'safetensors_without_suffix')
    model = smartiqa_jax.load(tmp_path / 'safetensors_without_suffix')
    np.testing.assert_allclose(model.predict(crops)['score'], expected, atol=1e-4)
    torch.save({'model_ema': state, 'epoch': 1}, tmp_path / 'ema.pth')
    with pytest.raises(weights.WeightsError,
                       match=r'ema.pth: holds no tensors where the weights are looked for .*'
                             r'top-level keys: model_ema, epoch; mappings among them: model_ema'):
        weights.read_state_dict(tmp_path / 'ema.pth')


def test_a_safetensors_export_keeps_what_the_scores_mean(tmp_path, capsys):
    from smartiqa_jax.models.smartiqa import UNTRAINED_HEAD
    for label, label_range in (('kadid10k dmos', (1.0, 5.0)), (UNTRAINED_HEAD, (0.0, 100.0))):
        model = SmartIQA(ModelConfig('pico', 'attention', label_name=label,
                                     label_range=label_range), rngs=nnx.Rngs(0))
        source = checkpoint.save_model(tmp_path / 'model', model, force=True)
        out = tmp_path / 'model.safetensors'
        assert convert.main(['to-pytorch', str(source), '--out', str(out), '--force']) == 0
        loaded = smartiqa_jax.load(out)
        assert (loaded.config.label_name, loaded.config.label_range) == (label, label_range)
    assert train_params.init_label_map(loaded.config, (1.0, 5.0)) is None   # untrained head
    # A .pth keeps tensors only: the command says what is lost.
    model = SmartIQA(ModelConfig('pico', label_name='kadid10k dmos', label_range=(1.0, 5.0)),
                     rngs=nnx.Rngs(0))
    source = checkpoint.save_model(tmp_path / 'model', model, force=True)
    capsys.readouterr()
    assert convert.main(['to-pytorch', str(source), '--out', str(tmp_path / 'm.pth')]) == 0
    out = capsys.readouterr().out
    assert ("a .pth holds tensors only, so the scores' label (kadid10k dmos, 1..5) is not "
            "kept: loaded back, it reads as the released model's (koniq10k MOS_zscore, "
            "0..100); .safetensors keeps it") in out
    assert smartiqa_jax.load(tmp_path / 'm.pth').config.label_range == (0.0, 100.0)
