"""Fine-tuning on the user's own data: config.model.init_from and config.data.csv."""

import csv
import glob
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from configs import base, smoke
from smartiqa_jax import (checkpoint, sharding, train, train_config, train_data, train_params,
                          weights)
from smartiqa_jax.data import DataError, ScoreScale
from smartiqa_jax.models.smartiqa import SmartIQA
from tests.test_train import _cli


@pytest.fixture(scope='module')
def own_csv(tmp_path_factory, demo_root):
    """The demo photos listed the way a user might: other column and split names, MOS 1..5,
    paths relative to an images folder that is not the CSV's. Returns (csv path, images
    folder, {split: rows})."""
    [labels] = glob.glob(os.path.join(demo_root, '*', 'labels.csv'))
    folder = os.path.dirname(labels)
    names = {'train': 'training', 'validation': 'val', 'test': 'test'}
    rows = {split: [] for split in names}
    with open(labels) as f:
        for row in csv.DictReader(f):
            if len(rows[row['split']]) < 12:
                rows[row['split']].append({'file': row['image'], 'set': names[row['split']],
                                           'scene': row['source'],
                                           'mos': f'{1 + 4 * float(row["score"]) / 100:.4f}'})
    path = tmp_path_factory.mktemp('own') / 'my_labels.csv'
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, ['file', 'mos', 'set', 'scene'])
        writer.writeheader()
        for split_rows in rows.values():
            writer.writerows(split_rows)
    return str(path), folder, rows


def _csv_config(own_csv, split_column='set'):
    path, folder, _ = own_csv
    config = smoke.get_config()
    config.data.dataset = 'csv'
    config.data.root = path
    config.data.label_name = ''                      # from the data: 'csv mos'
    config.data.csv.image_column = 'file'
    config.data.csv.score_column = 'mos'
    config.data.csv.split_column = split_column
    config.data.csv.images_dir = folder
    config.data.csv.score_range = (1.0, 5.0)
    return config


def test_csv_columns_split_names_and_label_scale_come_from_the_config(own_csv):
    _, folder, rows = own_csv
    config = _csv_config(own_csv)
    splits = train_data.load_splits(config.data.dataset, config.data.root,
                                    seed=config.data.split_seed, csv=config.data.csv)
    for split, split_rows in rows.items():      # 'training' and 'val' mapped to ours
        assert [r.image for r in splits[split]] == [
            os.path.join(folder, r['file']) for r in split_rows]
        assert [r.score for r in splits[split]] == [float(r['mos']) for r in split_rows]
    scale = splits['train'][0].scale
    assert scale == ScoreScale('mos', 1.0, 5.0)
    model_config = train_config.model_config_from(config, scale)
    assert (model_config.label_name, model_config.label_range) == ('csv mos', (1.0, 5.0))
    # The config's own label settings win over the data's.
    config.data.label_name, config.data.label_range = 'my MOS', (0.0, 10.0)
    model_config = train_config.model_config_from(config, scale)
    assert (model_config.label_name, model_config.label_range) == ('my MOS', (0.0, 10.0))
    # KonIQ's defaults are unchanged: the name and range come from its reader's scale.
    koniq = train_config.model_config_from(base.get_config(), ScoreScale('MOS_zscore', 0.0, 100.0))
    assert (koniq.label_name, koniq.label_range) == ('koniq10k MOS_zscore', (0.0, 100.0))


def test_split_seed_reaches_a_seeded_split_and_groups_stay_together(own_csv):
    config = _csv_config(own_csv, split_column='')
    config.data.csv.group_column = 'scene'

    def train_images(seed):
        splits = train_data.load_splits('csv', config.data.root, seed=seed, csv=config.data.csv)
        scenes = [{os.path.basename(r.image).split('_r')[0] for r in splits[s]}
                  for s in ('train', 'validation', 'test')]
        assert not (scenes[0] & scenes[1] or scenes[0] & scenes[2] or scenes[1] & scenes[2])
        return sorted(r.image for r in splits['train'])

    assert train_images(0) == train_images(0)
    assert any(train_images(seed) != train_images(0) for seed in (1, 2, 3))


def test_bad_csv_settings_are_named(own_csv, tmp_path):
    config = _csv_config(own_csv)
    config.data.csv.score_column = 'quality'
    # There but unusable: a DataError saying what is wrong, not "not found".
    with pytest.raises(DataError, match=r"missing column\(s\) \['quality'\]"):
        train_data.load_splits('csv', config.data.root, csv=config.data.csv)
    config = _csv_config(own_csv)
    config.data.csv.score_range = (1.0, 3.0, 5.0)
    with pytest.raises(ValueError, match='score_range must be'):
        train_data.load_splits('csv', config.data.root, csv=config.data.csv)


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _scores(model, params, images):
    """Scores of `model`'s architecture with `params` (a pure dict) in place of its own."""
    model = nnx.merge(*nnx.split(model))              # a copy
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model.predict(images)['score']


