"""TFDS builders write array_record without TensorFlow and read back the original bytes."""

import os
import sys

import numpy as np
import pytest

from smartiqa_jax.data import pipeline, tfds_builders
from tests import test_data_fixtures as fx


def as_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_csv_build_reads_back_the_same_bytes(tmp_path):
    manual = tmp_path / 'manual'
    fx.make_csv_folder(str(manual), n=9, with_split=True)
    fx.write_image(str(manual / 'images' / 'gray.png'), mode='L', seed=50)
    fx.write_image(str(manual / 'images' / 'cmyk.jpg'), mode='CMYK', seed=51)
    (manual / 'images' / 'broken.jpg').write_bytes(b'not an image')
    with open(manual / 'labels.csv', 'a') as f:
        f.write('images/gray.png,20,train\nimages/cmyk.jpg,21,test\nimages/broken.jpg,22,train\n')
    config = tfds_builders.CsvFolderConfig(name='mine', split_column='split')
    builder = tfds_builders.build('csv', str(manual), str(tmp_path / 'tfds'), config=config)

    assert builder.info.splits['train'].num_examples == 4  # broken.jpg excluded at build
    assert [p['name'] for p in builder.info.metadata['excluded']] == ['images/broken.jpg']
    assert any(f.endswith('.array_record-00000-of-00001')
               for f in os.listdir(builder.data_dir)), os.listdir(builder.data_dir)
    for split, n in (('train', 4), ('validation', 3), ('test', 4)):
        source = tfds_builders.open_source(builder, split)
        assert len(source) == n
        for i in range(n):
            example = source[i]
            original = (manual / as_text(example['name'])).read_bytes()
            assert example['image'] == original  # stored as distributed, not re-encoded
    # The registered name works with tfds.data_source too.
    import tensorflow_datasets as tfds
    by_name = tfds.data_source('smartiqa_csv_folder/mine', split='validation',
                               data_dir=str(tmp_path / 'tfds'),
                               decoders={'image': tfds.decode.SkipDecoding()})
    example = by_name[0]
    assert example['image'] == (manual / as_text(example['name'])).read_bytes()
    # Reopened from the directory alone, as a training job would.
    source = tfds_builders.open_source(builder.data_dir, 'test')
    assert sorted(float(source[i]['score']) for i in range(4)) == [2.0, 5.0, 8.0, 21.0]
    scale = tfds_builders.score_scale(builder.data_dir)
    assert (scale.low, scale.high, scale.higher_is_better) == (0.0, 22.0, True)
    # And it feeds the pipeline.
    loader = pipeline.make_eval_loader(source, batch_size=4, crop_size=32, resize=(48, 48),
                                       shard_index=0, shard_count=1)
    (batch,) = list(loader)
    assert batch['mask'].all() and batch['image'].shape == (4, 32, 32, 3)
    # Built, read and fed without TensorFlow ever being imported.
    assert 'tensorflow' not in sys.modules


def test_koniq_build_uses_the_official_split(tmp_path):
    fx.make_koniq(str(tmp_path / 'koniq'), n=6)
    builder = tfds_builders.build('koniq10k', str(tmp_path / 'koniq'), str(tmp_path / 'tfds'))
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        'train': 2, 'validation': 2, 'test': 2}
    assert builder.info.metadata['label'] == 'MOS_zscore'
    source = tfds_builders.open_source(builder, 'validation')
    assert sorted(float(source[i]['score']) for i in range(2)) == [10.0, 40.0]
    mos = tfds_builders.build('koniq10k', str(tmp_path / 'koniq'), str(tmp_path / 'tfds'),
                              config='mos')
    source = tfds_builders.open_source(mos, 'validation')
    np.testing.assert_allclose(sorted(float(source[i]['score']) for i in range(2)), [1.4, 2.6],
                               rtol=1e-6)


def test_csv_command_line_takes_every_csv_setting_and_reports_bad_data(tmp_path, capsys):
    manual = tmp_path / 'manual'
    rows = []
    for i in range(12):
        name = f'photos/p{i:02d}.png'
        fx.write_image(str(manual / 'pics' / name), size=(40, 40), seed=i)
        rows.append([name, 1 + i / 3, f'scene{i // 2}'])
    fx.write_csv(str(manual / 'mine.csv'), ['file', 'mos', 'scene'], rows)
    common = ['csv', '--manual_dir', str(manual), '--data_dir', str(tmp_path / 'tfds'),
              '--csv_name', 'mine.csv']
    assert tfds_builders.main(common + ['--name', 'bad']) == 1
    err = capsys.readouterr().err
    assert 'mine.csv' in err and "missing column(s) ['image', 'score']" in err, err
    # A name is required, and one TFDS has for another config is refused in a line.
    with pytest.raises(SystemExit) as e:
        tfds_builders.main(common)
    assert e.value.code == 2 and 'csv needs --name NAME' in capsys.readouterr().err
    assert tfds_builders.main(common + ['--name', 'default', '--image_column', 'file']) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith('tfds_builders: csv (--name default): ') and '\n' not in err, err
    assert tfds_builders.main(common + [
        '--name', 'mine', '--images_subdir', 'pics', '--image_column', 'file',
        '--score_column', 'mos', '--group_column', 'scene', '--seed', '3',
        '--score_range', '1', '5']) == 0
    data_dir = os.path.join(tmp_path / 'tfds', 'smartiqa_csv_folder', 'mine')
    (version,) = os.listdir(data_dir)
    scale = tfds_builders.score_scale(os.path.join(data_dir, version))
    assert (scale.low, scale.high, scale.higher_is_better) == (1.0, 5.0, True)
    # Grouped: the two photos of a scene are in one split.
    split_of = {}
    for split in ('train', 'validation', 'test'):
        source = tfds_builders.open_source(os.path.join(data_dir, version), split)
        for i in range(len(source)):
            split_of[as_text(source[i]['name'])] = split
    assert len(split_of) == 12
    for i in range(0, 12, 2):
        assert split_of[f'photos/p{i:02d}.png'] == split_of[f'photos/p{i + 1:02d}.png']
    capsys.readouterr()
    # An edited CSV: the build there is reused, and says so; --overwrite builds it again.
    fx.write_csv(str(manual / 'mine.csv'), ['file', 'mos', 'scene'], rows[:6])
    settings = ['--name', 'mine', '--images_subdir', 'pics', '--image_column', 'file',
                '--score_column', 'mos']
    assert tfds_builders.main(common + settings) == 0
    out = capsys.readouterr().out
    assert 'is already built at' in out and 'reused as it is (--overwrite' in out
    assert tfds_builders.main(common + settings + ['--overwrite']) == 0
    assert 'built smartiqa_csv_folder at' in capsys.readouterr().out
    source = tfds_builders.open_source(os.path.join(data_dir, version), 'train')
    counts = [len(tfds_builders.open_source(os.path.join(data_dir, version), split))
              for split in ('train', 'validation', 'test')]
    assert sum(counts) == 6 and len(source) == counts[0]
