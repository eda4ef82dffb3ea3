"""The grain pipeline: shapes, normalisation, determinism, epochs, eval crops, shards, state."""

import collections
import glob
import logging
import os

import numpy as np
import pytest

from smartiqa_jax import preprocess, train_data
from smartiqa_jax.data import pipeline, readers
from tests import test_data_fixtures as fx


def records(tmp_path, n=12, size=(60, 80)):
    """n images with score i, so a batch's scores say which images it holds."""
    csv_path = fx.make_csv_folder(str(tmp_path), n=n, size=size)
    return readers.read_csv_folder(csv_path, fractions=(1.0, 0.0, 0.0))['train']


def train_loader(recs, **kwargs):
    args = dict(batch_size=4, seed=0, patches_per_image=2, crop_size=32, resize=(48, 40),
                shard_index=0, shard_count=1)
    args.update(kwargs)
    return pipeline.make_train_loader(recs, **args)


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x['image'], y['image'])
        np.testing.assert_array_equal(x['score'], y['score'])


def test_train_batch_shapes_dtypes_and_normalisation(tmp_path):
    # A flat-colour image: every crop must be exactly normalize(colour).
    fx.write_csv(str(tmp_path / 'labels.csv'), ['image', 'score'], [['flat.png', 7.5]])
    from PIL import Image
    Image.new('RGB', (90, 70), (200, 100, 50)).save(tmp_path / 'flat.png')
    recs = readers.read_csv_folder(str(tmp_path / 'labels.csv'), fractions=(1, 0, 0))['train']
    loader = pipeline.make_train_loader(recs, batch_size=3, seed=0, patches_per_image=3,
                                        shard_index=0, shard_count=1, num_epochs=1)
    (batch,) = list(loader)
    assert set(batch) == {'image', 'score'}
    assert batch['image'].shape == (3, 224, 224, 3) and batch['image'].dtype == np.float32
    assert batch['score'].shape == (3,) and batch['score'].dtype == np.float32
    expected = preprocess.normalize(np.array([200, 100, 50], np.uint8))
    np.testing.assert_allclose(batch['image'], np.broadcast_to(expected, (3, 224, 224, 3)),
                               atol=1e-6)


def test_same_seed_same_batches_other_seed_differs(tmp_path):
    recs = records(tmp_path)
    a = take(iter(train_loader(recs, seed=5, color_jitter=True)), 4)
    b = take(iter(train_loader(recs, seed=5, color_jitter=True)), 4)
    c = take(iter(train_loader(recs, seed=6, color_jitter=True)), 4)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_each_image_patches_per_image_times_per_epoch_with_new_crops(tmp_path):
    recs = records(tmp_path, n=6)
    loader = train_loader(recs, batch_size=1, patches_per_image=5, num_epochs=2, hflip=False)
    batches = list(loader)
    assert len(batches) == 60 and loader.batches_per_epoch == 30
    for epoch in (batches[:30], batches[30:]):
        counts = collections.Counter(float(b['score'][0]) for b in epoch)
        assert counts == {float(i): 5 for i in range(6)}
    crops_of_0 = [b['image'][0] for b in batches[:30] if b['score'][0] == 0]
    assert len({c.tobytes() for c in crops_of_0}) == 5  # a fresh random crop each time
    # Reshuffled each epoch.
    assert [b['score'][0] for b in batches[:30]] != [b['score'][0] for b in batches[30:]]


@pytest.mark.parametrize('hflip', [False, True])
def test_rotate90_gives_the_square_symmetries_and_only_them(tmp_path, hflip):
    # One 32x32 image with no symmetry of its own, cropped whole (no offset).
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / 'a.png')
    fx.write_csv(str(tmp_path / 'labels.csv'), ['image', 'score'], [['a.png', 1.0]])
    recs = readers.read_csv_folder(str(tmp_path / 'labels.csv'), fractions=(1, 0, 0))['train']
    loader = train_loader(recs, batch_size=8, patches_per_image=64, resize=None, hflip=hflip,
                          rotate90=True, num_epochs=1)
    seen = collections.Counter(
        image.tobytes() for batch in loader for image in batch['image'])
    base = preprocess.normalize(pixels)
    views = [np.rot90(v, k) for v in ([base, base[:, ::-1]] if hflip else [base])
             for k in range(4)]
    assert set(seen) == {np.ascontiguousarray(v).tobytes() for v in views}
    assert sum(seen.values()) == 64 and min(seen.values()) >= 2


