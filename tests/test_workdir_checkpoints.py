"""Training workdirs as checkpoints: load, to-pytorch / from-pytorch, and predict's resize.

The workdir is written by train_checkpoint.TrainCheckpoints with the items train.py saves
(params as nnx.to_pure_dict, model_config, the run's config...), without training: the
real trainer takes minutes on a CPU, and the on-disk layout is what matters here.
"""

from __future__ import annotations

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
