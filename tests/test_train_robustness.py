"""The trainer against mistakes: bad settings, unusable splits, a resume with other
settings, a lost best-step record, and a model that scores NaN."""

import csv
import dataclasses
import glob
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import smoke
from smartiqa_jax import checkpoint, sharding, train, train_checkpoint, train_config, train_data
from smartiqa_jax.data import DataError
from smartiqa_jax.metrics import quality_metrics
from smartiqa_jax.train_config import ConfigError
from tests.test_train import REPO, _cli


def _config(demo_root, **changes):
    config = smoke.get_config()
    config.data.root = demo_root
    for key, value in changes.items():
        if '__' not in key:
            config[key] = value
            continue
        section, name = key.split('__')
        if name == 'resize':   # a tuple of another length than the default's
            config[section][name] = None
        config[section][name] = value
    return config


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if the input pipeline is built."""
    def fail(*args, **kwargs):
        raise AssertionError('the input pipeline was built before the config was checked')
    monkeypatch.setattr(train, 'TrainFeed', fail)
    monkeypatch.setattr(train, 'EvalSet', fail)


@pytest.mark.parametrize('change, message', [
    ({'train__loss': 'L1'}, "train.loss 'L1' is not one of l1, l2"),
    ({'optim__schedule_unit': 'steps'}, "optim.schedule_unit 'steps' is not 'epoch' or 'step'"),
    ({'train__log_every_steps': 0}, 'train.log_every_steps must be at least 1, got 0'),
    ({'train__keep_checkpoints': 0}, 'train.keep_checkpoints must be at least 1, got 0'),
    ({'data__eval_crop_mode': 'middle'}, "data.eval_crop_mode 'middle' is not one of"),
    ({'model__variant': 'huge'}, "config.model: unknown model variant 'huge'"),
    ({'model__attention': 'pallas'}, "config.model.attention: attention='pallas' runs on GPUs"),
    ({'data__dataset': 'nope'}, "data.dataset 'nope' is not one of koniq10k, .*demo"),
    ({'data__cross_datasets': 'nope=/x'}, "data.cross_datasets: 'nope' is not one of"),
    ({'data__cross_datasets': 'spaq'}, "data.cross_datasets entry 'spaq' is not name=root"),
    ({'data__cross_datasets': 'spaq=/x, spaq=/x'}, 'data.cross_datasets lists spaq=/x twice'),
    ({'seed': -1}, r'seed must be in 0..2\*\*32-1 .*got -1'),
    ({'data__label_range': (5.0, 1.0)}, r'data.label_range must be .* low < high, got \(5.0, 1.0\)'),
    ({'data__label_range': ('a', 'b')}, r"data.label_range must be .*got \('a', 'b'\)"),
    ({'data__crop_size': 0}, "data.crop_size must be 224 .*got 0"),
    ({'data__resize': (256,)}, r'data.resize must be \(\) .* or \(height, width\)'),
    ({'data__resize': (10, 10)}, r'each at least data.crop_size 224; got \(10, 10\)'),
    ({'data__eval_crop_mode': 'center', 'data__eval_crops': 3},
     "data.eval_crop_mode 'center' takes one crop per image; data.eval_crops is 3"),
    ({'data__num_workers': -1}, 'data.num_workers must be at least 0, got -1'),
    ({'data__split_seed': -1}, 'data.split_seed must be at least 0, got -1'),
    ({'train__compute_dtype': 'float16'}, "train.compute_dtype 'float16' is not one of float32"),
    ({'data__eval_symmetries': 3}, 'data.eval_symmetries 3 is not one of 1, 2, 4, 8'),
    ({'train__batch_size': 3}, None),   # a valid odd batch on one device: no error
], ids=['loss', 'schedule_unit', 'log_every', 'keep', 'crop_mode', 'variant', 'attention',
         'dataset', 'cross_name', 'cross_form', 'cross_twice', 'seed', 'label_range',
         'label_range_text', 'crop_size', 'resize_one',
         'resize_small', 'center_crops', 'workers', 'split_seed', 'dtype', 'symmetries', 'ok'])
def test_config_mistakes_fail_before_any_data_is_read(change, message, tmp_path, demo_root,
                                                      no_data):
    config = _config(demo_root, **change)
    if message is None:
        with pytest.raises(AssertionError, match='input pipeline was built'):
            train.train_and_evaluate(config, str(tmp_path))
        return
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(config, str(tmp_path))


def _csv_without(tmp_path, demo_root, missing_split):
    [labels] = glob.glob(os.path.join(demo_root, '*', 'labels.csv'))
    path = tmp_path / f'no_{missing_split}.csv'
    with open(labels) as f, open(path, 'w', newline='') as out:
        rows = [r for r in csv.DictReader(f) if r['split'] != missing_split]
        writer = csv.DictWriter(out, ['image', 'score', 'split'], extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    return str(path), os.path.dirname(labels)


@pytest.mark.parametrize('missing', ['validation', 'test'])
def test_an_empty_split_is_named_before_training(missing, tmp_path, demo_root, no_data):
    path, folder = _csv_without(tmp_path, demo_root, missing)
    config = _config(demo_root, data__dataset='csv', data__root=path)
    config.data.csv.split_column = 'split'
    config.data.csv.images_dir = folder
    with pytest.raises(ConfigError, match=f'the {missing} split of csv in {path} is empty'):
        train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert not os.path.exists(tmp_path / 'run')   # no empty workdir left behind


def test_too_few_training_images_for_one_batch(tmp_path, demo_root, no_data):
    config = _config(demo_root, data__max_images_per_split=3, data__cache=True)
    with pytest.raises(ConfigError, match=r'an epoch has no full batch: 3 training images '
                                         r'x 1 patches .* < config.train.batch_size 4'):
        train.train_and_evaluate(config, str(tmp_path))


def test_resume_rewrites_the_best_step_and_refuses_other_settings(tmp_path, demo_root,
                                                                 monkeypatch):
    workdir = str(tmp_path / 'run')
    config = _config(demo_root)
    summary = train.train_and_evaluate(config, workdir)
    best_file = os.path.join(workdir, 'checkpoints', 'best_step')

    # A kill between an improving epoch's save and its best-step record: the file is
    # missing (or names an older step). Running again writes it from the checkpoint.
    os.remove(best_file)
    again = train.train_and_evaluate(_config(demo_root, train__log_every_steps=2), workdir)
    assert open(best_file).read().strip() == str(summary['best_step']) == str(again['best_step'])

    # A best-step record naming a deleted step is an error, not the latest step in disguise.
    with open(best_file, 'w') as f:
        f.write('1\n')
    with pytest.raises(checkpoint.CheckpointError, match=r'names step 1, which is not in'):
        checkpoint.find_checkpoint(workdir)
    with open(best_file, 'w') as f:
        f.write(f'{summary["best_step"]}\n')

    # Settings that change what the run computes cannot change on resume.
    changed = _config(demo_root, train__batch_size=2, model__fusion='backbone')
    with pytest.raises(ConfigError) as e:
        train.train_and_evaluate(changed, workdir)
    assert 'model.fusion: \'attention\' in the checkpoint, \'backbone\' now' in str(e.value)
    assert 'train.batch_size: 4 in the checkpoint, 2 now' in str(e.value)

    # Nor the number of processes or data shards that wrote the data positions.
    checkpoints = train_checkpoint.TrainCheckpoints(workdir, keep=2)
    step = checkpoints.latest_step()
    assert checkpoints.data_layout(step) == (1, 1)
    with pytest.raises(ConfigError, match='written by 1 process.* reading 1 data shard'):
        stored = checkpoints.stored_config(step)
        train_config.check_resumable(stored, checkpoints, step, iterators=2)
    checkpoints.close()

    # Nor the training split (data.root may move): fewer images, or one label changed
    # (smoke.py keeps 24 of the demo's training images, the first among them).
    load_splits = train_data.load_splits

    def changed_split(change):
        def load(*args, **kwargs):
            splits = load_splits(*args, **kwargs)
            splits.splits['train'] = change(splits.splits['train'])
            return splits
        return load

    relabel = dataclasses.replace
    for change, message in ((lambda records: records[:20], r'\(24 images then, 20 now\)'),
                            (lambda records: [relabel(records[0], score=records[0].score + 1),
                                              *records[1:]], 'now other names or labels')):
        monkeypatch.setattr(train, 'load_splits', changed_split(change))
        with pytest.raises(ConfigError, match='trained on another training split .*'
                                             + message):
            train.train_and_evaluate(_config(demo_root), workdir)
    monkeypatch.setattr(train, 'load_splits', load_splits)

    # A latest checkpoint with truncated files: named, with the steps to go on from.
    all_steps = sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints'))
                       if name.isdigit())
    for path in glob.glob(os.path.join(workdir, 'checkpoints', str(all_steps[-1]),
                                       'train_state', '**', 'd', '*'), recursive=True):
        with open(path, 'r+b') as f:
            f.truncate(10)
    for path in glob.glob(os.path.join(workdir, 'checkpoints', str(all_steps[-1]),
                                       'progress', '*')):
        with open(path, 'w') as f:   # also read before the restore, for its fingerprint
            f.write('{"trunc')
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf'checkpoints/{all_steps[-1]} cannot be restored .*Steps '
                             rf'{", ".join(map(str, all_steps[:-1]))} are also kept: move .* '
                             rf'from step {all_steps[-2]}'):
        train.train_and_evaluate(_config(demo_root), workdir)


class _StoredRun:
    """What check_resumable reads of a workdir's checkpoints: one step's config."""
    directory = '/runs/old'

    def __init__(self, config_json):
        self.config_json = config_json

    def stored_config(self, step):
        return self.config_json

    def data_layout(self, step):
        return (1, 1)


def test_a_run_saved_with_a_legacy_compute_dtype_resumes_in_float32():
    # Before dtypes were checked, 'bf16' or 'float16' were stored and ran in float32:
    # check_config now refuses them, so resuming takes 'float32' as the same setting.
    now = smoke.get_config().to_dict()
    for legacy in ('bf16', 'float16'):
        stored = {**now, 'train': {**now['train'], 'compute_dtype': legacy}}
        train_config.check_resumable(now, _StoredRun(stored), 10, iterators=1)
        with pytest.raises(ConfigError, match=r"train.compute_dtype: 'float32' in the "
                                             r"checkpoint, 'bfloat16' now"):
            changed = {**now, 'train': {**now['train'], 'compute_dtype': 'bfloat16'}}
            train_config.check_resumable(changed, _StoredRun(stored), 10, iterators=1)
    stored = {**now, 'train': {**now['train'], 'compute_dtype': 'bfloat16'}}
    with pytest.raises(ConfigError, match=r"'bfloat16' in the checkpoint, 'float32' now"):
        train_config.check_resumable(now, _StoredRun(stored), 10, iterators=1)


def test_data_workers_and_cache_may_not_change_on_resume():
    """The worker count changes how batches are put together, and the decoded cache which
    images an epoch holds when some fail to decode: both are part of the data iterator's
    saved state, so a resume names them instead of failing in the restore."""
    now = smoke.get_config().to_dict()
    for key, value in (('num_workers', now['data']['num_workers'] + 1),
                       ('cache', not now['data']['cache'])):
        changed = {**now, 'data': {**now['data'], key: value}}
        with pytest.raises(ConfigError, match=rf'data.{key}: .* in the checkpoint'):
            train_config.check_resumable(changed, _StoredRun(now), 10, iterators=1)
    moved = {**now, 'data': {**now['data'], 'root': '/elsewhere'}}
    train_config.check_resumable(moved, _StoredRun(now), 10, iterators=1)


def test_a_nan_score_is_not_dropped_from_the_metrics(demo_root):
    splits = train_data.load_splits('demo', demo_root)
    config = _config(demo_root)
    eval_set = train_data.EvalSet('validation', splits['validation'][:8], config.data,
                                  batch_size=4, seed=0)
    mesh = sharding.make_mesh()

    def scores(nan_at=None):
        def eval_step(params, images):
            values = jnp.mean(images, axis=(1, 2, 3))
            return values if nan_at is None else values.at[nan_at].set(jnp.nan)
        return eval_step

    finite = eval_set.evaluate(scores(), None, mesh)
    assert finite['images'] == 8 and np.isfinite(finite['srcc'])
    diverged = eval_set.evaluate(scores(nan_at=1), None, mesh)
    assert diverged['images'] == 8 and np.isnan(diverged['srcc']) and np.isnan(diverged['plcc'])
    assert np.isnan(quality_metrics([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])['srcc'])


def test_cli_names_a_config_mistake_without_a_traceback(tmp_path, demo_root):
    run = _cli('--config', 'configs/smoke.py', '--workdir', str(tmp_path),
               f'--config.data.root={demo_root}', '--config.train.loss=L1')
    assert run.returncode != 0
    assert "train.loss 'L1' is not one of" in run.stderr and 'Traceback' not in run.stderr


def test_configs_that_build_on_base_load_from_any_folder(tmp_path, demo_root):
    """`smartiqa train --config /abs/configs/smoke.py` outside the repository: smoke.py
    imports configs.demo, which imports configs.base; the config folder's parent is put on
    sys.path for that (the mistake below stops the run right after the config loads)."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['JAX_PLATFORMS'] = 'cpu'
    run = subprocess.run(
        [sys.executable, '-m', 'smartiqa_jax.cli', 'train',
         '--config', os.path.join(REPO, 'configs', 'smoke.py'), '--workdir', str(tmp_path / 'w'),
         f'--config.data.root={demo_root}', '--config.train.loss=L1'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "No module named 'configs'" not in run.stderr
    assert "train.loss 'L1' is not one of" in run.stderr and 'Traceback' not in run.stderr


def test_train_command_twice_in_one_process_with_usage_mistakes(tmp_path, demo_root, capsys):
    """`smartiqa_jax.cli.main(['train', ...])` as a notebook would call it, twice: the
    flags are defined once, and a missing config file or a workdir that is a file get a
    one-line message (exit status 1), not a traceback."""
    from smartiqa_jax import cli
    missing = tmp_path / 'nope.py'
    afile = tmp_path / 'afile'
    afile.write_text('')
    smoke_file = os.path.join(REPO, 'configs', 'smoke.py')
    for _ in range(2):
        assert cli.main(['train', '--config', str(missing)]) == 1
        assert capsys.readouterr().err.strip() == f'--config {missing}: no such file'
        assert cli.main(['train', '--config', smoke_file, '--workdir', str(afile),
                         f'--config.data.root={demo_root}']) == 1
        err = capsys.readouterr().err
        assert f'workdir {afile} is a file' in err and 'Traceback' not in err
        # A workdir that cannot be made (under a file): one line too.
        assert cli.main(['train', '--config', smoke_file, '--workdir', str(afile / 'run'),
                         f'--config.data.root={demo_root}']) == 1
        err = capsys.readouterr().err
        assert f'workdir {afile / "run"}: ' in err and 'Traceback' not in err
    # The caller's interrupt handling is as it was.
    import signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_fresh_run_refuses_a_workdir_with_an_earlier_runs_model(tmp_path, demo_root, no_data):
    """No checkpoints to resume but a model/ (an earlier run whose checkpoints were
    removed): a new run there would leave that stale model where load(workdir) looks."""
    os.makedirs(tmp_path / 'run' / 'model')
    with pytest.raises(ConfigError, match=r'holds the model of an earlier run .* '
                                         'no checkpoints to resume'):
        train.train_and_evaluate(_config(demo_root), str(tmp_path / 'run'))


@pytest.mark.parametrize('lr, message', [
    # Parameters of ~1e30 after the first update: their norm overflows float32.
    (1e30, r"the parameters' norm is inf after step 1"),
    # Parameters of ~1e15: finite norm, but the second step's loss is not.
    (1e15, r'the loss is (nan|inf) at step 2'),
])
def test_a_diverged_run_stops_before_saving_what_diverged(lr, message, tmp_path, demo_root):
    """A checkpoint is due after every step: the run stops, naming the step, before the
    checkpoint of the step whose update broke the parameters is written."""
    config = _config(demo_root, optim__warmup_epochs=0.0, train__checkpoint_every_steps=1)
    config.optim.backbone.lr = config.optim.head.lr = lr
    config.optim.backbone.min_lr = config.optim.head.min_lr = lr
    workdir = str(tmp_path / 'run')
    with pytest.raises(train.TrainingDivergedError,
                       match=rf'training diverged: {message}\. Nothing from then on was '
                             r'saved; .* Lower the learning rates'):
        train.train_and_evaluate(config, workdir)
    for step in os.listdir(os.path.join(workdir, 'checkpoints')):
        if step.isdigit():
            params = checkpoint.load(os.path.join(workdir, 'checkpoints', step))
            norm = optax.tree.norm(nnx.state(params, nnx.Param))
            assert np.isfinite(float(norm)), step


def test_a_csv_that_is_there_but_unusable_is_not_called_missing(tmp_path, demo_root, no_data):
    path, folder = _csv_without(tmp_path, demo_root, 'none')
    with open(path) as f:
        text = f.read().replace('image,score,split', 'image,mos,split', 1)
    with open(path, 'w') as f:
        f.write(text)
    config = _config(demo_root, data__dataset='csv', data__root=path)
    config.data.csv.split_column = 'split'
    config.data.csv.images_dir = folder
    with pytest.raises(DataError, match=rf"dataset 'csv' in {path} \(config.data.root\): "
                                              rf".*missing column\(s\) \['score'\]") as e:
        train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert 'not found' not in str(e.value) and 'demo' not in str(e.value)
    assert '(config.data.csv.image_column, score_column, split_column' in str(e.value)
    # The same CSV as a cross-dataset set: read with the default columns, whatever
    # config.data.csv says, and the message says so.
    config = _config(demo_root, data__cross_datasets=f'csv={path}')
    with pytest.raises(DataError, match=rf"dataset 'csv' in {path} "
                                        rf"\(config.data.cross_datasets\): .*missing column") as e:
        train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert 'read with the columns image and score' in str(e.value)
    assert 'config.data.csv' not in str(e.value)


def test_negative_rates_and_decay_are_refused():
    config = smoke.get_config()
    config.optim.backbone.lr, config.optim.head.weight_decay = -1.0, -0.1
    with pytest.raises(ConfigError, match=r'optim.backbone.lr must be at least 0, got -1.0; '
                                          r'optim.head.weight_decay must be at least 0'):
        train_config.check_config(config)
