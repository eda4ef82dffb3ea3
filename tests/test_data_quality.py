"""Bad data never kills a run: each case of the bad-data list, one test each."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from smartiqa_jax.data import pipeline, quality, readers
from tests import test_data_fixtures as fx


def good_rows(root, n=3):
    rows = []
    for i in range(n):
        fx.write_image(os.path.join(root, f'good{i}.jpg'), seed=i)
        rows.append([f'good{i}.jpg', 50.0 + i])
    return rows


def read(root, rows, **kwargs):
    csv_path = fx.write_csv(os.path.join(root, 'labels.csv'), ['image', 'score'], rows)
    return readers.read_csv_folder(csv_path, fractions=(1.0, 0.0, 0.0), **kwargs)


def excluded(splits) -> dict[str, str]:
    return {p.name: p.reason for p in splits.report.problems}


def kept_names(splits):
    return sorted(r.name for recs in splits.splits.values() for r in recs)


# -- files that cannot be decoded: excluded when verified at read/build time


@pytest.mark.parametrize('content, reason', [
    (b'\x00\x01garbage that is no image', 'cannot decode image'),
    (b'%PDF-1.4 a text document, not an image', 'cannot decode image'),
], ids=['garbage', 'pdf'])
def test_corrupt_and_non_image_files_are_excluded(tmp_path, caplog, content, reason):
    rows = good_rows(tmp_path) + [['bad.jpg', 1.0]]
    (tmp_path / 'bad.jpg').write_bytes(content)
    with caplog.at_level(logging.WARNING):
        splits = read(str(tmp_path), rows, verify_images=True)
    assert excluded(splits)['bad.jpg'].startswith(reason)
    assert 'bad.jpg' not in kept_names(splits) and len(kept_names(splits)) == 3
    assert any('bad.jpg' in m and reason in m for m in caplog.messages)


def test_truncated_jpeg_is_excluded(tmp_path):
    rows = good_rows(tmp_path) + [['cut.jpg', 1.0]]
    fx.write_image(str(tmp_path / 'cut.jpg'), size=(300, 300))
    data = (tmp_path / 'cut.jpg').read_bytes()
    (tmp_path / 'cut.jpg').write_bytes(data[:len(data) // 2])
    splits = read(str(tmp_path), rows, verify_images=True)
    assert 'truncated' in excluded(splits)['cut.jpg']


def test_zero_byte_file_is_excluded_without_decoding(tmp_path):
    rows = good_rows(tmp_path) + [['empty.jpg', 1.0]]
    (tmp_path / 'empty.jpg').write_bytes(b'')
    splits = read(str(tmp_path), rows)  # caught by the cheap file check
    assert excluded(splits)['empty.jpg'].startswith('empty file (0 bytes)')


def test_missing_file_is_excluded(tmp_path):
    rows = good_rows(tmp_path) + [['gone.jpg', 1.0]]
    splits = read(str(tmp_path), rows)
    reason = excluded(splits)['gone.jpg']
    assert reason.startswith('file listed but missing') and str(tmp_path / 'gone.jpg') in reason


@pytest.mark.parametrize('score, reason', [
    ('', 'score is empty'),
    ('nan', 'score is NaN'),
    ('good', "score is not a number ('good')"),
], ids=['empty', 'nan', 'text'])
def test_bad_scores_are_excluded(tmp_path, score, reason):
    rows = good_rows(tmp_path, 4)
    rows[3][1] = score
    splits = read(str(tmp_path), rows)
    assert excluded(splits) == {'good3.jpg': reason}
    assert kept_names(splits) == ['good0.jpg', 'good1.jpg', 'good2.jpg']


def test_duplicate_names_keep_the_first(tmp_path):
    rows = good_rows(tmp_path) + [['good1.jpg', 99.0]]
    splits = read(str(tmp_path), rows)
    assert excluded(splits) == {'good1.jpg': 'duplicate entry (first listed at row 2)'}
    assert next(r for r in splits['train'] if r.name == 'good1.jpg').score == 51.0
    # A first listing without a usable score does not shadow a later one that has it.
    rows = good_rows(tmp_path)
    rows[1][1] = ''
    splits = read(str(tmp_path), rows + [['good1.jpg', 99.0]])
    assert excluded(splits) == {'good1.jpg': 'score is empty'}
    assert next(r for r in splits['train'] if r.name == 'good1.jpg').score == 99.0


def test_strict_mode_fails_fast_naming_the_file(tmp_path):
    rows = good_rows(tmp_path) + [['gone.jpg', 1.0]]
    with pytest.raises(quality.DataError, match='gone.jpg: file listed but missing'):
        read(str(tmp_path), rows, strict=True)


def test_summary_counts_reasons(tmp_path):
    rows = good_rows(tmp_path) + [['a.jpg', 1.0], ['b.jpg', 1.0], ['good0.jpg', 'x']]
    splits = read(str(tmp_path), rows)
    text = splits.report.summary()
    assert 'kept train 3' in text and 'excluded 3' in text
    assert '2 x file listed but missing: a.jpg, b.jpg' in text
    assert '1 x score is not a number: good0.jpg' in text   # scores are checked first


def test_nothing_usable_is_an_error_with_the_summary(tmp_path):
    with pytest.raises(quality.DataError, match='no usable images'):
        read(str(tmp_path), [['a.jpg', 1.0]])


# -- unusual but valid images: converted and kept, through the whole pipeline


def write_odd_images(root) -> list[list]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    rgb.convert('CMYK').save(os.path.join(root, 'cmyk.jpg'))
    rgb.convert('L').save(os.path.join(root, 'gray.png'))
    rgb.convert('RGBA').save(os.path.join(root, 'rgba.png'))
    rgb.convert('P').save(os.path.join(root, 'palette.png'))
    Image.fromarray(rng.integers(0, 65536, (300, 260), dtype=np.uint16)).save(
        os.path.join(root, 'sixteen.png'))
    exif = Image.Exif()
    exif[0x0112] = 8
    rgb.save(os.path.join(root, 'rotated.jpg'), exif=exif)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(
        os.path.join(root, 'small.png'))
    names = ['cmyk.jpg', 'gray.png', 'rgba.png', 'palette.png', 'sixteen.png', 'rotated.jpg',
             'small.png']
    return [[n, float(i)] for i, n in enumerate(names)]


def test_odd_but_valid_images_are_kept_and_loaded(tmp_path):
    rows = write_odd_images(str(tmp_path))
    splits = read(str(tmp_path), rows, verify_images=True)
    assert not splits.report.problems and len(splits['train']) == 7
    loader = pipeline.make_train_loader(
        splits['train'], batch_size=7, seed=0, patches_per_image=1, crop_size=224, resize=None,
        num_epochs=1, shard_index=0, shard_count=1)
    (batch,) = list(loader)
    assert batch['image'].shape == (7, 224, 224, 3) and np.isfinite(batch['image']).all()
    assert sorted(batch['score'].tolist()) == list(range(7))


# -- decode failures at load time (no verification pass) do not crash


def test_undecodable_image_at_load_time_is_skipped_in_training(tmp_path, caplog):
    rows = good_rows(tmp_path, 4) + [['bad.jpg', 1.0]]
    (tmp_path / 'bad.jpg').write_bytes(b'not an image')
    splits = read(str(tmp_path), rows)  # no decode check: bad.jpg is kept
    assert len(splits['train']) == 5
    with caplog.at_level(logging.WARNING):
        loader = pipeline.make_train_loader(
            splits['train'], batch_size=1, seed=0, patches_per_image=2, crop_size=32,
            resize=(48, 48), num_epochs=1, shard_index=0, shard_count=1)
        scores = [float(b['score'][0]) for b in loader]
    assert sorted(scores) == sorted([50.0, 51.0, 52.0, 53.0] * 2)
    assert any('bad.jpg' in m for m in caplog.messages)


def test_undecodable_image_is_masked_in_eval_and_excluded_by_cache(tmp_path):
    rows = good_rows(tmp_path, 2) + [['bad.jpg', 1.0]]
    (tmp_path / 'bad.jpg').write_bytes(b'not an image')
    records = read(str(tmp_path), rows)['train']
    bad = [r.name for r in records].index('bad.jpg')
    loader = pipeline.make_eval_loader(records, batch_size=3, crop_size=32, resize=(48, 48),
                                       shard_index=0, shard_count=1)
    (batch,) = list(loader)
    assert batch['mask'].tolist() == [i != bad for i in range(3)]
    means = pipeline.aggregate_crops(batch['index'], batch['score'], 3, batch['mask'])
    assert np.isnan(means[bad]) and np.isfinite(np.delete(means, bad)).all()

    cached = pipeline.make_train_loader(records, batch_size=1, seed=0, patches_per_image=1,
                                        crop_size=32, resize=(48, 48), num_epochs=1,
                                        shard_index=0, shard_count=1, cache=True)
    assert cached.num_images == 2 and [p.name for p in cached.report.problems] == ['bad.jpg']
    assert len(list(cached)) == 2
