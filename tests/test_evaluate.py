"""evaluate: Table III from small datasets in their real layouts; numbers equal scipy's on
the saved per-image predictions; missing data named."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import scipy.stats

from smartiqa_jax import evaluate
from tests import test_data_fixtures as fixtures

FAST = ['--crops', '1', '--crop-mode', 'center', '--batch-size', '4', '--no-progress']


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    fixtures.make_koniq(str(root / 'koniq10k'), n=12)
    fixtures.make_spaq(str(root / 'spaq'), n=20)
    fixtures.make_kadid(str(root / 'kadid10k'), refs=10, per_ref=2)
    fixtures.make_agiqa(str(root / 'AGIQA-3K'), n=20)
    return root


def _read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_table3_from_fixture_datasets_matches_scipy(ckpt, data_root, tmp_path, capsys):
    out = tmp_path / 'eval'
    status = evaluate.main(['--checkpoint', ckpt, '--datasets', 'koniq,spaq,kadid,agiqa',
                            '--data-root', str(data_root), '--output-dir', str(out), '--logistic',
                            *FAST])
    assert status == 0
    printed = capsys.readouterr().out
    table = (out / 'table3.md').read_text()
    assert table.strip() in printed
    header = [line for line in table.splitlines() if line.startswith('| Model |')][0]
    for title in ('KonIQ-10k', 'SPAQ', 'KADID-10K', 'AGIQA-3K', 'Average'):
        assert f'{title} SRCC | {title} PLCC' in header
    assert 'PLCC is raw' in table and 'logistic fit' in table

    summary = {row['dataset']: row for row in _read_csv(out / 'table3.csv')}
    assert list(summary) == ['koniq', 'spaq', 'kadid', 'agiqa', 'average']
    srccs, plccs = [], []
    for key in ('koniq', 'spaq', 'kadid', 'agiqa'):
        rows = _read_csv(out / f'predictions_{key}.csv')
        assert all(r['error'] == '' for r in rows)
        pred = np.array([float(r['score']) for r in rows])
        label = np.array([float(r['label']) for r in rows])
        assert int(summary[key]['n_images']) == len(rows) >= 4
        srcc = scipy.stats.spearmanr(pred, label)[0]
        plcc = scipy.stats.pearsonr(pred, label)[0]
        assert float(summary[key]['srcc']) == pytest.approx(srcc, abs=1e-12)
        assert float(summary[key]['plcc']) == pytest.approx(plcc, abs=1e-12)
        assert float(summary[key]['rmse']) == pytest.approx(np.sqrt(np.mean((pred - label) ** 2)))
        srccs.append(srcc)
        plccs.append(plcc)
        # The table prints the same numbers, to 4 decimals.
        assert f'{srcc:.4f} | {plcc:.4f}' in table
    assert float(summary['average']['srcc']) == pytest.approx(np.mean(srccs), abs=1e-12)
    assert float(summary['average']['plcc']) == pytest.approx(np.mean(plccs), abs=1e-12)
    results = json.loads((out / 'results.json').read_text())
    # A model without its training config (as released) trained on KonIQ: its test split
    # there, and the other datasets whole, as cross-dataset tests take them.
    assert results['splits'] == {'koniq': 'test', 'spaq': 'all', 'kadid': 'all',
                                 'agiqa': 'all'} and 'raw' in results['plcc']
    assert results['datasets']['koniq']['n_images'] == 4  # official split: every third image
    from smartiqa_jax import data
    assert results['datasets']['spaq']['n_images'] == sum(
        len(v) for v in data.load_splits('spaq', str(data_root / 'spaq')).splits.values())
    assert 'KonIQ-10k test, SPAQ all, KADID-10K all, AGIQA-3K all' in table
    assert [summary[k]['split'] for k in summary] == ['test', 'all', 'all', 'all', 'test+all']


def test_your_own_csv_with_its_own_columns(ckpt, tmp_path, capsys):
    source = fixtures.make_csv_folder(str(tmp_path / 'mine'), n=10)
    own = tmp_path / 'mine' / 'my_labels.csv'
    with open(own, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['file', 'mos', 'set'])
        writer.writerows([r['image'], float(r['score']) / 2 + 1, ('dev', 'test', 'training')[i % 3]]
                         for i, r in enumerate(_read_csv(source)))
    out = tmp_path / 'eval'
    assert evaluate.main(['--checkpoint', ckpt, '--datasets', 'csv', '--csv-root', str(own),
                          '--csv-image-column', 'file', '--csv-score-column', 'mos',
                          '--csv-score-range', '1,5.5', '--split', 'all',
                          '--output-dir', str(out), *FAST]) == 0
    rows = _read_csv(out / 'predictions_csv.csv')
    assert len(rows) == 10 and all(r['error'] == '' for r in rows)
    pred, label = (np.array([float(r[k]) for r in rows]) for k in ('score', 'label'))
    assert sorted(label) == [i / 2 + 1 for i in range(10)]
    summary = {row['dataset']: row for row in _read_csv(out / 'table3.csv')}
    assert float(summary['csv']['srcc']) == pytest.approx(scipy.stats.spearmanr(pred, label)[0])
    # A split column: a split takes its rows; 'all' takes every row, also the 4 rows of a
    # split ('dev') that no reader knows.
    columns = dict(image_column='file', score_column='mos', split_column='set',
                   score_range=(1.0, 5.5))
    assert len(evaluate.read_records('csv', str(own), 'test', columns)) == 3
    assert len(evaluate.read_records('csv', str(own), 'all', columns)) == 10
    # Rows the reader leaves out (a missing file, a score that is no number) are counted in
    # the results beside the images that failed to decode, not dropped without a trace.
    (tmp_path / 'mine' / 'broken.png').write_bytes(b'not an image')
    with open(own, 'a', newline='') as f:
        csv.writer(f).writerows([['gone.png', 3, 'test'], [rows[0]['name'], 'n/a', 'test'],
                                 ['broken.png', 2, 'test']])
    assert evaluate.main(['--checkpoint', ckpt, '--datasets', 'csv', '--csv-root', str(own),
                          '--csv-image-column', 'file', '--csv-score-column', 'mos',
                          '--csv-score-range', '1,5.5', '--split', 'all',
                          '--output-dir', str(out), *FAST]) == 0
    summary = {row['dataset']: row for row in _read_csv(out / 'table3.csv')}
    counts = [summary['csv'][k] for k in ('n_images', 'n_failed', 'n_excluded')]
    assert counts == ['10', '1', '2']
    results = json.loads((out / 'results.json').read_text())['datasets']['csv']
    assert (results['n_excluded'], results['excluded']) == (
        2, {'file listed but missing': 1, 'score is not a number': 1})
    assert '| csv | all | 10 | 1 | 2 |' in (out / 'table3.md').read_text().replace('CSV', 'csv')
    capsys.readouterr()
    assert evaluate.main(['--checkpoint', ckpt, '--datasets', 'csv', *FAST]) == 2
    assert '--datasets csv needs --csv-root FILE' in capsys.readouterr().err
    assert evaluate.main(['--checkpoint', ckpt, '--datasets', 'csv', '--csv-root', str(own),
                          '--csv-score-range', '1-5', *FAST]) == 2
    assert "--csv-score-range takes LOW,HIGH, got '1-5'" in capsys.readouterr().err
    assert evaluate.main(['--checkpoint', ckpt, '--datasets', 'csv', '--csv-root', str(own),
                          *FAST]) == 2
    assert "missing column(s) ['image', 'score']" in capsys.readouterr().err


def test_missing_dataset_names_where_it_looked(ckpt, data_root, tmp_path, capsys):
    assert evaluate.main(['--checkpoint', ckpt, '--datasets', 'koniq,kadid',
                          '--data-root', str(tmp_path), *FAST]) == 2
    err = capsys.readouterr().err
    assert 'KonIQ-10k: not found; looked in' in err and str(tmp_path / 'koniq10k') in err
    assert evaluate.main(['--checkpoint', ckpt, '--datasets', 'spaq',
                          '--spaq-root', str(tmp_path / 'nowhere'), *FAST]) == 2
    assert str(tmp_path / 'nowhere') in capsys.readouterr().err
    assert evaluate.main(['--checkpoint', ckpt, '--datasets', 'tid2013',
                          '--data-root', str(data_root), *FAST]) == 2
    assert "unknown dataset 'tid2013'" in capsys.readouterr().err


def test_an_unusable_output_dir_stops_the_run_before_scoring(ckpt, data_root, tmp_path, capsys,
                                                              monkeypatch):
    scored = []
    monkeypatch.setattr(evaluate, 'evaluate_records', lambda *a, **k: scored.append(1))
    a_file = tmp_path / 'results'
    a_file.write_text('not a folder')
    for out, why in ((a_file, 'a file, not a folder'),
                     (a_file / 'sub', 'cannot create the folder (Not a directory)')):
        assert evaluate.main(['--checkpoint', ckpt, '--datasets', 'koniq',
                              '--data-root', str(data_root), '--output-dir', str(out),
                              *FAST]) == 2
        assert capsys.readouterr().err == f'error: --output-dir {out}: {why}\n'
    assert not scored and a_file.read_text() == 'not a folder'


def test_a_failing_run_keeps_the_predictions_of_the_datasets_it_scored(ckpt, data_root,
                                                                       tmp_path, monkeypatch):
    score = evaluate.evaluate_records

    def fails_on_spaq(scorer, records, prep, **kwargs):
        if kwargs['desc'] == 'SPAQ':
            raise RuntimeError('out of memory')
        return score(scorer, records, prep, **kwargs)

    monkeypatch.setattr(evaluate, 'evaluate_records', fails_on_spaq)
    out = tmp_path / 'eval'
    with pytest.raises(RuntimeError, match='out of memory'):
        evaluate.main(['--checkpoint', ckpt, '--datasets', 'koniq,spaq', '--data-root',
                       str(data_root), '--output-dir', str(out), *FAST])
    assert len(_read_csv(out / 'predictions_koniq.csv')) == 4
    assert not (out / 'predictions_spaq.csv').exists()


def test_a_dataset_stopped_part_way_keeps_the_rows_it_scored(tmp_path, monkeypatch):
    from smartiqa_jax import data, predict
    scale = data.ScoreScale('mos', 0.0, 5.0)
    records = [data.Record(image=f'/d/{i}.jpg', score=float(i), name=f'{i}.jpg', scale=scale)
               for i in range(6)]

    def two_batches_then_stop(scorer, paths, prep, workers=0):
        for start in (0, 3):
            yield [predict.Result(p, score=1.5 * i) for i, p in enumerate(paths[start:start + 3])]
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, 'score_files', two_batches_then_stop)
    out = tmp_path / 'predictions_csv.csv'
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_records(None, records, None, progress=False, predictions=str(out))
    rows = _read_csv(out)
    assert [r['name'] for r in rows] == [f'{i}.jpg' for i in range(6)]
    assert [r['label'] for r in rows] == [str(float(i)) for i in range(6)]


def test_logistic_plcc_recovers_a_monotonic_link():
    rng = np.random.default_rng(0)
    pred = rng.uniform(-3, 3, 200)
    target = evaluate.logistic_4(pred, 90, 10, 0.5, 0.8) + rng.normal(0, 0.5, 200)
    raw = scipy.stats.pearsonr(pred, target)[0]
    fitted = evaluate.plcc_after_logistic(pred, target)
    assert fitted > raw and fitted > 0.99
    assert math.isnan(evaluate.plcc_after_logistic(np.ones(10), target[:10]))
    # Predictions that fall as the labels rise keep the sign SRCC gives them.
    assert evaluate.plcc_after_logistic(-pred, target) == pytest.approx(-fitted, abs=1e-6)


def test_a_training_runs_model_is_tested_on_the_split_that_run_made(ckpt, data_root, tmp_path,
                                                                     capsys):
    """A model whose training run read this CSV (its split column, columns, seed) or this
    seeded dataset (its split seed): without flags, the test split is the one that run
    held out; the flags given still win."""
    from flax import nnx

    from smartiqa_jax import checkpoint
    from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
    fixtures.make_csv_folder(str(tmp_path / 'mine'), n=12)
    own = tmp_path / 'mine' / 'my_labels.csv'
    with open(own, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['file', 'mos', 'set'])
        writer.writerows([f'images/img{i:03d}.png', i, ('test', 'train')[i % 2]]
                         for i in range(12))
    model = SmartIQA(ModelConfig('nano'), rngs=nnx.Rngs(0))
    training = {'data': {'dataset': 'csv', 'root': '/moved/elsewhere/my_labels.csv',
                         'split_seed': 3, 'csv': {'image_column': 'file', 'score_column': 'mos',
                                                  'split_column': 'set', 'score_range': [0, 11]}}}
    trained = checkpoint.save_model(tmp_path / 'trained', model, training_config=training)
    out = tmp_path / 'eval'
    assert evaluate.main(['--checkpoint', str(trained), '--datasets', 'csv', '--csv-root',
                          str(own), '--output-dir', str(out), *FAST]) == 0
    assert "the test split as the checkpoint's training run made it" in capsys.readouterr().err
    labels = sorted(float(r['label']) for r in _read_csv(out / 'predictions_csv.csv'))
    assert labels == [0, 2, 4, 6, 8, 10]                 # the 'test' rows only
    # A flag given wins: no split column, so a seeded 0.7/0.1/0.2 split of all 12.
    assert evaluate.main(['--checkpoint', str(trained), '--datasets', 'csv', '--csv-root',
                          str(own), '--csv-split-column', '', '--output-dir', str(out),
                          *FAST]) == 0
    assert len(_read_csv(out / 'predictions_csv.csv')) != 6
    # SPAQ has no official split: the run's split seed picks its test images.
    training = {'data': {'dataset': 'spaq', 'root': '/data/spaq', 'split_seed': 5}}
    spaq_model = checkpoint.save_model(tmp_path / 'spaq', model, training_config=training)
    names = {}
    for label, path in (('run', spaq_model), ('plain', ckpt)):
        assert evaluate.main(['--checkpoint', str(path), '--datasets', 'spaq', '--spaq-root',
                              str(data_root / 'spaq'), '--output-dir', str(out), *FAST]) == 0
        names[label] = {r['name'] for r in _read_csv(out / 'predictions_spaq.csv')}
    from smartiqa_jax import data
    expected = {r.name for r in data.load_splits('spaq', str(data_root / 'spaq'), seed=5)['test']}
    assert names['run'] == expected != names['plain']
    # A CSV's image folder comes along only for the very file the run read (~ expanded):
    # another labels.csv, or this one moved, finds its images beside it.
    trained_csv = {'data': {'dataset': 'csv', 'root': '~/a/labels.csv',
                            'csv': {'images_dir': '~/a/photos', 'score_column': 'mos'}}}
    home = os.path.expanduser('~')
    same = evaluate.trained_split_options(trained_csv, 'csv', f'{home}/a/labels.csv')
    assert same['images_dir'] == f'{home}/a/photos' and same['score_column'] == 'mos'
    other = evaluate.trained_split_options(trained_csv, 'csv', '/data/b/labels.csv')
    assert 'images_dir' not in other and other['score_column'] == 'mos'
    assert evaluate.trained_split_options(trained_csv, 'csv', '/data/b/mine.csv') is None


def test_the_default_split_is_the_held_out_one_where_the_model_trained_and_all_elsewhere():
    spaq_run = {'data': {'dataset': 'spaq', 'split_seed': 2}}
    assert evaluate.default_split('koniq', {}, None) == 'test'      # released: KonIQ
    assert evaluate.default_split('spaq', {}, None) == 'all'
    assert evaluate.default_split('koniq', spaq_run, None) == 'all'
    assert evaluate.default_split(
        'spaq', spaq_run, evaluate.trained_split_options(spaq_run, 'spaq', '/d/spaq')) == 'test'


def test_default_output_folders_of_different_checkpoints_differ():
    assert evaluate.output_name('/w/run_a/checkpoints/3') == 'run_a_step3'
    assert evaluate.output_name('/w/run_b/') == 'run_b'
    assert evaluate.output_name('released/smart_iqa_koniq.pth') == 'smart_iqa_koniq'
    assert evaluate.output_name('/w/run_a/model') == 'run_a'