def test_fine_tuning_starts_from_the_checkpoint_mapped_onto_the_new_label_range(
        own_csv, ckpt, tmp_path, capsys):
    config = _csv_config(own_csv)
    config.model.init_from = ckpt                    # nano, attention, KonIQ's 0..100
    config.model.variant, config.model.fusion = 'pico', 'multiscale'
    config.model.hyper_conv_init = 'kaiming'
    source = checkpoint.load(ckpt)

    init = train_params.load_init_model(config)
    adopted = config.copy_and_resolve_references()
    notes = train_params.adopt_architecture(adopted, init.config)
    assert (adopted.model.variant, adopted.model.fusion) == ('nano', 'attention')
    assert any("model.variant: 'nano'" in n and "'pico'" in n for n in notes)
    assert any('hyper_conv_init' in n and 'not applied' in n for n in notes)

    model_config = train_config.model_config_from(adopted, ScoreScale('mos', 1.0, 5.0))
    assert train_params.label_range_map((0.0, 100.0), (1.0, 5.0)) == pytest.approx((0.04, 1.0))
    assert train_params.label_range_map((1.0, 5.0), (1.0, 5.0)) is None
    _, _, params = train_params.build_params(adopted, model_config, sharding.make_mesh(),
                                             mean_label=3.0, score_scale=2.0, init=init)
    start, loaded = jax.device_get(params), _params(source)
    # Every parameter is the checkpoint's, the score layers mapped 0..100 -> 1..5.
    for path, value in jax.tree_util.tree_leaves_with_path(loaded):
        got = start
        for key in path:
            got = got[key.key]
        if path[0].key in ('w5_fc', 'b5_fc'):
            continue
        np.testing.assert_array_equal(got, value, err_msg=jax.tree_util.keystr(path))
    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(_scores(source, start, images),
                               0.04 * _scores(source, loaded, images) + 1.0, rtol=1e-5)

    # The real trainer: it says what it adopted and mapped, and the model it writes is a
    # nano/attention model on 1..5; the caller's config is left as it was.
    config.train.num_epochs, config.train.max_steps_per_epoch = 1, 1
    workdir = tmp_path / 'run'
    summary = train.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert f'Fine-tuning nano/attention from {ckpt}' in out
    assert 'scores mapped from (0.0, 100.0) to (1.0, 5.0): 0.04 * score +1' in out
    assert "model.fusion: 'attention' from model.init_from (the config said 'multiscale')" in out
    assert summary['steps'] == 1 and np.isfinite(summary['results']['test']['srcc'])
    tuned = checkpoint.load(workdir)
    assert (tuned.config.variant, tuned.config.fusion) == ('nano', 'attention')
    assert (tuned.config.label_name, tuned.config.label_range) == ('csv mos', (1.0, 5.0))
    assert config.model.variant == 'pico'

    # Resuming (here the finished run: its test again) reads its own checkpoint, not the
    # file it started from, which may have moved; and it does not say "Fine-tuning".
    config.model.init_from = str(tmp_path / 'moved_away')
    again = train.train_and_evaluate(config, str(workdir))
    out = capsys.readouterr().out
    assert 'Fine-tuning' not in out and 'Resumed from step 1' in out
    assert again['results']['test']['srcc'] == pytest.approx(summary['results']['test']['srcc'])
    # Or with no init_from at all: the architecture is still the one the run adopted.
    config.model.init_from = ''
    again = train.train_and_evaluate(config, str(workdir))
    assert 'Resumed from step 1' in capsys.readouterr().out
    assert again['results']['test']['srcc'] == pytest.approx(summary['results']['test']['srcc'])


def test_init_from_a_released_pytorch_file(ckpt, tmp_path, demo_root):
    source = checkpoint.load(ckpt)
    path = str(tmp_path / 'released.safetensors')
    save_file(weights.export_state_dict(source), path)

    model = checkpoint.load(path)                    # smartiqa_jax.load reads it too
    assert isinstance(model, SmartIQA)
    assert (model.config.variant, model.config.fusion) == ('nano', 'attention')
    images = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(images)['score'],
                               source.predict(images)['score'], rtol=1e-5, atol=1e-5)

    config = smoke.get_config()
    config.model.init_from = path
    init = train_params.load_init_model(config)
    jax.tree.map(np.testing.assert_array_equal, _params(init), _params(source))


def test_a_bad_init_from_is_named(tmp_path, demo_root):
    config = smoke.get_config()
    config.model.init_from = str(tmp_path / 'nothing')
    with pytest.raises(checkpoint.CheckpointError,
                       match='^config.model.init_from: .*nothing: no such checkpoint'):
        train_params.load_init_model(config)
    timm_file = str(tmp_path / 'swin.safetensors')       # a backbone, not a SMART-IQA model
    save_file({'patch_embed.proj.weight': np.zeros((32, 3, 4, 4), np.float32)}, timm_file)
    config.model.init_from = timm_file
    with pytest.raises(weights.WeightsError, match='not a SMART-IQA state_dict'):
        train_params.load_init_model(config)
    config.model.backbone_weights = timm_file
    with pytest.raises(ValueError, match='init_from and config.model.backbone_weights'):
        train_params.load_init_model(config)

    # On the command line: one line naming the setting and the path, no traceback.
    run = _cli('--config', 'configs/smoke.py', '--workdir', str(tmp_path / 'w'),
               f'--config.data.root={demo_root}', f'--config.model.init_from={tmp_path / "nothing"}')
    assert run.returncode != 0
    assert f'config.model.init_from: {tmp_path / "nothing"}: no such checkpoint' in run.stderr
    assert 'Traceback' not in run.stderr
