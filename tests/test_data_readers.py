"""Readers on fixture folders in the layouts of SPEC 3, and on real KonIQ metadata."""

import os
import shutil

import numpy as np
import pytest

from smartiqa_jax.data import quality, readers
from tests import test_data_fixtures as fx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def official_koniq_csv() -> str:
    """The official sets csv beside the repo (CI), else in /work/shared; never skipped."""
    for base in (os.path.join(REPO_ROOT, '..', 'shared'), '/work/shared'):
        path = os.path.join(base, 'data', 'koniq10k', readers.KONIQ_SETS_CSV)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f'{readers.KONIQ_SETS_CSV} not found in ../shared/data/koniq10k/ or /work/shared: '
        'the data tests need the shared folder beside the repository')


def test_koniq_fixture_official_split_and_labels(tmp_path):
    names = fx.make_koniq(str(tmp_path))
    splits = readers.read_koniq10k(str(tmp_path))
    assert {s: len(v) for s, v in splits.items()} == {'train': 3, 'validation': 3, 'test': 3}
    by_name = {r.name: r for recs in splits.splits.values() for r in recs}
    assert by_name[names[4]].score == pytest.approx(40.0)  # MOS_zscore
    assert by_name[names[4]].scale == readers.ScoreScale('MOS_zscore', 0.0, 100.0, True)
    assert by_name[names[0]] in splits['train'] and by_name[names[1]] in splits['validation']
    assert os.path.isabs(by_name[names[0]].image) and os.path.exists(by_name[names[0]].image)

    mos = readers.read_koniq10k(str(tmp_path), label='MOS')
    by_name = {r.name: r for recs in mos.splits.values() for r in recs}
    assert by_name[names[4]].score == pytest.approx(2.6)
    assert by_name[names[4]].scale.low == 1.0 and by_name[names[4]].scale.high == 5.0


def test_koniq_sets_csv_alone_gives_zscore_but_not_mos(tmp_path):
    names = fx.make_koniq(str(tmp_path), with_scores_csv=False)
    splits = readers.read_koniq10k(str(tmp_path))
    by_name = {r.name: r for recs in splits.splits.values() for r in recs}
    # The sets csv's MOS column is already on 0..100 (= MOS_zscore).
    assert by_name[names[2]].score == pytest.approx(20.0)
    with pytest.raises(quality.DataError, match='koniq10k_scores_and_distributions.csv'):
        readers.read_koniq10k(str(tmp_path), label='MOS')


def test_koniq_half_size_release_is_read_with_a_warning(tmp_path, caplog):
    fx.make_koniq(str(tmp_path))
    os.rename(tmp_path / '1024x768', tmp_path / '512x384')
    with caplog.at_level('WARNING'):
        splits = readers.read_koniq10k(str(tmp_path))
    assert sum(len(v) for v in splits.splits.values()) == 9
    assert 'the half-size KonIQ-10k release' in caplog.text
    caplog.clear()
    fx.make_koniq(str(tmp_path / 'full'))
    with caplog.at_level('WARNING'):
        readers.read_koniq10k(str(tmp_path / 'full'))
    assert 'half-size' not in caplog.text


def test_koniq_missing_split_csv_names_the_file(tmp_path):
    fx.make_koniq(str(tmp_path))
    os.remove(tmp_path / readers.KONIQ_SETS_CSV)
    with pytest.raises(quality.DataError, match=readers.KONIQ_SETS_CSV):
        readers.read_koniq10k(str(tmp_path))


def test_koniq_real_official_metadata(tmp_path):
    # Real metadata, stand-in image files: empty folder + tiny files per name.
    csv_path = official_koniq_csv()
    shutil.copy(csv_path, tmp_path / readers.KONIQ_SETS_CSV)
    images = tmp_path / '1024x768'
    images.mkdir()
    import csv as csv_lib
    with open(csv_path, newline='') as f:
        rows = list(csv_lib.DictReader(f))
    for row in rows:
        (images / row['image_name']).write_bytes(b'x')  # existence is all the reader checks
    splits = readers.read_koniq10k(str(tmp_path))
    assert {s: len(v) for s, v in splits.items()} == {
        'train': 7058, 'validation': 1000, 'test': 2015}
    scores = np.array([r.score for recs in splits.splits.values() for r in recs])
    assert 0.0 <= scores.min() and scores.max() <= 100.0 and scores.max() > 5.0
    assert not splits.report.problems