def test_global_batch_is_split_over_processes(tmp_path):
    loader = train_loader(records(tmp_path), batch_size=None, global_batch_size=8,
                          shard_index=1, shard_count=2)
    assert loader.batch_size == 4 and next(iter(loader))['image'].shape[0] == 4
    with pytest.raises(ValueError, match='divisible'):
        train_loader(records(tmp_path), batch_size=None, global_batch_size=7, shard_count=2)


def test_train_shards_are_disjoint_and_cover_the_data(tmp_path):
    recs = records(tmp_path, n=12)
    seen = []
    for shard in range(3):
        loader = train_loader(recs, batch_size=2, patches_per_image=1, num_epochs=1,
                              shard_index=shard, shard_count=3)
        seen.append({float(s) for b in loader for s in b['score']})
        assert len(seen[-1]) == 4
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set.union(*seen) == {float(i) for i in range(12)}


@pytest.mark.parametrize('shards', [2, 4])
def test_train_shards_read_different_images_at_each_step(tmp_path, shards):
    """grain shuffles each shard's range of patch numbers with the same permutation; with
    20 patches of 12 images the ranges start a multiple of 12 apart, so without the
    loader's own permutation every shard read the same image at every step."""
    recs = records(tmp_path, n=12)
    loaders = [train_loader(recs, batch_size=8 // shards, patches_per_image=20, num_epochs=1,
                            shard_index=shard, shard_count=shards) for shard in range(shards)]
    steps = list(zip(*(iter(loader) for loader in loaders)))
    assert len(steps) == 12 * 20 // 8
    same = sum(all(sorted(b['score']) == sorted(batches[0]['score']) for b in batches)
               for batches in steps)
    assert same <= 1, f'{same} of {len(steps)} steps read the same images on every shard'
    # Together the shards still read each image patches_per_image times an epoch.
    counts = collections.Counter(float(s) for batches in steps for b in batches
                                 for s in b['score'])
    assert counts == {float(i): 20 for i in range(12)}


def test_restored_iterator_continues_exactly(tmp_path):
    recs = records(tmp_path)
    it = iter(train_loader(recs, color_jitter=True))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 5)  # crosses the epoch boundary (12 * 2 / 4 = 6 per epoch)
    fresh = iter(train_loader(recs, color_jitter=True))
    fresh.set_state(state)
    assert_same_batches(take(fresh, 5), expected)


def test_cache_gives_the_same_batches(tmp_path):
    recs = records(tmp_path)
    plain = take(iter(train_loader(recs)), 3)
    cached = take(iter(train_loader(recs, cache=str(tmp_path / 'cache'))), 3)
    assert_same_batches(plain, cached)
    [path] = glob.glob(str(tmp_path / 'cache' / 'pixels_*.u8'))
    assert os.path.getsize(path) == 12 * 48 * 40 * 3


def test_caches_in_one_folder_do_not_overwrite_each_other(tmp_path):
    """Loaders given one cache folder (validation and test, say) each get a file of their
    own: a second cache rewriting the first's memory-mapped file kills the process."""
    recs = records(tmp_path)
    folder = str(tmp_path / 'cache')
    args = dict(global_batch_size=4, crops=2, crop_mode='random', crop_size=32, resize=(48, 40),
                cache=folder)
    first = pipeline.make_eval_loader(recs[:6], **args)
    before = list(first)
    pipeline.make_eval_loader(recs[6:], **args)
    assert len(glob.glob(os.path.join(folder, 'pixels_*.u8'))) == 2
    assert_same_batches(list(first), before)
    plain = pipeline.make_eval_loader(recs[:6], **{**args, 'cache': False})
    assert_same_batches(list(plain), before)


def test_one_cache_shared_by_the_shards_of_a_process(tmp_path, decode_counts):
    """TrainFeed reading two shards decodes the split once, not once per shard."""
    from configs import smoke
    decodes = decode_counts
    recs = records(tmp_path)
    data = smoke.get_config().data
    data.resize, data.crop_size, data.patches_per_image = (48, 40), 32, 2
    data.shard_count, data.cache = 2, True
    feed = train_data.TrainFeed(recs, data, global_batch_size=8, seed=0)
    cached = [feed.next() for _ in range(4)]   # 24 patches / 8: crosses the epoch
    assert len(feed.iterators) == 2
    assert sorted(decodes) == sorted(r.name for r in recs)
    assert set(decodes.values()) == {1}, decodes
    # The same batches as decoding on the fly.
    data.cache = False
    plain = train_data.TrainFeed(recs, data, global_batch_size=8, seed=0)
    assert_same_batches(cached, [plain.next() for _ in range(4)])
    # A cache is only taken by loaders it was made for.
    shared = pipeline.make_decoded_cache(recs, resize=(48, 40), crop_size=32)
    with pytest.raises(ValueError, match='resize'):
        train_loader(recs, resize=(50, 40), cache=shared)
    with pytest.raises(ValueError, match='12 images'):
        train_loader(recs[:6], cache=shared)


