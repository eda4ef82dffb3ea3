"""The trainer end to end on a tiny config, its bookkeeping, and its messages."""

import csv
import glob
import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base, demo, smoke, small, tiny
from smartiqa_jax import (losses, optim, sharding, train, train_config, train_log, train_params,
                          train_state)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_config_runs_the_trainer_end_to_end(tmp_path, demo_root):
    config = smoke.get_config()
    config.data.root = demo_root
    summary = train.train_and_evaluate(config, str(tmp_path))

    assert summary['steps'] == 6 and len(summary['history']) == 2
    val = [h['val_srcc'] if h['val_srcc'] is not None else -math.inf for h in summary['history']]
    assert summary['best_epoch'] == 1 + int(np.argmax(val))      # chosen on validation
    assert set(summary['results']) == {'test'}
    assert set(summary['results']['test']) >= {'srcc', 'plcc', 'krcc', 'rmse', 'images'}
    for name in ('summary.json', 'curves.png', 'metrics.jsonl'):
        assert os.path.getsize(tmp_path / name) > 0
    assert any(f.startswith('events') for f in os.listdir(tmp_path / 'tensorboard'))
    kinds = {json.loads(line)['kind'] for line in open(tmp_path / 'metrics.jsonl')}
    assert kinds == {'train', 'validation', 'test/test'}

    steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
    best_step = summary['best_step']
    assert best_step in steps and steps[-1] == 6        # the best is kept besides the latest
    step_dir = tmp_path / 'checkpoints' / str(steps[-1])
    assert {'params', 'train_state', 'data_0', 'progress', 'config', 'model_config'} <= set(
        os.listdir(step_dir))

    # smartiqa_jax.load(workdir) follows checkpoints/best_step to the best epoch.
    from smartiqa_jax.checkpoint import find_checkpoint
    assert find_checkpoint(tmp_path).name == str(best_step)

    # Running again on a finished workdir only repeats the test, here with two
    # cross-dataset sets of one kind, told apart by their paths.
    [labels] = glob.glob(os.path.join(demo_root, '*', 'labels.csv'))
    with open(labels) as f:
        rows = list(csv.DictReader(f))
    cross = []
    for name, part in (('a.csv', rows[:6]), ('b.csv', rows[6:14])):
        path = str(tmp_path.parent / f'{tmp_path.name}_{name}')
        with open(path, 'w') as f:
            f.write('image,score\n' + ''.join(
                f'{os.path.join(os.path.dirname(labels), r["image"])},{r["score"]}\n'
                for r in part))
        cross.append(path)
    config.data.cross_datasets = ','.join(f'csv={path}' for path in cross)
    again = train.train_and_evaluate(config, str(tmp_path))
    assert again['results']['test'] == pytest.approx(summary['results']['test'], nan_ok=True)
    assert summary['calibration'] is None and not os.path.exists(tmp_path / 'model')
    assert again['train_seconds'] >= 0.9 * summary['train_seconds'] > 0   # the first run's too
    names = ['test', f'csv {tmp_path.name}_a.csv (all)', f'csv {tmp_path.name}_b.csv (all)']
    assert list(again['results']) == names
    assert [again['results'][name]['images'] for name in names[1:]] == [6, 8]
    assert train._cross_labels([('csv', '/x/a.csv'), ('csv', '/y/a.csv'), ('spaq', '/s')]) == [
        'csv /x/a.csv (all)', 'csv /y/a.csv (all)', 'spaq (all)']
    # TensorBoard holds each result once: the rerun's test replaced the first run's.
    events = _scalar_events(tmp_path / 'tensorboard')
    tests = [(tag, step) for tag, step in events if tag.startswith('test/')]
    assert len({tag.rsplit('/', 1)[0] for tag, _ in tests}) == 3
    assert ('test/test/srcc', summary['best_step']) in tests
    assert sorted(events) == sorted(set(events))