def test_spaq_xlsx_and_seeded_split(tmp_path):
    names = fx.make_spaq(str(tmp_path), n=20)
    a = readers.read_spaq(str(tmp_path), seed=3)
    b = readers.read_spaq(str(tmp_path), seed=3)
    c = readers.read_spaq(str(tmp_path), seed=4)
    assert {s: len(v) for s, v in a.items()} == {'train': 14, 'validation': 2, 'test': 4}
    assert a.splits == b.splits and a.splits != c.splits
    got = sorted(r.name for recs in a.splits.values() for r in recs)
    assert got == sorted(names)
    r = next(r for r in a['train'])
    assert r.scale == readers.ScoreScale('MOS', 0.0, 100.0, True)


def test_kadid_split_keeps_each_reference_in_one_split(tmp_path):
    fx.make_kadid(str(tmp_path), refs=10, per_ref=3)
    splits = readers.read_kadid10k(str(tmp_path), seed=0)
    groups = {s: {r.group for r in recs} for s, recs in splits.items()}
    assert not groups['train'] & groups['validation']
    assert not groups['train'] & groups['test']
    assert not groups['validation'] & groups['test']
    assert [len(groups[s]) for s in readers.SPLITS] == [7, 1, 2]
    assert sum(len(v) for v in splits.splits.values()) == 30
    r = splits['train'][0]
    assert r.scale == readers.ScoreScale('dmos', 1.0, 5.0, True) and 1.0 < r.score < 2.0


def test_agiqa_reads_quality_mos(tmp_path):
    names = fx.make_agiqa(str(tmp_path), n=20)
    splits = readers.read_agiqa3k(str(tmp_path), fractions=(0.5, 0.25, 0.25))
    assert [len(splits[s]) for s in readers.SPLITS] == [10, 5, 5]
    by_name = {r.name: r for recs in splits.splits.values() for r in recs}
    assert by_name[names[5]].score == pytest.approx(1.0)  # mos_quality, not mos_align
    assert by_name[names[5]].scale.label == 'mos_quality'


def test_csv_folder_with_split_column_and_custom_names(tmp_path):
    rows = []
    for i in range(6):
        fx.write_image(str(tmp_path / 'pics' / f'p{i}.jpg'), seed=i)
        rows.append([f'p{i}.jpg', 10 * i, ['tr', 'val', 'te'][i % 3]])
    csv_path = fx.write_csv(str(tmp_path / 'meta.csv'), ['file', 'quality', 'subset'], rows)
    splits = readers.read_csv_folder(
        csv_path, str(tmp_path / 'pics'), image_column='file', score_column='quality',
        split_column='subset', split_names={'tr': 'train', 'val': 'validation', 'te': 'test'},
        higher_is_better=False)
    assert [r.name for r in splits['validation']] == ['p1.jpg', 'p4.jpg']
    assert splits['train'][0].scale == readers.ScoreScale('quality', 0.0, 50.0, False)


def test_csv_folder_seeded_split_by_fractions(tmp_path):
    csv_path = fx.make_csv_folder(str(tmp_path), n=20)
    a = readers.read_csv_folder(csv_path, fractions=(0.6, 0.2, 0.2), seed=1)
    assert [len(a[s]) for s in readers.SPLITS] == [12, 4, 4]
    assert a.splits == readers.read_csv_folder(csv_path, fractions=(0.6, 0.2, 0.2), seed=1).splits


def test_a_missing_or_broken_file_moves_no_other_image_to_another_split(tmp_path):
    csv_path = fx.make_csv_folder(str(tmp_path), n=30)
    clean = readers.read_csv_folder(csv_path, seed=3)
    split_of = {r.name: s for s, recs in clean.items() for r in recs}
    victims = [clean['train'][0].name, clean['test'][0].name]
    os.remove(tmp_path / victims[0])
    (tmp_path / victims[1]).write_bytes(b'not a png')
    # The TFDS builders decode every file (verify_images), the trainer does not: the two
    # must agree on every split, and both keep the clean read's split for every image.
    for verify in (False, True):
        damaged = readers.read_csv_folder(csv_path, seed=3, verify_images=verify)
        kept = {r.name: s for s, recs in damaged.items() for r in recs}
        expected = {n: s for n, s in split_of.items()
                    if n != victims[0] and (n != victims[1] or not verify)}
        assert kept == expected
        assert {p.name for p in damaged.report.problems} == (
            set(victims) if verify else {victims[0]})