def test_two_workers_are_deterministic_and_cover_the_epoch(tmp_path):
    # With workers each process batches its own share of the records, so the
    # batches differ from worker_count=0, but not from run to run.
    recs = records(tmp_path)
    runs = [list(train_loader(recs, worker_count=2, num_epochs=1)) for _ in range(2)]
    assert_same_batches(*runs)
    inline = list(train_loader(recs, num_epochs=1))
    scores = lambda batches: sorted(float(s) for b in batches for s in b['score'])
    assert len(runs[0]) == len(inline) == 6 and scores(runs[0]) == scores(inline)


def test_evaluation_batches_are_full_with_workers_too(tmp_path):
    """Each worker batches its own share of the crops: padded so that every share is whole
    batches, every batch has one shape (a short one would not split over the devices)."""
    recs = records(tmp_path)[:5]
    args = dict(global_batch_size=4, crops=4, crop_mode='random', crop_size=32,
                resize=(48, 40), shard_index=0, shard_count=1)
    inline = pipeline.make_eval_loader(recs, **args)
    workers = pipeline.make_eval_loader(recs, **args, worker_count=2)
    batches = list(workers)
    assert [len(b['index']) for b in batches] == [4] * workers.batches_per_epoch
    def per_image(run):
        joined = {k: np.concatenate([b[k] for b in run]) for k in ('index', 'image', 'mask')}
        return pipeline.aggregate_crops(joined['index'], joined['image'].mean((1, 2, 3)), 5,
                                        mask=joined['mask'])

    np.testing.assert_allclose(per_image(list(inline)), per_image(batches), rtol=1e-6)


def test_an_image_the_resize_would_blow_up_costs_that_image_only(tmp_path, monkeypatch,
                                                                  caplog):
    """resize None (data.resize=()) scales a 1 x 500 strip up to the crop, 32 x 16000: over
    the pixel limit (PIL's, lowered here so that without the check the resize stays small)."""
    from PIL import Image
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100_000)
    recs = records(tmp_path, n=3)
    Image.fromarray(np.full((1, 500, 3), 128, np.uint8)).save(recs[1].image)
    with caplog.at_level(logging.WARNING):
        (batch,) = list(pipeline.make_eval_loader(recs, batch_size=3, crop_size=32, resize=None,
                                                  shard_index=0, shard_count=1))
    assert batch['mask'].tolist() == [True, False, True]
    assert any(f'{recs[1].name}: resized image over the pixel limit (1x500 to 32x16000, '
               'height x width: 512000 pixels > 100000)' in m for m in caplog.messages)
    cached = train_loader(recs, resize=None, cache=True, num_epochs=1)
    assert cached.num_images == 2 and [p.name for p in cached.report.problems] == [recs[1].name]
    assert 'over the pixel limit' in cached.report.problems[0].reason