def _scalar_events(folder) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in the TensorBoard event files under `folder`."""
    from tensorboardX.proto import event_pb2
    found = []
    for path in glob.glob(os.path.join(folder, '**', 'events.*'), recursive=True):
        data = open(path, 'rb').read()
        at = 0
        while at < len(data):    # TFRecords: length (8 bytes), its CRC (4), data, CRC (4)
            length = int.from_bytes(data[at:at + 8], 'little')
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            found += [(value.tag, event.step) for value in event.summary.value]
    return found


def test_calibrated_run_writes_the_model_that_load_returns(tmp_path, demo_root, decode_counts):
    from smartiqa_jax import checkpoint
    config = smoke.get_config()
    config.data.root = demo_root
    config.data.cache = True
    config.train.loss = 'plcc'
    config.train.calibrate = True
    config.train.num_epochs = 1
    config.model.patch_norm = False          # the demo's two departures from the paper
    config.data.jpeg_aligned_crops = True
    config.data.eval_symmetries = 2
    summary = train.train_and_evaluate(config, str(tmp_path))
    # The calibration pass reads the training feed's decoded cache: each image once.
    assert decode_counts and max(decode_counts.values()) == 1
    assert checkpoint.find_checkpoint(tmp_path) == tmp_path / 'model'
    assert checkpoint.find_checkpoint(tmp_path / 'checkpoints') == tmp_path / 'model'
    # It carries the run's config, so `predict` preprocesses as the run did.
    from smartiqa_jax import predict
    assert predict.checkpoint_resize(tmp_path / 'model') == (True, (224, 224))
    for flags, aligned, symmetries in (([], True, 2), (['--no-jpeg-aligned-crops'], False, 2),
                                       (['--symmetries', '8'], True, 8)):
        args = predict._parser().parse_args(['--checkpoint', str(tmp_path), *flags, 'x.jpg'])
        scorer_model, prep, _ = predict.load_for_scoring(args, log=io.StringIO())
        assert prep.jpeg_aligned is aligned and scorer_model.config.patch_norm is False
        assert prep.symmetries == symmetries
    model = checkpoint.load(tmp_path)
    best = checkpoint.load(tmp_path / 'checkpoints' / str(summary['best_step']))
    assert summary['calibration'] is not None     # the run is deterministic
    a, b = summary['calibration']['a'], summary['calibration']['b']
    images = jax.random.normal(jax.random.key(0), (2, 224, 224, 3))
    np.testing.assert_allclose(model.predict(images)['score'],
                               a * best.predict(images)['score'] + b, rtol=1e-4, atol=1e-3)
    # Killed before the calibrated model was written: the workdir does not pass off the
    # raw (plcc-scale) best step as its model; a step directory still loads.
    import shutil
    shutil.rmtree(tmp_path / 'model')
    for given in (tmp_path, tmp_path / 'checkpoints'):
        with pytest.raises(checkpoint.CheckpointError,
                           match=f'calibrated model \\({tmp_path / "model"}\\) is not there yet'):
            checkpoint.find_checkpoint(given)
    assert checkpoint.find_checkpoint(tmp_path / 'checkpoints' / str(summary['best_step']))


def test_calibration_folds_an_affine_map_into_the_score_layers():
    from flax import nnx
    from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
    model = SmartIQA(ModelConfig('nano', 'attention'), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    images = jax.random.normal(jax.random.key(1), (3, 224, 224, 3))
    raw = np.asarray(nnx.merge(graphdef, params)(images)['score'])
    labels = 2.5 * raw - 7.0
    calibrated, ab = train_params.calibrate_score_layers(params, raw, labels)
    assert ab == pytest.approx((2.5, -7.0), rel=1e-3)
    new = np.asarray(nnx.merge(graphdef, calibrated)(images)['score'])
    np.testing.assert_allclose(new, labels, rtol=1e-4, atol=1e-4)
    # Everything but the two score layers is untouched.
    for name in set(params) - {'w5_fc', 'b5_fc'}:
        assert calibrated[name] is params[name]
    # Never reverses the ranking; nothing to fit from one distinct prediction.
    assert train_params.calibrate_score_layers(params, raw, -labels) == (params, None)
    assert train_params.calibrate_score_layers(params, np.ones(3), labels) == (params, None)


def test_the_eval_step_averages_the_symmetries_it_is_given():
    from smartiqa_jax.models.smartiqa import SmartIQA, symmetric_views
    config = smoke.get_config()
    mesh = sharding.make_mesh()
    _, eval_graphdef, params = train_state.init_params(
        lambda: SmartIQA(train_config.model_config_from(config), rngs=nnx.Rngs(0)), mesh)
    images = jax.random.normal(jax.random.key(2), (2 * jax.device_count(), 224, 224, 3))
    plain = train_state.make_eval_step(eval_graphdef, mesh)
    for n in (2, 4):
        expected = np.mean([plain(params, view) for view in symmetric_views(images, n)], 0)
        got = train_state.make_eval_step(eval_graphdef, mesh, n)(params, images)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert np.abs(np.asarray(got) - np.asarray(plain(params, images))).max() > 1e-4


def test_loss_falls_when_overfitting_one_batch():
    from smartiqa_jax.models.smartiqa import SmartIQA
    config = smoke.get_config()
    config.model.dropout = 0.0         # a clean signal: only the fit changes the loss
    config.optim.backbone.lr = config.optim.head.lr = 1e-3
    mesh = sharding.make_mesh()
    model_config = train_config.model_config_from(config)
    train_graphdef, _, params = train_state.init_params(
        lambda: SmartIQA(model_config, rngs=nnx.Rngs(0)), mesh)
    schedules = optim.make_schedules(config.optim, steps_per_epoch=20, num_epochs=1)
    tx = optim.make_optimizer(config.optim, schedules)
    state = sharding.replicate(train_state.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.PRNGKey(0)), mesh)
    step = train_state.make_train_step(train_graphdef, tx, losses.l1_loss, mesh,
                                       jax.tree.map(lambda x: x.sharding, state))
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch({
        'image': rng.normal(size=(4, 224, 224, 3)).astype(np.float32),
        'score': np.array([20.0, 40.0, 60.0, 80.0], np.float32)}, mesh)
    history = []
    for _ in range(12):
        state, metrics = step(state, batch)
        history.append(float(metrics['loss']))
    assert min(history[-4:]) < 0.5 * history[0], history
    # What crosses the jit boundary every step is plain arrays: nnx.Variable leaves
    # would cost Python work per leaf per step (train_state's docstring).
    nodes = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert nodes and all(isinstance(x, jax.Array) for x in nodes), \
        {type(x).__name__ for x in nodes}


def _initial_params(config, **kwargs) -> dict:
    mesh = sharding.make_mesh()
    model_config = train_config.model_config_from(config)
    _, _, params = train_params.build_params(config, model_config, mesh, **kwargs)
    return jax.device_get(params)


def test_from_scratch_init_options_rescale_only_their_layers():
    config = smoke.get_config()
    config.model.score_bias_init = 'model'
    released = _initial_params(config, mean_label=0.0)
    for name in ('model', 'label_std'):
        config.model.score_scale = name
        expected = 10.0 if name == 'label_std' else 1.0
        assert train_params.score_scale_of(config, [10.0, 30.0]) == expected
    config.model.hyper_conv_init = 'kaiming'
    config.model.backbone_init = 'fan_in'
    changed = _initial_params(config, mean_label=50.0, score_scale=20.0)

    for name in ('w5_fc', 'b5_fc'):                       # z-score units -> label units
        for k in ('kernel', 'bias'):
            np.testing.assert_allclose(changed[name][k], 20.0 * released[name][k], rtol=1e-6)
    for i in range(3):                                    # PyTorch default -> Kaiming-uniform
        np.testing.assert_allclose(changed['hyper_convs'][i]['kernel'],
                                   np.sqrt(6.0) * released['hyper_convs'][i]['kernel'], rtol=1e-6)
    qkv = changed['backbone']['layers'][0]['blocks'][0]['attn']['qkv']['kernel']
    assert np.std(qkv) == pytest.approx(qkv.shape[0] ** -0.5, rel=0.2)   # was 0.02
    np.testing.assert_array_equal(changed['backbone']['patch_embed']['proj']['kernel'],
                                  released['backbone']['patch_embed']['proj']['kernel'])
    np.testing.assert_array_equal(changed['lda_convs'][0]['kernel'],
                                  released['lda_convs'][0]['kernel'])

    # The score bias starts at the mean label, after the scaling.
    config.model.score_bias_init = 'mean_label'
    again = _initial_params(config, mean_label=50.0, score_scale=20.0)
    assert float(again['b5_fc']['bias'][0]) == 50.0


def test_from_scratch_init_options_reject_unknown_values():
    for key, value in (('score_scale', 'z'), ('hyper_conv_init', 'he'), ('backbone_init', 'x')):
        config = smoke.get_config()
        config.model[key] = value
        with pytest.raises(ValueError, match=key):
            train_params.score_scale_of(config, [1.0, 2.0])
            _initial_params(config, mean_label=0.0)
    config = smoke.get_config()
    config.model.backbone_init = 'fan_in'
    config.model.backbone_weights = '/some/swin.safetensors'
    with pytest.raises(ValueError, match='from scratch'):
        _initial_params(config, mean_label=0.0)


def test_released_configs_keep_the_released_init():
    for module in (base, small, tiny):
        m = module.get_config().model
        assert (m.score_bias_init, m.score_scale, m.hyper_conv_init, m.backbone_init) == (
            'model', 'model', 'model', 'timm')


def test_progress_keeps_the_best_epoch_and_stops_after_patience():
    progress = train.Progress()
    srccs = [0.5, 0.7, 0.6, float('nan'), 0.65]
    stops = []
    for epoch, srcc in enumerate(srccs, 1):
        progress.record_epoch(epoch, 10 * epoch, {'val_srcc': srcc}, patience=3)
        stops.append(progress.stopped_early)
    assert (progress.best_epoch, progress.best_step, progress.best_srcc) == (2, 20, 0.7)
    assert stops == [False, False, False, False, True]
    assert progress.history[3]['val_srcc'] is None          # NaN stored as JSON null
    restored = train.Progress.from_json(json.loads(json.dumps(progress.to_json())))
    assert restored == progress


def test_patience_zero_never_stops():
    progress = train.Progress()
    for epoch in range(1, 20):
        progress.record_epoch(epoch, epoch, {'val_srcc': 0.1}, patience=0)
    assert not progress.stopped_early and progress.best_epoch == 1


def test_configs_select_ablations_by_key():
    from smartiqa_jax.models.smartiqa import ModelConfig
    for module, variant in ((base, 'base'), (small, 'small'), (tiny, 'tiny'), (demo, 'pico'),
                            (smoke, 'nano')):
        config = module.get_config()
        assert train_config.model_config_from(config).variant == variant
    config = base.get_config()
    assert train_config.model_config_from(config) == ModelConfig(
        variant='base', fusion='attention')
    for fusion in ('backbone', 'multiscale'):
        config.model.fusion = fusion
        assert train_config.model_config_from(config).fusion == fusion
    assert train_config.model_config_from(config).attention_dropout == 0.5   # released
    config.model.attention_dropout = 0.0
    assert train_config.model_config_from(config).attention_dropout == 0.0
    # The attention kernel is a key too; a GPU-only one on this CPU fails before any data.
    config.model.attention = 'pallas'
    with pytest.raises(ValueError, match="config.model.attention: attention='pallas' runs on GPUs"):
        train_config.model_config_from(config)
    config.model.attention = 'xla'
    for name in losses.LOSSES:
        config.train.loss = name
        losses.get_loss(config.train.loss, **config.train.loss_params.to_dict())
    # SPEC 2's hyper-parameters.
    assert (config.optim.backbone.lr, config.optim.head.lr) == (5e-7, 5e-6)
    assert config.optim.head.weight_decay == 2e-4 and config.optim.grad_clip_norm == 1.0
    assert (config.train.batch_size, config.train.num_epochs, config.train.patience) == (32, 10, 5)
    assert config.data.patches_per_image == 20


def _cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
    return subprocess.run([sys.executable, '-m', 'smartiqa_jax.train', *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_base_config_without_data_says_where_it_looked_and_what_to_do(tmp_path):
    missing = tmp_path / 'no_koniq_here'
    run = _cli('--config', 'configs/base.py', '--workdir', str(tmp_path / 'w'),
               f'--config.data.root={missing}')
    assert run.returncode != 0
    message = run.stderr
    assert str(missing) in message
    assert 'koniq10k_distributions_sets.csv' in message and 'database.mmsp-kn.de' in message
    assert 'configs/demo.py' in message and 'without any download' in message
    assert 'Traceback' not in message


def test_unknown_config_override_is_an_error(tmp_path):
    run = _cli('--config', 'configs/base.py', '--workdir', str(tmp_path),
               '--config.train.learning_rate=1e-3')
    assert run.returncode != 0 and 'Traceback' not in run.stderr
    assert ("--config.train.learning_rate=1e-3: config.train has no key 'learning_rate'; its "
            'keys: batch_size,') in run.stderr
    run = _cli('--config', 'configs/base.py', '--workdir', str(tmp_path), '--config.trian.loss=l2')
    assert "config has no key 'trian'; its keys: data, model, optim, seed, train" in run.stderr


def test_checkpoints_keep_the_latest_and_the_marked_best(tmp_path):
    from smartiqa_jax.train_checkpoint import TrainCheckpoints
    checkpoints = TrainCheckpoints(str(tmp_path), keep=1)
    for step in range(1, 6):
        checkpoints.save(step, params={'w': np.full(3, float(step))},
                         train_state={'step': np.int32(step)}, data_iterators=[],
                         progress={'step': step}, config={}, model_config={})
        checkpoints.wait()
        if step == 2:
            checkpoints.mark_best(step)
    assert list(checkpoints.all_steps()) == [2, 5]
    assert open(tmp_path / 'checkpoints' / 'best_step').read().strip() == '2'
    restored = checkpoints.restore_params(2, {'w': np.zeros(3)})
    np.testing.assert_array_equal(restored['w'], [2.0, 2.0, 2.0])
    checkpoints.close()


def test_metric_log_on_resume_keeps_each_step_once(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    records = [{'step': 10, 'kind': 'train'}, {'step': 20, 'kind': 'train'},
               {'step': 20, 'kind': 'validation'}, {'step': 30, 'kind': 'train'},
               {'step': 20, 'kind': 'test/test'}]
    path.write_text(''.join(json.dumps(r) + '\n' for r in records) + '{"step": 40, "ki')  # torn
    log = train_log.MetricLog(str(tmp_path), resume_step=20)
    log.write(30, 'train', {'loss': 1.0})
    log.close()
    kept = [(r['step'], r['kind']) for r in map(json.loads, path.read_text().splitlines())]
    assert kept == [(10, 'train'), (20, 'train'), (20, 'validation'), (30, 'train')]
