"""predict: scoring folders of good and bad files, exit status, batch independence,
repeatability, interrupted runs, large images, outputs.

A nano SMART-IQA checkpoint and a handful of small images: every test calls
`predict.main` in this process, so the model is built once and each batch shape is
compiled once (and then found in the persistent compilation cache).
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from smartiqa_jax import checkpoint, predict

GOOD = ['photo.jpg', 'gray.png', 'rgba.png', 'sub/nested.jpg', 'large.jpg']
BAD = {  # file -> a word its error message must contain
    'corrupt.jpg': 'not an image',
    'truncated.jpg': 'truncated',
    'empty.jpg': '0 bytes',
    'notes.jpg': 'not an image',
}
FAST = ['--crops', '1', '--crop-mode', 'center', '--batch-size', '4', '--no-progress']


def _texture(height, width, seed):
    """Smooth colour gradients plus noise: realistic JPEG sizes, distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    base += rng.normal(0, 20, (1, 1, 3)) + rng.normal(0, 8, (height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def _jpeg_bytes(height, width, seed):
    out = io.BytesIO()
    Image.fromarray(_texture(height, width, seed)).save(out, 'JPEG', quality=90)
    return out.getvalue()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    (root / 'sub').mkdir()
    Image.fromarray(_texture(300, 400, 0)).save(root / 'photo.jpg')
    Image.fromarray(_texture(240, 260, 1)).convert('L').save(root / 'gray.png')
    rgba = Image.fromarray(_texture(256, 300, 2)).convert('RGBA')
    rgba.putalpha(128)
    rgba.save(root / 'rgba.png')
    Image.fromarray(_texture(260, 230, 3)).save(root / 'sub' / 'nested.jpg')
    (root / 'large.jpg').write_bytes(_jpeg_bytes(3000, 4000, 4))
    (root / 'corrupt.jpg').write_bytes(np.random.default_rng(5).bytes(3000))
    (root / 'truncated.jpg').write_bytes(_jpeg_bytes(300, 400, 6)[:2500])
    (root / 'empty.jpg').write_bytes(b'')
    (root / 'notes.jpg').write_text('these are notes, not a photo\n')
    (root / 'readme.txt').write_text('not collected from a folder: no image extension\n')
    return root


def _read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_folder_with_bad_files_scores_the_good_and_reports_the_bad(ckpt, folder, tmp_path, capsys):
    out = tmp_path / 'scores.csv'
    missing = str(folder / 'missing.jpg')
    status = predict.main(['--checkpoint', ckpt, str(folder), missing, '--output', str(out), *FAST])
    assert status == 1
    rows = {os.path.relpath(r['path'], folder): r for r in _read_csv(out)}
    assert list(_read_csv(out)[0]) == predict.COLUMNS
    assert set(rows) == set(GOOD) | set(BAD) | {'missing.jpg'}  # readme.txt not collected
    for name in GOOD:
        row = rows[name]
        assert row['error'] == '', (name, row['error'])
        assert np.isfinite(float(row['score']))
        weights = [float(row[f'weight_stage{i}']) for i in range(1, 5)]
        assert sum(weights) == pytest.approx(1.0, abs=1e-5)
    for name, word in BAD.items():
        assert rows[name]['score'] == '' and word in rows[name]['error'], rows[name]
    assert 'no such file' in rows['missing.jpg']['error']
    err = capsys.readouterr().err
    assert 'scored 5 images, failed 5' in err
    # The model line says what computes: 'auto' window attention is XLA's on a CPU.
    assert 'float32, xla window attention' in err
    assert f'{folder / "truncated.jpg"}:' in err  # warnings name the file


def test_exit_status_all_good_json_and_usage_errors(ckpt, folder, tmp_path, capsys):
    out = tmp_path / 'scores.json'
    good = [str(folder / n) for n in ('photo.jpg', 'gray.png')]
    assert predict.main(['--checkpoint', ckpt, *good, '--output', str(out), *FAST]) == 0
    rows = json.loads(out.read_text())
    assert [r['path'] for r in rows] == good and all(r['error'] == '' for r in rows)

    empty = tmp_path / 'empty_folder'
    empty.mkdir()
    assert predict.main(['--checkpoint', ckpt, str(empty), *FAST]) == 2
    assert predict.main(['--checkpoint', ckpt, str(tmp_path / 'none*.jpg'), *FAST]) == 2
    assert predict.main(['--checkpoint', str(tmp_path / 'no_ckpt'), *good, *FAST]) == 2
    assert predict.main(['--checkpoint', ckpt, *good, '--resize', '512by384', *FAST]) == 2
    assert predict.main(['--checkpoint', ckpt, *good, '--crop-mode', 'center', '--crops', '3']) == 2
    assert predict.main(['--checkpoint', ckpt, *good, '--output', str(tmp_path / 'x.xlsx')]) == 2
    assert predict.main(['--checkpoint', ckpt, *good, '--bogus']) == 2
    assert predict.main(['--checkpoint', ckpt, *good, '--seed', '-1']) == 2
    assert predict.main(['--checkpoint', ckpt, *good, '--attention', 'pallas', *FAST]) == 2
    err = capsys.readouterr().err
    assert 'no input images found' in err and 'no_ckpt' in err and '512by384' in err
    assert '--seed must be 0 or more, got -1' in err
    assert "--attention: attention='pallas' runs on GPUs" in err   # once, before any file


def test_flag_values_that_cannot_work_are_usage_errors(ckpt, folder, tmp_path, capsys,
                                                         monkeypatch):
    def never(path, prep):
        raise AssertionError(f'{path} read before the flags were checked')

    monkeypatch.setattr(predict, 'prepare_file', never)
    good = [str(folder / 'photo.jpg')]
    folder_csv = tmp_path / 'd.csv'
    folder_csv.mkdir()
    assert predict.main(['--checkpoint', ckpt, *good, '--workers', '-1', *FAST]) == 2
    assert predict.main(['--checkpoint', ckpt, *good, '--max-pixels', '-5', *FAST]) == 2
    assert predict.main(['--checkpoint', ckpt, *good, '--output', str(folder_csv), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        'error: --workers must be 0 (min(4, CPUs)) or more, got -1',
        'error: --max-pixels must be at least 1, got -5',
        f'error: --output {folder_csv}: is a folder; give a file name ending in .csv, .json '
        'or .jsonl']


def test_one_bad_file_never_stops_the_run(ckpt, folder, tmp_path, monkeypatch):
    """A strip the resize would blow up (224 x 112000 pixels from 1 x 500, over PIL's limit,
    lowered here so that without the check the resize stays small), and any other exception
    while preparing a file, are that file's error; the files after them are still scored."""
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 150_000)
    inputs = tmp_path / 'inputs'
    inputs.mkdir()
    Image.fromarray(np.full((1, 500, 3), 128, np.uint8)).save(inputs / 'a_line.png')
    (inputs / 'b_oom.jpg').write_bytes((folder / 'gray.png').read_bytes())
    (inputs / 'c_photo.jpg').write_bytes((folder / 'photo.jpg').read_bytes())
    load_image = predict.load_image

    def out_of_memory(data, prep, name='<bytes>'):
        if name.endswith('b_oom.jpg'):
            raise MemoryError
        return load_image(data, prep, name)

    monkeypatch.setattr(predict, 'load_image', out_of_memory)
    for resize in ('none', 'short:224'):
        out = tmp_path / f'{resize[:5]}.csv'
        assert predict.main(['--checkpoint', ckpt, str(inputs), '--resize', resize,
                             '--output', str(out), *FAST]) == 1
        rows = {os.path.basename(r['path']): r for r in _read_csv(out)}
        assert rows['a_line.png']['error'] == (
            'resized image over the pixel limit (1x500 to 224x112000, height x width: '
            '25088000 pixels > 150000)'), resize
        assert rows['b_oom.jpg']['error'] == 'cannot prepare image (MemoryError)'
        assert rows['c_photo.jpg']['error'] == '' and rows['c_photo.jpg']['score']


def test_a_non_finite_score_is_that_files_error(ckpt, folder, tmp_path, monkeypatch, capsys):
    original = predict.Scorer.__call__

    def diverged_on_the_first(self, crops):
        out = original(self, crops)
        out['score'][0] = np.nan
        return out

    monkeypatch.setattr(predict.Scorer, '__call__', diverged_on_the_first)
    out = tmp_path / 'scores.csv'
    good = [str(folder / n) for n in ('photo.jpg', 'gray.png')]
    assert predict.main(['--checkpoint', ckpt, *good, '--output', str(out), *FAST]) == 1
    first, second = _read_csv(out)
    assert first['score'] == '' and first['weight_stage1'] == ''
    assert first['error'] == ('the model gave a non-finite score (nan): the checkpoint is '
                              'diverged or broken')
    assert second['error'] == '' and np.isfinite(float(second['score']))
    assert 'scored 1 image, failed 1' in capsys.readouterr().err
    # In JSON a missing value is null, not an empty string.
    out = tmp_path / 'scores.json'
    assert predict.main(['--checkpoint', ckpt, *good, '--output', str(out), *FAST]) == 1
    first, second = json.loads(out.read_text())
    assert first['score'] is None and first['weight_stage1'] is None and first['error']
    assert isinstance(second['score'], float) and second['error'] == ''
    # evaluate keeps the NaN: the metrics of a partly diverged model are NaN, not those of
    # the images it still scores.
    from smartiqa_jax import evaluate
    from smartiqa_jax.data import ScoreScale
    from smartiqa_jax.data.readers import Record
    scale = ScoreScale('score', 0.0, 100.0, True)
    records = [Record(str(folder / n), float(i), n, scale)
               for i, n in enumerate(('photo.jpg', 'gray.png', 'photo.jpg', 'gray.png'))]
    model, prep, _ = predict.load_for_scoring(predict._parser().parse_args(
        ['--checkpoint', ckpt, 'x', *FAST]))
    scorer = predict.Scorer(model, 2, prep.crops, prep.crop_size)
    result = evaluate.evaluate_records(scorer, records, prep, progress=False)
    assert result['n_images'] == 4 and np.isnan(result['metrics']['srcc'])


def test_file_names_that_are_not_utf8_are_written_back_as_they_are(ckpt, folder, tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b'b\xff.jpg')
    try:
        with open(raw, 'wb') as f:
            f.write((folder / 'photo.jpg').read_bytes())
    except OSError:
        if os.environ.get('CI'):   # CI's file system takes any bytes: never skipped there
            raise
        pytest.skip('this file system takes only valid UTF-8 names')
    name = os.fsdecode(raw)
    for suffix in ('csv', 'jsonl', 'json'):
        out = tmp_path / f'scores.{suffix}'
        assert predict.main(['--checkpoint', ckpt, name, '--output', str(out), *FAST]) == 0
        if suffix == 'csv':
            assert raw in out.read_bytes()
            with open(out, newline='', errors='surrogateescape') as f:
                (row,) = list(csv.DictReader(f))
        else:
            rows = json.loads(out.read_text()) if suffix == 'json' else [
                json.loads(line) for line in out.read_text().splitlines()]
            (row,) = rows
        assert row['path'] == name and row['error'] == '', suffix
    stdout = io.TextIOWrapper(io.BytesIO(), encoding='utf-8', newline='')
    writer = predict.RowWriter(None, stdout)
    writer.write([predict.Result(name, error='x')])
    stdout.flush()
    assert raw + b',,,,,,x' in stdout.buffer.getvalue()


def test_a_released_pytorch_file_scores_as_its_converted_checkpoint(ckpt, folder, tmp_path,
                                                                     capsys):
    from safetensors.numpy import save_file

    from smartiqa_jax import weights
    released = tmp_path / 'released.safetensors'
    save_file(weights.export_state_dict(checkpoint.load(ckpt)), released)
    good = [str(folder / n) for n in ('photo.jpg', 'gray.png')]
    scores = {}
    for name, source in (('converted', ckpt), ('released', str(released))):
        out = tmp_path / f'{name}.csv'
        assert predict.main(['--checkpoint', source, *good, '--output', str(out), *FAST]) == 0
        scores[name] = [float(r['score']) for r in _read_csv(out)]
    assert scores['released'] == pytest.approx(scores['converted'], abs=1e-4)
    assert f'from {released} ' in capsys.readouterr().err
    broken = tmp_path / 'broken.pth'
    broken.write_bytes(b'not a state_dict')
    assert predict.main(['--checkpoint', str(broken), *good, *FAST]) == 2
    assert f'--checkpoint {broken}: {broken}: not a PyTorch checkpoint' in capsys.readouterr().err


def test_scores_do_not_depend_on_batch_neighbours_and_repeat(ckpt, folder, tmp_path):
    names = ['photo.jpg', 'gray.png', 'rgba.png', 'sub/nested.jpg', 'large.jpg']
    paths = [str(folder / n) for n in names]
    flags = ['--crops', '2', '--crop-mode', 'random', '--seed', '3', '--no-progress']

    def run(inputs, batch, name, extra=()):
        out = tmp_path / name
        assert predict.main(['--checkpoint', ckpt, *inputs, '--batch-size', str(batch),
                             '--output', str(out), *flags, *extra]) == 0
        return {r['path']: r for r in _read_csv(out)}

    alone = run(paths[:1], 1, 'alone.csv')
    crowd = run(paths[::-1], 4, 'crowd.csv')  # photo.jpg last: in the padded second batch
    again = run(paths[::-1], 4, 'again.csv')
    assert float(alone[paths[0]]['score']) == pytest.approx(float(crowd[paths[0]]['score']), abs=1e-5)
    for i in range(1, 5):
        key = f'weight_stage{i}'
        assert float(alone[paths[0]][key]) == pytest.approx(float(crowd[paths[0]][key]), abs=1e-6)
    assert crowd == again  # same command, same output, to the last digit
    other_seed = run(paths[:1], 1, 'seed4.csv', ['--seed', '4'])
    assert other_seed[paths[0]]['score'] != alone[paths[0]]['score']


def test_symmetries_average_the_scores_of_the_mirrored_crop(ckpt, folder, tmp_path, capsys):
    # A 240 x 260 image's centre crop starts at an even offset on both axes, so the centre
    # crop of the mirrored file is the mirrored centre crop.
    mirrored = tmp_path / 'mirrored.png'
    Image.open(folder / 'gray.png').transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    paths = [str(folder / 'gray.png'), str(mirrored)]

    def scores(*flags):
        out = tmp_path / 'out.csv'
        assert predict.main(['--checkpoint', ckpt, *paths, '--resize', 'none', *FAST,
                             '--output', str(out), '--overwrite', *flags]) == 0
        return [float(r['score']) for r in _read_csv(out)]

    plain = scores()
    both = scores('--symmetries', '2')
    assert abs(plain[0] - plain[1]) > 1e-4          # the mirror image scores differently
    assert both[0] == pytest.approx(np.mean(plain), abs=1e-6)
    assert both[1] == pytest.approx(both[0], abs=1e-6)
    assert 'each crop averaged with its mirror image' in capsys.readouterr().err
    assert predict.main(['--checkpoint', ckpt, *paths, '--symmetries', '3', *FAST]) == 2


def test_cpu_devices_shard_the_batch_and_give_the_same_scores(ckpt, folder, tmp_path):
    # The device count is fixed when JAX starts, so the 2-device run is its own process.
    import subprocess
    import sys
    paths = [str(folder / n) for n in ('photo.jpg', 'gray.png', 'rgba.png', 'sub/nested.jpg')]
    flags = ['--checkpoint', ckpt, *paths, '--batch-size', '2', '--crops', '3', '--no-progress']
    assert predict.main([*flags, '--output', str(tmp_path / 'one.csv')]) == 0
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'SMARTIQA_JAX_MALLOC': 'system'}
    run = subprocess.run([sys.executable, '-m', 'smartiqa_jax.predict', *flags, '--cpu-devices',
                          '2', '--output', str(tmp_path / 'two.csv')], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert 'images/s on 2 devices' in run.stderr
    one, two = (_read_csv(tmp_path / f'{n}.csv') for n in ('one', 'two'))
    assert [r['path'] for r in one] == [r['path'] for r in two] == paths
    for a, b in zip(one, two):
        assert float(a['score']) == pytest.approx(float(b['score']), abs=1e-4)
        assert float(a['weight_stage1']) == pytest.approx(float(b['weight_stage1']), abs=1e-5)


def test_one_compilation_for_many_batches(ckpt, folder):
    model = checkpoint.load(ckpt)
    prep = predict.Preprocessing(crops=1, crop_mode='center')
    scorer = predict.Scorer(model, batch_images=2, crops=1)
    paths = [str(folder / n) for n in GOOD]
    before = scorer.compilations
    batches = list(predict.score_files(scorer, paths, prep))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert scorer.compilations - before <= 1  # 0 when an earlier test compiled this shape
    after = scorer.compilations
    list(predict.score_files(predict.Scorer(model, batch_images=2, crops=1), paths[:1], prep))
    assert scorer.compilations == after  # a new scorer of the same shape reuses the program


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash (a real KeyboardInterrupt would also stop pytest)."""


def _stop_at_the_second_batch(monkeypatch, error: type[BaseException]) -> None:
    calls = []
    original = predict.Scorer.__call__

    def failing_second_batch(self, crops):
        calls.append(len(crops))
        if len(calls) == 2:
            raise error
        return original(self, crops)

    monkeypatch.setattr(predict.Scorer, '__call__', failing_second_batch)


def test_interrupted_run_keeps_finished_batches(ckpt, folder, tmp_path, monkeypatch):
    _stop_at_the_second_batch(monkeypatch, Interrupted)
    out = tmp_path / 'partial.csv'
    paths = [str(folder / n) for n in GOOD]
    with pytest.raises(Interrupted):
        predict.main(['--checkpoint', ckpt, *paths, '--output', str(out), *FAST])
    rows = _read_csv(out)
    assert [r['path'] for r in rows] == paths[:4]
    assert all(r['score'] for r in rows)


def test_large_images_are_reduced_and_bombs_refused(folder):
    prep = predict.Preprocessing()
    data = (folder / 'large.jpg').read_bytes()
    pixels = predict.load_image(data, prep, 'large.jpg')
    assert pixels.shape == (512, 384, 3) and pixels.dtype == np.uint8
    # Aspect-preserving resize of a 4000x3000 photo, and no upscaling beyond it.
    assert predict.load_image(data, predict.Preprocessing(resize=600), 'x').shape == (600, 800, 3)
    small = (folder / 'photo.jpg').read_bytes()
    with pytest.raises(predict.preprocess.ImageDecodeError, match='decompression-bomb'):
        predict.load_image(small, predict.Preprocessing(max_pixels=10_000), 'photo.jpg')


def test_early_reduction_stays_close_to_a_full_decode(tmp_path):
    """The cheap paths (JPEG draft, PNG box reduce) give nearly the full-decode result."""
    pixels = _texture(2400, 3200, 7)
    for fmt in ('JPEG', 'PNG'):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, fmt)
        data = out.getvalue()
        full = predict.preprocess.resize_image(predict.preprocess.decode_image(data), (512, 384))
        fast = predict.load_image(data, predict.Preprocessing(), fmt)
        assert fast.shape == full.shape == (512, 384, 3)
        assert np.abs(fast.astype(int) - full.astype(int)).mean() < 2.0, fmt


def test_same_pixels_as_the_training_preprocessing(folder):
    """Below twice the target size nothing is reduced early: exactly decode + resize."""
    data = (folder / 'photo.jpg').read_bytes()
    expected = predict.preprocess.resize_image(
        predict.preprocess.decode_image(data), (512, 384), 224)
    np.testing.assert_array_equal(predict.load_image(data, predict.Preprocessing()), expected)


def test_find_inputs_files_folders_globs(folder):
    found = predict.find_inputs([str(folder / 'sub'), str(folder / '*.png'), str(folder / 'photo.jpg'),
                                 str(folder / 'photo.jpg')])
    assert [os.path.relpath(p, folder) for p in found] == ['sub/nested.jpg', 'gray.png', 'rgba.png',
                                                            'photo.jpg']


@pytest.mark.parametrize('text, spec', [('512x384', (512, 384)), ('short:300', 300), ('none', None),
                                        ('koniq', (512, 384))])
def test_parse_resize(text, spec):
    assert predict.parse_resize(text) == spec


def test_compiled_model_goes_to_the_persistent_cache(ckpt, folder, tmp_path):
    """--compilation-cache-dir (a command of its own: the cache is set up once per process)."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
           'PYTHONPATH': repo + os.pathsep + os.environ.get('PYTHONPATH', '')}
    env.pop('JAX_COMPILATION_CACHE_DIR', None)   # the tests' own cache would take over
    cache = tmp_path / 'xla_cache'
    run = subprocess.run([sys.executable, '-m', 'smartiqa_jax.predict', '--checkpoint', ckpt,
                          str(folder / 'photo.jpg'), '--compilation-cache-dir', str(cache), *FAST],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.listdir(cache), 'nothing was cached'


def test_an_untrained_head_is_said_to_be_one(tmp_path):
    from flax import nnx

    from smartiqa_jax.models.smartiqa import UNTRAINED_HEAD, ModelConfig, SmartIQA
    path = checkpoint.save_model(tmp_path / 'init', SmartIQA(
        ModelConfig('pico', label_name=UNTRAINED_HEAD), rngs=nnx.Rngs(0)))
    log = io.StringIO()
    predict.load_for_scoring(predict._parser().parse_args(['--checkpoint', str(path), 'x',
                                                            *FAST]), log=log)
    assert "warning: this model's head is untrained (convert from-timm)" in log.getvalue()



def test_an_existing_output_is_kept_resumed_or_replaced_only_when_asked(ckpt, folder, tmp_path,
                                                                       capsys):
    paths = [str(folder / n) for n in GOOD]
    for suffix in ('csv', 'jsonl', 'json'):
        out = tmp_path / f'scores.{suffix}'
        assert predict.main(['--checkpoint', ckpt, *paths[:2], '--output', str(out),
                             *FAST]) == 0
        before = out.read_bytes()
        capsys.readouterr()
        assert predict.main(['--checkpoint', ckpt, *paths, '--output', str(out), *FAST]) == 2
        assert f'--output {out} exists: --resume' in capsys.readouterr().err
        assert out.read_bytes() == before
        if suffix != 'json':   # a kill in the middle of a row: resuming cuts it off
            with open(out, 'ab') as f:
                f.write(paths[2].encode() + (b',12.5' if suffix == 'csv' else b'{"pa'))
        assert predict.main(['--checkpoint', ckpt, *paths, '--output', str(out), '--resume',
                             *FAST]) == 0
        assert '2 of the 5 images are in' in capsys.readouterr().err
        rows = (_read_csv(out) if suffix == 'csv' else json.loads(out.read_text())
                if suffix == 'json' else [json.loads(line) for line in out.read_text().splitlines()])
        assert [r['path'] for r in rows] == paths and all(r['error'] in ('', None) for r in rows)
        assert predict.main(['--checkpoint', ckpt, *paths, '--output', str(out), '--resume',
                             *FAST]) == 0   # nothing left to do
        assert predict.main(['--checkpoint', ckpt, paths[0], '--output', str(out),
                             '--overwrite', *FAST]) == 0
        assert out.read_bytes().count(b'photo.jpg') == 1 and b'gray.png' not in out.read_bytes()
    other = tmp_path / 'other.csv'
    other.write_text('name,mos\na.jpg,3')   # not ours, and no newline at its end
    capsys.readouterr()
    assert predict.main(['--checkpoint', ckpt, *paths, '--output', str(other), '--resume',
                         *FAST]) == 2
    assert 'not a scores file of this command' in capsys.readouterr().err
    assert other.read_text() == 'name,mos\na.jpg,3'    # untouched
    assert predict.main(['--checkpoint', ckpt, *paths, '--output', '/proc/scores.csv',
                         *FAST]) == 2
    assert '--output /proc/scores.csv: cannot write there' in capsys.readouterr().err


def test_ctrl_c_keeps_the_finished_batches_and_says_how_to_go_on(ckpt, folder, tmp_path,
                                                                  monkeypatch, capsys):
    _stop_at_the_second_batch(monkeypatch, KeyboardInterrupt)
    out = tmp_path / 'partial.csv'
    paths = [str(folder / n) for n in GOOD]
    assert predict.main(['--checkpoint', ckpt, *paths, '--output', str(out), *FAST]) == 130
    assert f'interrupted: 4 rows written to {out}; the same command with --resume' in \
        capsys.readouterr().err
    assert [r['path'] for r in _read_csv(out)] == paths[:4]


def test_folder_scans_say_what_they_leave_out_and_never_wait_on_a_pipe(folder, tmp_path,
                                                                       ckpt, capsys):
    shots = tmp_path / 'shots'
    (shots / 'deeper').mkdir(parents=True)
    for name in ('a.jpg', 'deeper/b.PNG'):
        (shots / name).write_bytes((folder / 'photo.jpg').read_bytes())
    (shots / 'notes.txt').write_text('x')
    (shots / 'raw.cr2').write_bytes(b'x')
    os.mkfifo(shots / 'stream.jpg')
    os.symlink(shots, shots / 'deeper' / 'loop')          # a link loop is walked once
    empty = []
    found = predict.find_inputs([str(shots), str(shots / 'a.jpg'),
                                 './' + os.path.relpath(shots / 'a.jpg'),
                                 str(tmp_path / 'none*.jpg')], empty=empty)
    assert found == [str(shots / 'a.jpg'), str(shots / 'deeper' / 'b.PNG')]
    err = capsys.readouterr().err
    assert (f'{shots}: left out 3 files that are not images by their extension (.txt 1, .cr2 1, '
            'pipes, sockets, devices 1)') in err
    assert empty == [str(tmp_path / 'none*.jpg')]
    # A pipe named on the command line is an error row, not a run that waits forever; an
    # empty pattern beside it makes the exit status 1.
    out = tmp_path / 'pipe.csv'
    assert predict.main(['--checkpoint', ckpt, str(shots / 'stream.jpg'), str(shots / 'a.jpg'),
                         '--output', str(out), *FAST]) == 1
    rows = _read_csv(out)
    assert rows[0]['error'] == 'not a regular file (a pipe, socket or device)' and rows[1]['score']
    assert predict.main(['--checkpoint', ckpt, str(shots / 'a.jpg'), str(tmp_path / 'no*.png'),
                         '--output', str(tmp_path / 'glob.csv'), *FAST]) == 1