@pytest.mark.parametrize('mode, crops', [('center', 1), ('grid', 4), ('random', 3)])
def test_eval_crops_are_grouped_and_deterministic(tmp_path, mode, crops):
    recs = records(tmp_path, n=5)
    make = lambda: pipeline.make_eval_loader(recs, batch_size=3, crops=crops, crop_mode=mode,
                                             seed=1, crop_size=32, resize=(48, 40),
                                             shard_index=0, shard_count=1)
    loader = make()
    batches = list(loader)
    assert len(batches) == loader.batches_per_epoch == -(-5 * crops // 3)
    index = np.concatenate([b['index'] for b in batches])
    mask = np.concatenate([b['mask'] for b in batches])
    assert all(b['image'].shape == (3, 32, 32, 3) and b['index'].dtype == np.int32
               for b in batches)
    assert index[mask].tolist() == [i for i in range(5) for _ in range(crops)]
    assert not mask[5 * crops:].any() and (index[~mask] == -1).all()
    images = np.concatenate([b['image'] for b in batches])[mask]
    if crops > 1:  # the crops of one image differ
        assert len({images[c].tobytes() for c in range(crops)}) == crops
    again = np.concatenate([b['image'] for b in make()])[mask]
    np.testing.assert_array_equal(images, again)
    # Scores as stand-in predictions: each image's mean is its score.
    scores = np.concatenate([b['score'] for b in batches])
    np.testing.assert_allclose(pipeline.aggregate_crops(index, scores, 5, mask), np.arange(5))


def test_jpeg_aligned_crops_start_two_past_a_multiple_of_four(tmp_path):
    # Pixels that carry their own coordinates: (y, x, 0), so a crop says where it was cut.
    from PIL import Image
    y, x = np.mgrid[0:61, 0:250]
    Image.fromarray(np.stack([y, x, 0 * x], -1).astype(np.uint8)).save(tmp_path / 'xy.png')
    fx.write_csv(str(tmp_path / 'labels.csv'), ['image', 'score'], [['xy.png', 1.0]])
    recs = readers.read_csv_folder(str(tmp_path / 'labels.csv'), fractions=(1, 0, 0))['train']

    def origins(batches):
        pixels = preprocess.denormalize(np.concatenate([b['image'] for b in batches]))
        return {(int(c[0, 0, 0]), int(c[0, 0, 1])) for c in pixels}

    common = dict(batch_size=4, crop_size=32, resize=None, shard_index=0, shard_count=1)
    for aligned in (False, True):
        train = take(iter(pipeline.make_train_loader(
            recs, seed=0, patches_per_image=4, hflip=False, jpeg_aligned_crops=aligned,
            **common)), 8)
        evals = list(pipeline.make_eval_loader(
            recs, crops=8, crop_mode='random', seed=0, jpeg_aligned_crops=aligned, **common))
        for found in (origins(train), origins(evals)):
            assert len(found) > 4
            assert all(oy % 4 == 2 and ox % 4 == 2 for oy, ox in found) == aligned


def test_eval_shards_cover_every_crop_once_with_equal_steps(tmp_path):
    recs = records(tmp_path, n=5)
    found, steps = [], []
    for shard in range(2):
        loader = pipeline.make_eval_loader(recs, batch_size=2, crops=3, crop_mode='random',
                                           crop_size=32, resize=(48, 40), shard_index=shard,
                                           shard_count=2)
        batches = list(loader)
        steps.append(len(batches))
        for b in batches:
            found += [int(i) for i, m in zip(b['index'], b['mask']) if m]
    assert steps[0] == steps[1] == 4  # 15 crops padded to 16 = 2 hosts x 4 x 2
    assert collections.Counter(found) == {i: 3 for i in range(5)}


def test_aggregate_crops():
    idx = np.array([0, 0, 1, 1, 1, -1])
    pred = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 100.0])
    np.testing.assert_allclose(pipeline.aggregate_crops(idx, pred, 2), [2.0, 3.0])
    out = pipeline.aggregate_crops(idx, pred[:, None], 3, mask=[1, 1, 1, 1, 0, 1])
    np.testing.assert_allclose(out[:2], [2.0, 2.0])
    assert np.isnan(out[2])


def test_tfds_style_source_with_bytes(tmp_path):
    recs = records(tmp_path, n=4)

    class BytesSource:  # what tfds.data_source returns: bytes, float32, name bytes
        def __len__(self):
            return len(recs)

        def __getitem__(self, i):
            with open(recs[i].image, 'rb') as f:
                return {'image': f.read(), 'score': np.float32(recs[i].score),
                        'name': recs[i].name.encode()}

    a = take(iter(train_loader(BytesSource())), 2)
    b = take(iter(train_loader(recs)), 2)
    assert_same_batches(a, b)
    np.testing.assert_array_equal(pipeline.image_scores(BytesSource()), np.arange(4))


def test_iterator_state_through_an_orbax_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    recs = records(tmp_path)
    it = iter(train_loader(recs))
    take(it, 2)
    manager = ocp.CheckpointManager(str(tmp_path / 'ckpt'), item_names=('data_iter',))
    manager.save(1, args=ocp.args.Composite(data_iter=pipeline.checkpoint_args(it)))
    manager.wait_until_finished()
    expected = take(it, 2)
    fresh = iter(train_loader(recs))
    manager.restore(1, args=ocp.args.Composite(
        data_iter=pipeline.checkpoint_args(fresh, restore=True)))
    assert_same_batches(take(fresh, 2), expected)