def test_malformed_metadata_is_named_not_a_traceback(tmp_path):
    # A short row: its missing fields are empty (excluded with a reason), not None.
    csv_path = fx.make_csv_folder(str(tmp_path), n=6)
    with open(csv_path, 'a') as f:
        f.write('images/extra.png\n')
    splits = readers.read_csv_folder(csv_path, group_column='score')
    assert sum(len(v) for _, v in splits.items()) == 6
    assert any('empty' in p.reason for p in splits.report.problems)
    latin = tmp_path / 'latin1.csv'
    latin.write_bytes('image,score\nimages/caf\xe9.png,3\n'.encode('latin-1'))
    with pytest.raises(quality.DataError, match=r'latin1.csv: not UTF-8 text'):
        readers.read_csv_folder(str(latin))
    # SPAQ's score sheet: a file that is not a workbook, and an empty sheet.
    spaq = tmp_path / 'spaq'
    fx.make_spaq(str(spaq), n=3)
    xlsx = spaq / 'Annotations' / readers.SPAQ_XLSX
    import openpyxl
    book = openpyxl.Workbook()
    book.save(xlsx)
    with pytest.raises(quality.DataError, match='the first sheet is empty'):
        readers.read_spaq(str(spaq))
    xlsx.write_bytes(b'not a workbook')
    with pytest.raises(quality.DataError, match=f'{readers.SPAQ_XLSX}: not a readable .xlsx'):
        readers.read_spaq(str(spaq))


def test_csv_folder_missing_column_is_a_clear_error(tmp_path):
    csv_path = fx.make_csv_folder(str(tmp_path), n=3)
    with pytest.raises(quality.DataError, match=r"labels.csv: missing column\(s\) \['mos'\]"):
        readers.read_csv_folder(csv_path, score_column='mos')


def test_split_values_match_in_any_case(tmp_path):
    rows = []
    for i in range(6):
        fx.write_image(str(tmp_path / f'p{i}.png'), seed=i)
        rows.append([f'p{i}.png', i, [' Train', 'Validation', 'TEST', 'Training', 'Val', 'Te'][i]])
    csv_path = fx.write_csv(str(tmp_path / 'labels.csv'), ['image', 'score', 'set'], rows)
    splits = readers.read_csv_folder(csv_path, split_column='set', split_names={'TE': 'test'})
    assert {s: [r.name for r in v] for s, v in splits.items()} == {
        'train': ['p0.png', 'p3.png'], 'validation': ['p1.png', 'p4.png'],
        'test': ['p2.png', 'p5.png']}
    assert not splits.report.problems


def test_a_csv_root_that_cannot_be_read_as_one_is_named(tmp_path):
    with pytest.raises(quality.DataError, match=f'^{tmp_path}: a folder; a CSV file is expected'):
        readers.read_csv_folder(str(tmp_path))
    csv_path = fx.make_csv_folder(str(tmp_path), n=3)
    for bad in ((5, 1), (3, 3), (1,), ('low', 'high')):
        with pytest.raises(quality.DataError, match='labels.csv: score_range'):
            readers.read_csv_folder(csv_path, score_range=bad)
    assert readers.read_csv_folder(csv_path, score_range=(0, 5))['train'][0].scale.high == 5.0
    for sep, name in ((';', 'semicolons'), ('\t', 'tabs')):
        other = tmp_path / 'other.csv'
        other.write_text(f'image{sep}score{sep}set\nimages/img000.png{sep}1{sep}train\n')
        with pytest.raises(quality.DataError, match=rf"other.csv: missing column\(s\) \['image', "
                                                    rf"'score'\]; .* seems to separate its columns "
                                                    rf'with {name}, and a comma-separated'):
            readers.read_csv_folder(str(other))


def test_a_stray_double_quote_is_named_with_its_line(tmp_path):
    """A quote opened and never closed makes one field of the lines after it: a few lines
    read as one image name, thousands overflow the csv module's field limit. Either way
    the file and the line are named."""
    fx.make_csv_folder(str(tmp_path), n=3)
    short = tmp_path / 'short.csv'
    short.write_text('image,score\nimages/img000.png,10\n"images/img001.png,20\n'
                     'images/img002.png,30\n')
    with pytest.raises(quality.DataError,
                       match=r'short.csv, line 3: a value runs over lines 3-4; an unbalanced '
                             r'double quote \("\)\?'):
        readers.read_csv_folder(str(short))
    long = tmp_path / 'long.csv'
    long.write_text('image,score\n"images/img000.png,10\n'
                    + ''.join(f'images/img{i:06d}.png,{i}\n' for i in range(8000)))
    with pytest.raises(quality.DataError, match=r'long.csv, line \d+: field larger than field '
                                                r'limit .*unbalanced double quote'):
        readers.read_csv_folder(str(long))
