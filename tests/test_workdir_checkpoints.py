"""Training workdirs as checkpoints: load, to-pytorch / from-pytorch, and predict's resize.

The workdir is written by train_checkpoint.TrainCheckpoints with the items train.py saves
(params as nnx.to_pure_dict, model_config, the run's config...), without training: the
real trainer takes minutes on a CPU, and the on-disk layout is what matters here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import smartiqa_jax
from smartiqa_jax import checkpoint, convert, predict
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
from smartiqa_jax.train_checkpoint import TrainCheckpoints
from tests import test_data_fixtures as fixtures


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('workdir')
    model = SmartIQA(ModelConfig('nano', 'attention'), rngs=nnx.Rngs(3))
    model_config = model.config.to_dict()
    model_config['label_range'] = list(model_config['label_range'])
    manager = TrainCheckpoints(str(root), keep=2)
    manager.save(4, params=nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                 train_state={'step': np.int32(4)}, data_iterators=[],
                 progress={'best_step': 4}, config={'data': {'resize': [256, 320]}},
                 model_config=model_config)
    manager.wait()
    manager.mark_best(4)
    manager.close()
    return root, model


def _params(model):
    return jax.tree.leaves(checkpoint.params_pytree(model))


def test_load_and_pytorch_round_trip_from_a_workdir(workdir, tmp_path):
    root, model = workdir
    loaded = smartiqa_jax.load(root)
    assert loaded.config == model.config
    for a, b in zip(_params(model), _params(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exported = tmp_path / 'model.safetensors'
    assert convert.main(['to-pytorch', str(root), '--out', str(exported)]) == 0
    assert convert.main(['from-pytorch', str(exported), '--out', str(tmp_path / 'back')]) == 0
    back = smartiqa_jax.load(tmp_path / 'back')
    for a, b in zip(_params(model), _params(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_takes_the_resize_of_the_training_config(workdir, tmp_path, capsys):
    root, _ = workdir
    assert predict.checkpoint_resize(checkpoint.find_checkpoint(root)) == (True, (256, 320))
    image = fixtures.write_image(str(tmp_path / 'a.png'), size=(300, 400))
    assert predict.main(['--checkpoint', str(root), image, '--crops', '1', '--crop-mode', 'center',
                         '--batch-size', '4', '--no-progress']) == 0
    err = capsys.readouterr().err
    assert "resize 256x320" in err and "training config" in err


def _broken_copy(ckpt, path):
    """A copy of model checkpoint `ckpt` with every parameter data file cut to 10 bytes."""
    shutil.copytree(ckpt, path)
    for data in (path / 'params' / 'ocdbt.process_0' / 'd').iterdir():
        os.truncate(data, 10)
    return path


def test_a_corrupted_checkpoint_is_named_in_one_line(ckpt, tmp_path, capsys):
    broken = _broken_copy(ckpt, tmp_path / 'broken')
    with pytest.raises(checkpoint.CheckpointError,
                       match=f'^{broken}: the parameters in params/ are unreadable'):
        checkpoint.load(broken)
    assert convert.main(['to-pytorch', str(broken), '--out', str(tmp_path / 'x.pth')]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {broken}: the parameters') and '\n' not in err
    assert not (tmp_path / 'x.pth').exists()
    # A command of its own: orbax's abandoned reads report after the error, at exit.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'SMARTIQA_JAX_MALLOC': 'system',
           'PYTHONPATH': repo + os.pathsep + os.environ.get('PYTHONPATH', '')}
    image = fixtures.write_image(str(tmp_path / 'a.png'), size=(64, 64))
    run = subprocess.run([sys.executable, '-m', 'smartiqa_jax.predict', '--checkpoint',
                          str(broken), image, '--no-progress'],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f'error: --checkpoint {broken}: {broken}: the parameters in params/ are unreadable '
        f'(corrupt or truncated?): {run.stderr.split("truncated?): ", 1)[-1].strip()}']
    # From the library, uncaught: the error is reported (the filter drops only the reads).
    script = f'import smartiqa_jax; smartiqa_jax.load({str(broken)!r})'
    run = subprocess.run([sys.executable, '-c', script],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert (f'smartiqa_jax.checkpoint.CheckpointError: {broken}: the parameters in params/ are '
            'unreadable') in run.stderr


def test_parameters_of_another_model_are_named(ckpt, tmp_path):
    mixed = tmp_path / 'mixed'
    checkpoint.save_model(mixed, SmartIQA(ModelConfig('pico', 'attention'), rngs=nnx.Rngs(0)))
    shutil.rmtree(mixed / 'params')
    shutil.copytree(os.path.join(ckpt, 'params'), mixed / 'params')   # nano's
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf'^{mixed}: the parameters in params/ are not those of the model '
                             r'its model_config/ describes \(SMART-IQA pico/attention\): '
                             r'\d+ not in the model \(e.g. backbone/layers/2/blocks/1/'):
        checkpoint.load(mixed)


def test_a_bad_best_step_file_and_a_missing_file_are_named(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / 'checkpoints' / '4')
    best = tmp_path / 'checkpoints' / 'best_step'
    best.write_text('')
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"^{best}: expected a step number, found ''"):
        checkpoint.find_checkpoint(tmp_path)
    best.write_text('4\n')
    assert checkpoint.find_checkpoint(tmp_path) == tmp_path / 'checkpoints' / '4'
    with pytest.raises(checkpoint.CheckpointError,
                       match=f'^{tmp_path / "nope.pth"}: no such file or checkpoint directory$'):
        checkpoint.load(tmp_path / 'nope.pth')


def test_an_unreadable_training_config_is_named_in_one_line(tmp_path, capsys):
    from smartiqa_jax import predict
    model_dir = tmp_path / 'model'
    checkpoint.save_model(model_dir, SmartIQA(ModelConfig('pico'), rngs=nnx.Rngs(0)),
                          training_config={'data': {'resize': [224, 224]}})
    assert checkpoint.training_config(model_dir)['data']['resize'] == [224, 224]
    files = [p for p in (model_dir / 'config').rglob('*') if p.is_file()]
    assert files
    for path in files:
        path.write_bytes(b'{"trunc')
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf'^{model_dir}: config/ is unreadable \(corrupt or truncated\?\)'):
        checkpoint.training_config(model_dir)
    image = fixtures.write_image(str(tmp_path / 'a.png'), size=(64, 64))
    assert predict.main(['--checkpoint', str(model_dir), image, '--no-progress']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: --checkpoint {model_dir}: {model_dir}: config/ is unreadable')
    assert '\n' not in err


def test_only_the_reports_of_abandoned_reads_are_dropped(monkeypatch):
    """After a failed restore, checkpoint._abandoned_read drops tensorstore's callbacks into
    orbax's closed event loop and reports naming the checkpoint, and nothing else."""
    import asyncio

    def closed_loop_error():
        loop = asyncio.new_event_loop()
        loop.close()
        try:
            loop.call_soon_threadsafe(print)
        except RuntimeError as e:   # as a native caller sees it: the loop's frames only
            return e.with_traceback(e.__traceback__.tb_next)

    error = closed_loop_error()
    monkeypatch.setattr(checkpoint, '_ABANDONED', set())
    assert not checkpoint._abandoned_read(error, from_native_callback=True)   # no restore
    checkpoint._ABANDONED.add('/ckpt/broken')
    assert checkpoint._abandoned_read(error, from_native_callback=True)
    # The same error from an object of someone else's, or another error: reported.
    assert not checkpoint._abandoned_read(error, '<mine.Client object>')
    assert not checkpoint._abandoned_read(RuntimeError('Event loop is closed'),
                                          from_native_callback=True)
    assert not checkpoint._abandoned_read(ValueError('x'), from_native_callback=True)
    assert checkpoint._abandoned_read(ValueError('reading /ckpt/broken/params failed'))
    # The failed load's own error names the checkpoint too, and is the user's to see,
    # uncaught or raised again as another error.
    own = checkpoint.CheckpointError('/ckpt/broken: the parameters in params/ are unreadable')
    assert not checkpoint._abandoned_read(own, from_native_callback=True)
    try:
        try:
            raise own
        except checkpoint.CheckpointError as e:
            raise RuntimeError(f'my pipeline could not load {e}')
    except RuntimeError as wrapped:
        assert not checkpoint._abandoned_read(wrapped)


def test_a_checkpoint_with_a_dtype_from_before_dtypes_were_checked_loads_in_float32(
        tmp_path):
    """Before session 12 any dtype but 'bfloat16' was saved as given and computed in
    float32 ('bf16', 'float16'): such checkpoints still load, as what they computed."""
    import orbax.checkpoint as ocp
    path = checkpoint.save_model(tmp_path / 'm', SmartIQA(ModelConfig('pico'),
                                                          rngs=nnx.Rngs(0)))
    config = checkpoint.load(path).config.to_dict()
    config['label_range'] = list(config['label_range'])
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        c.save(tmp_path / 'old', ocp.args.Composite(
            model_config=ocp.args.JsonSave({**config, 'dtype': 'bf16'})))
    shutil.copytree(tmp_path / 'old' / 'model_config', path / 'model_config',
                    dirs_exist_ok=True)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as c:
        stored = c.restore(path, ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    assert stored['model_config']['dtype'] == 'bf16'
    assert checkpoint.load(path).config.dtype == 'float32'

