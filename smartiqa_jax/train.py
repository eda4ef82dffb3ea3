r"""Trains SMART-IQA and tests it: `train_and_evaluate(config, workdir)`.

  python -m smartiqa_jax.train --config configs/demo.py
  python -m smartiqa_jax.train --config configs/base.py --workdir workdirs/base \
      --config.data.root=/data/koniq10k --config.train.loss=plcc

Each epoch trains on random crops, then scores the validation split with the
multi-crop protocol; the epoch with the best validation SRCC is the one
tested at the end, on the test split and on every cross-dataset set the
config lists (the test split never chooses anything). Running again with the
same workdir resumes from its latest checkpoint, data order included; a
finished run only repeats the final test.

What lands in the workdir: checkpoints/ (orbax), metrics.jsonl (one JSON
object per log line), tensorboard/ (event files), summary.json and
curves.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from smartiqa_jax import compilation_cache, losses, optim, sharding, train_state
from smartiqa_jax.metrics import quality_metrics
from smartiqa_jax.train_checkpoint import TrainCheckpoints


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; nothing from then on was saved."""


class DatasetNotFoundError(RuntimeError):
    """The config's dataset is not on disk; the message says how to get it."""


class ConfigError(ValueError):
    """A config value the run cannot use; the message names the key."""


# How to obtain each dataset, for the message when it is missing.
_HOW_TO_GET = {
    'koniq10k': (
        'KonIQ-10k: download the 1024x768 images (koniq10k_1024x768.zip) and the '
        'metadata from https://database.mmsp-kn.de/koniq-10k-database.html, unzip so '
        'that ROOT/1024x768/*.jpg and ROOT/koniq10k_distributions_sets.csv exist (the '
        'split csv is also in ../shared/data/koniq10k/ beside the repository).'),
    'spaq': (
        'SPAQ: download from https://github.com/h4nwei/SPAQ; ROOT holds the images '
        'folder and "MOS and Image attribute scores.xlsx".'),
    'kadid10k': (
        'KADID-10k: download kadid10k.zip from https://database.mmsp-kn.de/kadid-10k-database.html; '
        'ROOT holds images/ and dmos.csv.'),
    'agiqa3k': (
        'AGIQA-3K: download from https://github.com/lcysyzxdxc/AGIQA-3k-Database; '
        'ROOT holds the images and data.csv.'),
    'csv': 'A CSV + folder dataset: ROOT is the CSV file, images relative to its folder.',
}


# ----------------------------------------------------------------------------- data


def _expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def csv_options(csv: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.data.csv as keyword arguments of data.read_csv_folder ('' / (): its default)."""
    if csv.score_range and len(csv.score_range) != 2:
        raise ConfigError(f'config.data.csv.score_range must be (low, high), got {csv.score_range}')
    return dict(image_column=csv.image_column, score_column=csv.score_column,
                split_column=csv.split_column or None,
                group_column=csv.group_column or None,
                images_dir=_expand(csv.images_dir) or None,
                score_range=tuple(csv.score_range) or None,
                higher_is_better=csv.higher_is_better)


def load_splits(dataset: str, root: str, *, seed: int = 0,
                csv: ml_collections.ConfigDict | None = None,
                setting: str = 'config.data.root'):
    """Records of every split of `dataset` under `root` (readers in smartiqa_jax.data).

    seed: the seeded split of datasets without an official one (SPAQ, KADID-10k,
    AGIQA-3K, a CSV without a split column); for 'demo', the dataset's own seed.
    csv: config.data.csv, the columns of a 'csv' dataset (`root` is then the CSV).
    setting: the config key that gave `root`, for the message.
    Raises DatasetNotFoundError, naming where it looked and how to get the
    data, when the files are not there.
    """
    from smartiqa_jax import data
    root = _expand(root)
    if dataset == 'demo':
        return data.load_splits('demo', root, seed)
    options = {} if dataset == 'koniq10k' else {'seed': seed}
    if dataset == 'csv' and csv is not None:
        options.update(csv_options(csv))
    problem = None
    if not root or not os.path.exists(root):
        problem = f'{root or "(empty)"} does not exist'
    else:
        try:
            return data.load_splits(dataset, root, **options)
        except FileNotFoundError as e:
            problem = str(e)
        except data.DataError as e:
            if 'not found' not in str(e):   # there, but unusable: say what is wrong with it
                hint = (' (config.data.csv.image_column, score_column, split_column and '
                        'group_column name the columns)'
                        if dataset == 'csv' and 'missing column' in str(e) else '')
                raise data.DataError(f'dataset {dataset!r} in {root} ({setting}): {e}{hint}') \
                    from None
            problem = str(e)
    raise DatasetNotFoundError(
        f'Dataset {dataset!r} not found: looked in {root or "(no path)"} '
        f'({setting}): {problem}.\n'
        f'{_HOW_TO_GET.get(dataset, "See the README for the supported datasets.")}\n'
        f'Then pass --config.data.root=ROOT (cross-dataset sets: --config.data.cross_datasets).\n'
        f'configs/demo.py trains on a built-in demo dataset without any download:\n'
        f'  python -m smartiqa_jax.train --config configs/demo.py')


def _parse_cross_datasets(spec: str) -> list[tuple[str, str]]:
    """'spaq=/data/spaq,kadid10k=/data/kadid' -> [('spaq', '/data/spaq'), ...]."""
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(','))):
        name, sep, root = item.partition('=')
        if not sep:
            raise ConfigError(f'config.data.cross_datasets entry {item!r} is not name=root')
        pairs.append((name.strip(), root.strip()))
    return pairs


def shard_layout(data_config, global_batch_size: int) -> tuple[int, int]:
    """(shards of the training stream, shards this process reads): config.data.shard_count."""
    processes = jax.process_count()
    shard_count = data_config.shard_count if data_config.shard_count > 0 else processes
    if shard_count % processes:
        raise ConfigError(f'config.data.shard_count {shard_count} must be a multiple of '
                          f'the {processes} processes.')
    if global_batch_size % shard_count:
        raise ConfigError(f'The batch size {global_batch_size} does not divide into '
                          f'{shard_count} data shards.')
    return shard_count, shard_count // processes


class TrainFeed:
    """The training batches this process contributes to each global batch.

    The data stream is cut into `shard_count` shards (config.data.shard_count,
    default: one per process); this process reads its share of them and
    concatenates their batches. So the global batch, and with it the whole
    run, depends on the shard count only, not on how many processes run it:
    one process reading two shards trains exactly as two processes reading
    one each.
    """

    def __init__(self, records, data_config: ml_collections.ConfigDict, *,
                 global_batch_size: int, seed: int):
        from smartiqa_jax.data import as_source, make_decoded_cache, make_train_loader
        index = jax.process_index()
        shard_count, per_process = shard_layout(data_config, global_batch_size)
        source = as_source(records)
        # Every shard samples from the whole split (its fixed share of the patches
        # spans all images; make_train_loader), so each needs every image: one decoded
        # cache per process, shared by its shards, not one each.
        cache = (make_decoded_cache(source, resize=_resize(data_config),
                                    crop_size=data_config.crop_size)
                 if data_config.cache else False)
        self.cache = cache   # also read by the calibration pass over the training split
        self.loaders = [
            make_train_loader(
                source, batch_size=global_batch_size // shard_count, seed=seed,
                patches_per_image=data_config.patches_per_image,
                crop_size=data_config.crop_size, resize=_resize(data_config),
                hflip=data_config.hflip, color_jitter=data_config.color_jitter,
                rotate90=data_config.rotate90, jpeg_aligned_crops=data_config.jpeg_aligned_crops,
                worker_count=data_config.num_workers,
                shard_index=shard, shard_count=shard_count, cache=cache)
            for shard in range(index * per_process, (index + 1) * per_process)]
        self.iterators = [iter(loader) for loader in self.loaders]
        self.batches_per_epoch = self.loaders[0].batches_per_epoch
        self.num_images = self.loaders[0].num_images

    def next(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in ('image', 'score')}


def _limit(records: list, count: int) -> list:
    """The first `count` records (every fifth first, to keep the label spread); all if count <= 0."""
    if count <= 0 or count >= len(records):
        return records
    order = list(range(0, len(records), 5)) + [i for i in range(len(records)) if i % 5]
    return [records[i] for i in sorted(order[:count])]


def _resize(data_config) -> Any:
    resize = data_config.resize
    return tuple(resize) if resize else None


class EvalSet:
    """One split scored with the multi-crop protocol (SPEC 2)."""

    def __init__(self, name: str, records, data_config, *, batch_size: int, seed: int,
                 cache: Any = None):
        """cache: a decoded cache of these records to share; None: per data_config.cache."""
        from smartiqa_jax.data import image_scores, make_eval_loader
        self.name = name
        self.loader = make_eval_loader(
            records, global_batch_size=batch_size, crops=data_config.eval_crops,
            crop_mode=data_config.eval_crop_mode, seed=seed,
            crop_size=data_config.crop_size, resize=_resize(data_config),
            jpeg_aligned_crops=data_config.jpeg_aligned_crops,
            worker_count=data_config.num_workers,
            cache=data_config.cache if cache is None else cache)
        self.labels = image_scores(records)

    def evaluate(self, eval_step, params, mesh) -> dict[str, float]:
        """Per-image SRCC/PLCC/KRCC/RMSE after averaging each image's crops.

        Images that failed to decode (no crop) are left out and not counted; a
        non-finite score of an image the model did see makes every metric NaN
        (a diverged model must not win an epoch on the images it still scores).
        """
        per_image, scored = self.predict(eval_step, params, mesh, with_scored=True)
        result = quality_metrics(per_image[scored], self.labels[scored])
        result['images'] = int(scored.sum())
        return result

    def predict(self, eval_step, params, mesh, *, with_scored: bool = False):
        """(n_images,) scores, each the mean of its crops; NaN where an image failed.

        with_scored: also return the (n_images,) bool mask of images with a crop.
        """
        from smartiqa_jax.data import aggregate_crops
        preds, indices, masks = [], [], []
        for batch in self.loader:
            images = sharding.shard_batch({'image': batch['image']}, mesh)['image']
            preds.append(_local_rows(eval_step(params, images)))
            indices.append(batch['index'])
            masks.append(batch['mask'])
        local = [np.concatenate(x) for x in (preds, indices, masks)]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            local = [np.asarray(multihost_utils.process_allgather(x)).reshape(-1)
                     for x in local]
        per_image = aggregate_crops(local[1], local[0], self.loader.num_images, mask=local[2])
        if not with_scored:
            return per_image
        valid = (local[1] >= 0) & local[2].astype(bool)
        scored = np.bincount(local[1][valid], minlength=self.loader.num_images) > 0
        return per_image, scored


def _local_rows(array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array that this process fed, in order."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


# ----------------------------------------------------------------------------- model


def model_config_from(config: ml_collections.ConfigDict, scale=None):
    """The SmartIQA ModelConfig of a run config (negative rates: released defaults).

    scale: the training labels' ScoreScale. The label name and range the model
    records are config.data.label_name / label_range where set, else the scale's
    ('koniq10k MOS_zscore', 0..100 for KonIQ), else ModelConfig's defaults.
    """
    from smartiqa_jax.models import swin
    from smartiqa_jax.models.smartiqa import ModelConfig
    m = config.model
    try:
        swin.check_attention_backend(m.attention)
    except ValueError as e:
        raise ConfigError(f'config.model.attention: {e}') from None
    labels = {}
    if config.data.label_name or scale is not None:
        labels['label_name'] = (config.data.label_name
                                or f'{config.data.dataset} {scale.label}')
    if config.data.label_range or scale is not None:
        labels['label_range'] = tuple(config.data.label_range or (scale.low, scale.high))
    try:
        return ModelConfig(
            variant=m.variant, fusion=m.fusion,
            dropout=None if m.dropout < 0 else m.dropout,
            drop_path_rate=None if m.drop_path_rate < 0 else m.drop_path_rate,
            attention_dropout=m.attention_dropout, **labels,
            dtype=config.train.compute_dtype, attention=m.attention, patch_norm=m.patch_norm)
    except ValueError as e:
        raise ConfigError(f'config.model: {e}') from None


# The model settings a whole-model checkpoint (config.model.init_from) decides.
ARCHITECTURE_KEYS = ('variant', 'fusion', 'patch_norm')
# From-scratch initialisation settings that a whole-model checkpoint makes moot.
INIT_KEYS = {'backbone_init': 'timm', 'hyper_conv_init': 'model', 'score_bias_init': 'model'}


def load_init_model(config: ml_collections.ConfigDict):
    """The model config.model.init_from names, for fine-tuning; None when it is ''.

    A model checkpoint, a training workdir or step directory (the model
    `smartiqa_jax.load` returns from it), or a released SMART-IQA PyTorch
    state_dict file. Errors name the setting and the path.
    """
    if not config.model.init_from:
        return None
    from smartiqa_jax import checkpoint, weights
    if config.model.backbone_weights:
        raise ConfigError('config.model.init_from and config.model.backbone_weights both give '
                          'the backbone; set one of them')
    path = _expand(config.model.init_from)
    try:
        return checkpoint.load(path)
    except (checkpoint.CheckpointError, weights.WeightsError) as e:
        raise type(e)(f'config.model.init_from: {e}') from None
    except ValueError as e:   # e.g. a model_config with keys of another version
        raise ConfigError(f'config.model.init_from {path}: {e}') from None


def adopt_architecture(config: ml_collections.ConfigDict, init_config) -> list[str]:
    """Sets config.model's variant, fusion and patch_norm to the init model's, in place.

    A fine-tuned model has the architecture of the one it starts from, so these
    come from the checkpoint whatever the config says. Returns a line per setting
    that changed and per from-scratch init setting that no longer applies.
    """
    notes = []
    for key in ARCHITECTURE_KEYS:
        value = getattr(init_config, key)
        if config.model[key] != value:
            notes.append(f'model.{key}: {value!r} from model.init_from '
                         f'(the config said {config.model[key]!r})')
            config.model[key] = value
    for key, default in INIT_KEYS.items():
        if config.model[key] != default:
            notes.append(f'model.{key}={config.model[key]!r} not applied: every parameter '
                         'comes from model.init_from')
    return notes


def init_label_map(init_config, target: Sequence[float]) -> tuple[float, float] | None:
    """label_range_map from the init model's label range; None for an untrained head
    (`convert from-timm`), whose scores are on no scale to map from."""
    from smartiqa_jax.models.smartiqa import UNTRAINED_HEAD
    if init_config.label_name == UNTRAINED_HEAD:
        return None
    return label_range_map(init_config.label_range, target)


def label_range_map(source: Sequence[float], target: Sequence[float]
                    ) -> tuple[float, float] | None:
    """(a, b) taking label range `source` linearly onto `target`; None when they are equal.

    Folded into the score layers (fold_affine), it makes a model trained on
    KonIQ's 0..100 start a fine-tuning on 1..5 labels predicting 1..5.
    """
    (lo, hi), (new_lo, new_hi) = map(tuple, (source, target))
    if (lo, hi) == (new_lo, new_hi):
        return None
    if not hi > lo:
        raise ConfigError(f'label range {(lo, hi)} of model.init_from is empty')
    a = (new_hi - new_lo) / (hi - lo)
    return a, new_lo - a * lo


def fold_affine(params: dict, a: float, b: float) -> dict:
    """The parameters of the same model predicting a * score + b.

    The score is b5 + w5 . q, with w5 and b5 Linears of the hyper feature, so
    scaling both layers by a and adding b to b5's bias is exact.
    """
    params = dict(params)
    params['w5_fc'] = {k: v * a for k, v in params['w5_fc'].items()}
    params['b5_fc'] = {'kernel': params['b5_fc']['kernel'] * a,
                       'bias': params['b5_fc']['bias'] * a + b}
    return params


def score_scale_of(config, labels: Sequence[float]) -> float:
    """The factor the score layers are parameterised in (1: as released).

    'label_std': the standard deviation of the training labels, so the run
    trains as if on z-scored labels (optim.make_optimizer, score_scale).
    """
    if config.model.score_scale == 'label_std':
        return float(np.std(labels)) or 1.0
    if config.model.score_scale != 'model':
        raise ConfigError(f"config.model.score_scale must be 'model' or 'label_std', "
                          f"got {config.model.score_scale!r}")
    return 1.0


def _build_params(config, model_config, mesh, *, mean_label: float, score_scale: float = 1.0,
                  init=None, read_weights: bool = True):
    """Initial parameters: the model's init, then the config's backbone weights and score head.

    init: a whole model to start from instead (config.model.init_from, via
    load_init_model, with the architecture adopted): its parameters, with the
    scores mapped from its label range onto model_config's (label_range_map).
    read_weights: False skips config.model.backbone_weights (a resumed run, whose
    checkpoint then gives every parameter).
    """
    from smartiqa_jax.models.smartiqa import SmartIQA
    from smartiqa_jax.optim import SCORE_LAYERS
    if config.model.backbone_init != 'timm' and config.model.backbone_weights:
        raise ConfigError(f'config.model.backbone_init={config.model.backbone_init!r} is for '
                          'training from scratch; it would overwrite config.model.backbone_weights')
    train_graphdef, eval_graphdef, params = train_state.init_params(
        lambda: SmartIQA(model_config, rngs=nnx.Rngs(config.seed)), mesh)
    if init is not None:
        loaded = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init, nnx.Param)))
        pairs = zip(jax.tree.leaves(loaded), jax.tree.leaves(params))
        if jax.tree.structure(loaded) != jax.tree.structure(params) or any(
                a.shape != b.shape for a, b in pairs):
            raise ConfigError('config.model.init_from: its parameters do not fit the '
                              f'{model_config.variant}/{model_config.fusion} model')
        mapping = init_label_map(init.config, model_config.label_range)
        if mapping:
            loaded = fold_affine(loaded, *mapping)
        return train_graphdef, eval_graphdef, sharding.replicate(loaded, mesh)
    host = {}   # the parameters as a pure dict on the host, made by the first change

    def editable() -> dict:
        if not host:
            host.update(jax.device_get(params))
        return host

    if config.model.backbone_weights and read_weights:
        from smartiqa_jax import weights
        model = nnx.merge(eval_graphdef, jax.device_get(params))
        try:
            weights.load_timm_backbone(model, _expand(config.model.backbone_weights))
        except weights.WeightsError as e:
            raise weights.WeightsError(f'config.model.backbone_weights: {e}') from None
        host.update(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if config.model.backbone_init == 'fan_in':
        # timm's trunc-normal 0.02 suits Swin's widths of 96+ (and ImageNet-long
        # schedules). In a 16- or 32-wide Swin a 0.02 Linear scales its input by
        # ~0.1, so every block starts nearly as the identity and nearly linear.
        # LeCun-normal (std 1/sqrt(fan_in)) makes the blocks nonlinear from the
        # start: configs/demo.py uses it (its docstring has the comparison).
        pure = editable()

        def rescale(path, leaf):
            leaf = np.asarray(leaf)
            if path[-1].key == 'kernel' and leaf.ndim == 2:
                return leaf * (leaf.shape[0] ** -0.5 / 0.02)
            return leaf
        pure['backbone'] = jax.tree_util.tree_map_with_path(rescale, pure['backbone'])
    elif config.model.backbone_init != 'timm':
        raise ConfigError(f"config.model.backbone_init must be 'timm' or 'fan_in', "
                          f"got {config.model.backbone_init!r}")
    if config.model.hyper_conv_init == 'kaiming':
        # The released 1x1 conv stack before the hyper feature has PyTorch's
        # default init (uniform, variance 1/(3 fan_in)): with ReLUs each layer
        # shrinks its input ~2.4x, so from a random backbone the hyper feature
        # is ~15x smaller than the fused features, and the generated weights
        # are the generating layers' biases, nearly the same for every image.
        # Kaiming-uniform (variance 2/fan_in, sqrt(6) times the released
        # bound) keeps the scale, so the target network depends on the image
        # from the first step.
        for layer in editable()['hyper_convs'].values():
            layer['kernel'] = np.asarray(layer['kernel']) * np.sqrt(6.0)
    elif config.model.hyper_conv_init != 'model':
        raise ConfigError(f"config.model.hyper_conv_init must be 'model' or 'kaiming', "
                          f"got {config.model.hyper_conv_init!r}")
    if score_scale != 1.0:
        # The score is b5 + w5 . q with w5 and b5 Linears of the hyper feature.
        # From a random backbone its spread over images starts far below a
        # unit (nano: ~0.005), the labels' is ~20 on 0..100: under Adam, whose
        # steps are ~lr whatever the gradient, those layers need thousands of
        # steps to grow that far, and until then L1/L2 see a constant
        # prediction. Scaled by the label std (and their rate by as much:
        # optim.make_optimizer), they start and move at the labels' scale, as
        # if the labels were z-scored; the parameters stay in label units.
        pure = editable()
        for name in SCORE_LAYERS:
            pure[name] = {k: np.asarray(v) * score_scale for k, v in pure[name].items()}
    if config.model.score_bias_init == 'mean_label':
        # The score is b5 + w5 . q, and b5 is a Linear of the hyper feature: its
        # bias sets where scores start. Starting at the mean label (instead of
        # ~0 on a 0..100 scale) saves a from-scratch run hundreds of steps of
        # only shifting its output, time in which the features do not learn.
        bias = editable()['b5_fc']['bias']
        host['b5_fc']['bias'] = np.full_like(bias, mean_label)
    elif config.model.score_bias_init != 'model':
        raise ConfigError(f"config.model.score_bias_init must be 'model' or 'mean_label', "
                          f"got {config.model.score_bias_init!r}")
    if host:
        params = sharding.replicate(host, mesh)
    return train_graphdef, eval_graphdef, params


def calibrate_score_layers(params: dict, predictions: np.ndarray, labels: np.ndarray
                           ) -> tuple[dict, tuple[float, float] | None]:
    """Fits labels ~ a * predictions + b (least squares) and folds it into the score layers.

    The fit is folded in by `fold_affine`: the model then predicts
    a * score + b exactly. For a scale-free loss (plcc, rank_hinge, fidelity),
    whose scores have an arbitrary scale and offset: the ranking, SRCC, PLCC
    and KRCC are unchanged, RMSE becomes meaningful. Returns (params, (a, b)),
    or (params unchanged, None) when a <= 0 (that would reverse the ranking)
    or fewer than two distinct predictions are finite.
    """
    keep = np.isfinite(predictions)
    x, y = np.asarray(predictions, np.float64)[keep], np.asarray(labels, np.float64)[keep]
    if len(np.unique(x)) < 2:
        return params, None
    a, b = np.polyfit(x, y, 1)
    if not a > 0:
        return params, None
    return fold_affine(params, a, b), (float(a), float(b))


# ----------------------------------------------------------------------------- reporting


class MetricLog:
    """Metrics as JSON lines and TensorBoard scalars; only process 0 writes.

    resume_step: the step the run starts from (0: a fresh start). What an
    earlier attempt logged after it (work lost with the process, to be redone)
    and its test results (repeated at the end) are dropped, so every step is
    logged once.
    """

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter
            path = os.path.join(workdir, 'metrics.jsonl')
            if resume_step is not None and os.path.exists(path):
                _truncate_metrics(path, resume_step)
            self.jsonl = open(path, 'a')
            self.tensorboard = SummaryWriter(
                os.path.join(workdir, 'tensorboard'),
                purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.active:
            return
        record = {'step': step, 'kind': kind, 'time': time.time(), **values}
        self.jsonl.write(json.dumps(record) + '\n')
        self.jsonl.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)) and name not in ('epoch',):
                self.tensorboard.add_scalar(f'{kind}/{name}', value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tensorboard.close()


def _truncate_metrics(path: str, resume_step: int) -> None:
    """Rewrites metrics.jsonl keeping the records up to `resume_step`, tests excepted.

    A line torn by a kill (not valid JSON) is dropped too. Written to a
    temporary file and renamed, so an interruption leaves the old file whole.
    """
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get('step', 0) <= resume_step and not record.get('kind', '').startswith('test/'):
                kept.append(line if line.endswith('\n') else line + '\n')
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(kept)
    os.replace(tmp, path)


def plot_curves(history: Sequence[dict], path: str) -> None:
    """PNG of train loss, validation SRCC and PLCC per epoch."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [h['epoch'] for h in history]
    fig, (ax_loss, ax_corr) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h['train_loss'] for h in history], marker='o')
    ax_loss.set(xlabel='epoch', ylabel='training loss', title='Training loss')
    ax_corr.plot(epochs, [h['val_srcc'] for h in history], marker='o', label='SRCC')
    ax_corr.plot(epochs, [h['val_plcc'] for h in history], marker='s', label='PLCC')
    ax_corr.set(xlabel='epoch', ylabel='correlation', title='Validation')
    ax_corr.legend()
    for ax in (ax_loss, ax_corr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_summary(results: dict[str, dict[str, float]], best_epoch: int) -> str:
    """The final table: one row per evaluated set."""
    lines = [f'Best epoch (by validation SRCC): {best_epoch}',
             f'{"set":<24}{"images":>8}{"SRCC":>9}{"PLCC":>9}{"KRCC":>9}{"RMSE":>9}']
    for name, m in results.items():
        lines.append(f'{name:<24}{m["images"]:>8d}{m["srcc"]:>9.4f}{m["plcc"]:>9.4f}'
                     f'{m["krcc"]:>9.4f}{m["rmse"]:>9.3f}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class Progress:
    """Per-epoch history and early-stopping bookkeeping; stored in each checkpoint."""
    history: list = dataclasses.field(default_factory=list)
    best_epoch: int = 0
    best_step: int = -1
    best_srcc: float = -float('inf')
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    # Losses of the epoch in progress: saved mid-epoch, so a resumed epoch's
    # mean loss is the same as an uninterrupted one's.
    epoch_losses: list = dataclasses.field(default_factory=list)
    # What the run trains on (`train_split_fingerprint`): a resumed run must find the same.
    train_data: dict = dataclasses.field(default_factory=dict)

    def record_epoch(self, epoch: int, step: int, values: dict, patience: int) -> bool:
        """Adds an epoch's results; returns True if it is now the best epoch."""
        self.history.append(_nan_to_none({'epoch': epoch, 'step': step, **values}))
        self.epoch_losses = []
        srcc = values['val_srcc']
        improved = bool(np.isfinite(srcc)) and srcc > self.best_srcc
        if improved or self.best_step < 0:
            self.best_epoch, self.best_step = epoch, step
            self.best_srcc = float(srcc) if np.isfinite(srcc) else -float('inf')
        self.epochs_without_improvement = 0 if improved else self.epochs_without_improvement + 1
        if patience > 0 and self.epochs_without_improvement >= patience:
            self.stopped_early = True
        return self.best_step == step

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d['best_srcc'] = d['best_srcc'] if np.isfinite(d['best_srcc']) else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> 'Progress':
        d = dict(d)
        d['best_srcc'] = -float('inf') if d['best_srcc'] is None else d['best_srcc']
        return cls(**d)


def _nan_to_none(values: dict) -> dict:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
            for k, v in values.items()}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for a value that would fail later, after the data is read."""
    from smartiqa_jax.data.pipeline import CROP_MODES
    from smartiqa_jax.data.readers import READERS
    from smartiqa_jax.models.smartiqa import COMPUTE_DTYPES
    from smartiqa_jax.models.swin import SWIN_INPUT_SIZE
    from smartiqa_jax.preprocess import SYMMETRIES
    t = config.train
    problems = []
    if t.loss not in losses.LOSSES:
        problems.append(f'train.loss {t.loss!r} is not one of {", ".join(losses.LOSSES)}')
    if config.optim.schedule_unit not in ('epoch', 'step'):
        problems.append(f"optim.schedule_unit {config.optim.schedule_unit!r} is not 'epoch' "
                        "or 'step'")
    if config.data.eval_crop_mode not in CROP_MODES:
        problems.append(f'data.eval_crop_mode {config.data.eval_crop_mode!r} is not one of '
                        f'{", ".join(CROP_MODES)}')
    for key in ('batch_size', 'eval_batch_size', 'num_epochs', 'log_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
        if t[key] < 1:
            problems.append(f'train.{key} must be at least 1, got {t[key]}')
    for key in ('patches_per_image', 'eval_crops'):
        if config.data[key] < 1:
            problems.append(f'data.{key} must be at least 1, got {config.data[key]}')
    d = config.data
    datasets = (*READERS, 'demo')
    if d.dataset not in datasets:
        problems.append(f'data.dataset {d.dataset!r} is not one of {", ".join(datasets)}')
    try:
        for name, _ in _parse_cross_datasets(d.cross_datasets):
            if name not in datasets:
                problems.append(f'data.cross_datasets: {name!r} is not one of '
                                f'{", ".join(datasets)}')
    except ConfigError as e:
        problems.append(str(e).removeprefix('config.'))
    if d.crop_size != SWIN_INPUT_SIZE:
        problems.append(f'data.crop_size must be {SWIN_INPUT_SIZE} (the Swin backbone\'s input '
                        f'size), got {d.crop_size}')
    resize = tuple(d.resize or ())
    if resize and (len(resize) != 2 or min(resize) < d.crop_size):
        problems.append(f'data.resize must be () (keep the stored size) or (height, width), '
                        f'each at least data.crop_size {d.crop_size}; got {d.resize}')
    if d.eval_symmetries not in SYMMETRIES:
        problems.append(f'data.eval_symmetries {d.eval_symmetries!r} is not one of '
                        f'{", ".join(map(str, SYMMETRIES))}')
    if d.eval_crop_mode == 'center' and d.eval_crops != 1:
        problems.append(f"data.eval_crop_mode 'center' takes one crop per image; data.eval_crops "
                        f"is {d.eval_crops} (use 'random' or 'grid' for more)")
    for key in ('num_workers', 'split_seed'):
        if d[key] < 0:
            problems.append(f'data.{key} must be at least 0, got {d[key]}')
    if t.compute_dtype not in COMPUTE_DTYPES:
        problems.append(f'train.compute_dtype {t.compute_dtype!r} is not one of '
                        f'{", ".join(COMPUTE_DTYPES)}')
    if problems:
        raise ConfigError('config: ' + '; '.join(problems))


def train_split_fingerprint(records) -> dict:
    """{'images', 'sha1'} of the training records' names and labels, in order: what a
    resumed run compares (data.root may move; the images and labels may not change)."""
    import hashlib
    digest = hashlib.sha1()
    for r in records:
        digest.update(f'{r.name}\t{r.score!r}\n'.encode('utf-8', 'surrogateescape'))
    return {'images': len(records), 'sha1': digest.hexdigest()}


def _check_splits(splits, config) -> None:
    for name in ('train', 'validation', 'test'):
        if not splits[name]:
            raise ConfigError(
                f'the {name} split of {config.data.dataset} in {config.data.root} is empty: '
                'the run trains on train, chooses its epoch on validation and tests on test '
                '(a CSV: check its split column, config.data.csv.split_column)')
    # Before any image is decoded (the decoded cache decodes the whole split first); the
    # trainer checks again with the images that did decode.
    if len(splits['train']) * config.data.patches_per_image < config.train.batch_size:
        raise _no_full_batch(len(splits['train']), config)


def _no_full_batch(num_images: int, config) -> ConfigError:
    return ConfigError(
        f'an epoch has no full batch: {num_images} training images x '
        f'{config.data.patches_per_image} patches (config.data.patches_per_image) < '
        f'config.train.batch_size {config.train.batch_size}')


# Settings a resumed run may change: they do not change what it computes (or only
# where it finds its files, or the label name and range recorded with the model).
RESUME_MAY_CHANGE = frozenset({
    'train.progress_bar', 'train.log_every_steps', 'train.checkpoint_every_steps',
    'train.keep_checkpoints', 'train.compilation_cache_dir', 'train.cpu_devices',
    'train.eval_batch_size', 'data.root', 'data.num_workers', 'data.cache',
    'data.cross_datasets', 'data.csv.images_dir', 'data.label_name', 'data.label_range',
    'model.attention', 'model.init_from', 'model.backbone_weights'})


def _flatten(tree: dict, prefix: str = '') -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def check_resumable(config_json: dict, checkpoints: TrainCheckpoints, step: int,
                    iterators: int) -> None:
    """Raises ConfigError when `config_json` would not continue the run saved at `step`.

    Every setting but RESUME_MAY_CHANGE must be the saved one (settings one side
    lacks, from another version, are not compared), and the run needs as many
    processes and data iterators per process as wrote the checkpoint.
    """
    from smartiqa_jax.models.smartiqa import COMPUTE_DTYPES
    saved = _flatten(checkpoints.stored_config(step))
    if saved.get('train.compute_dtype', 'float32') not in COMPUTE_DTYPES:
        # Saved before the dtype was checked (e.g. 'bf16'): anything but 'bfloat16' ran
        # in float32, so that is the setting that continues it.
        saved['train.compute_dtype'] = 'float32'
    now = _flatten(config_json)
    differ = [f'{key}: {saved[key]!r} in the checkpoint, {now[key]!r} now'
              for key in sorted(saved.keys() & now.keys())
              if key not in RESUME_MAY_CHANGE and saved[key] != now[key]]
    if differ:
        raise ConfigError(
            f'{checkpoints.directory} holds a run with other settings, so it cannot resume '
            f'with these; use another --workdir, or the run\'s own settings:\n  '
            + '\n  '.join(differ))
    layout = checkpoints.data_layout(step)
    if layout is not None and layout != (jax.process_count(), iterators):
        raise ConfigError(
            f'{checkpoints.directory}/{step} was written by {layout[0]} process(es) reading '
            f'{layout[1]} data shard(s) each; resume it with {layout[0]} process(es) '
            f'(this run: {jax.process_count()} reading {iterators} each)')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config` in `workdir` (resuming if it holds checkpoints), then tests.

    Returns {'best_epoch', 'best_step', 'history', 'results': {set: metrics},
    'steps', 'train_seconds'}; the same is written to workdir/summary.json.
    """
    check_config(config)
    try:
        sharding.set_cpu_devices(config.train.cpu_devices)   # before anything starts JAX
    except ValueError as e:
        raise ConfigError(f'config.train.cpu_devices: {e}') from None
    from smartiqa_jax.models import swin
    try:   # needs JAX's backend, so after the CPU device count is set
        swin.check_attention_backend(config.model.attention)
    except ValueError as e:
        raise ConfigError(f'config.model.attention: {e}') from None
    compilation_cache.enable(config.train.compilation_cache_dir)
    if jax.process_count() > 1:
        # The first cross-process operation sets up the CPU collectives (gloo), and that
        # set-up waits only 30 s for the other processes: make it now, while they are
        # all at the same point, not at the first checkpoint, which a process slowed
        # by its data can reach long after the others.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('smartiqa_jax.train: start')
    workdir = _expand(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f'workdir {workdir} is a file: give a folder for the run '
                          '(checkpoints, logs and results)')
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    splits = load_splits(config.data.dataset, config.data.root, seed=config.data.split_seed,
                         csv=config.data.csv)
    splits = {name: _limit(records, config.data.max_images_per_split)
              for name, records in splits.items()}
    _check_splits(splits, config)
    cross = [(name, load_splits(name, root, setting='config.data.cross_datasets'))
             for name, root in _parse_cross_datasets(config.data.cross_datasets)]

    mesh = sharding.make_mesh()
    for key in ('batch_size', 'eval_batch_size'):
        try:
            sharding.local_batch_size(config.train[key], mesh)      # divisibility check
        except ValueError as e:
            raise ConfigError(f'config.train.{key}: {e}') from None
    # Orbax's step folders are named by their step once complete.
    checkpoint_dir = os.path.join(workdir, 'checkpoints')
    saved_steps = sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit()) \
        if os.path.isdir(checkpoint_dir) else []
    resuming = bool(saved_steps)
    # The parameters before the input pipelines: a bad backbone weights file
    # fails at once, not after the training split has been decoded (data.cache).
    # A resumed run restores its own: the files it started from are not read again.
    init = None if resuming else load_init_model(config)
    if init is not None:
        config = config.copy_and_resolve_references()   # the caller's config stays as given
        for note in adopt_architecture(config, init.config):
            say(f'Fine-tuning: {note}')
    elif resuming and config.model.init_from:
        # The architecture the run adopted from its model.init_from, as it saved it.
        from smartiqa_jax.checkpoint import training_config
        stored = training_config(os.path.join(checkpoint_dir, str(saved_steps[-1])))
        stored = stored.get('model') or {}
        config = config.copy_and_resolve_references()
        for key in ARCHITECTURE_KEYS:
            if key in stored:
                config.model[key] = stored[key]
    model_config = model_config_from(config, splits['train'][0].scale)
    if init is not None:
        from smartiqa_jax.models.smartiqa import UNTRAINED_HEAD
        mapping = init_label_map(init.config, model_config.label_range)
        say(f'Fine-tuning {model_config.variant}/{model_config.fusion} from '
            f'{_expand(config.model.init_from)}'
            + (f'; scores mapped from {init.config.label_range} to {model_config.label_range}: '
               f'{mapping[0]:.4g} * score {mapping[1]:+.4g}' if mapping else '')
            + ('; its head is untrained (convert from-timm): config.model.backbone_weights '
               'with the timm file starts the head as a from-scratch run does'
               if init.config.label_name == UNTRAINED_HEAD else ''))
    train_labels = [r.score for r in splits['train']]
    mean_label = float(np.mean(train_labels))
    score_scale = score_scale_of(config, train_labels)
    train_graphdef, eval_graphdef, params = _build_params(
        config, model_config, mesh, mean_label=mean_label, score_scale=score_scale, init=init,
        read_weights=not resuming)
    if config.model.backbone_weights and not resuming:
        say(f'Swin-{model_config.variant} backbone weights from '
            f'{_expand(config.model.backbone_weights)} (every key matched)')

    # Whether the workdir's run can go on with this config, before any data is decoded.
    _, shards_here = shard_layout(config.data, config.train.batch_size)
    # Made only now: a run stopped by its data, weights or settings leaves no empty workdir.
    os.makedirs(workdir, exist_ok=True)
    checkpoints = TrainCheckpoints(workdir, keep=config.train.keep_checkpoints)
    config_json = json.loads(config.to_json())
    train_data = train_split_fingerprint(splits['train'])
    if checkpoints.latest_step() is not None:
        check_resumable(config_json, checkpoints, checkpoints.latest_step(), shards_here)
        saved = checkpoints.stored_progress(checkpoints.latest_step()).get('train_data')
        if saved and saved != train_data:
            count = (f'{saved["images"]} images, now other names or labels'
                     if saved['images'] == train_data['images'] else
                     f'{saved["images"]} images then, {train_data["images"]} now')
            raise ConfigError(
                f'{checkpoints.directory} holds a run trained on another training split '
                f'than {config.data.root} gives now ({count}): resume with the data it was '
                'trained on, or use another --workdir')
    elif os.path.isdir(os.path.join(workdir, 'model')):
        # A fresh run here would leave the earlier run's model/ where load(workdir) and
        # predict look first.
        raise ConfigError(
            f'{workdir} holds the model of an earlier run ({os.path.join(workdir, "model")}) '
            'but no checkpoints to resume: give this run another workdir, or move that '
            'model/ away first')

    feed = TrainFeed(splits['train'], config.data, global_batch_size=config.train.batch_size,
                     seed=config.seed)
    steps_per_epoch = feed.batches_per_epoch
    if config.train.max_steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise _no_full_batch(feed.num_images, config)
    total_steps = steps_per_epoch * config.train.num_epochs
    eval_kwargs = dict(batch_size=config.train.eval_batch_size, seed=config.seed)
    val_set = EvalSet('validation', splits['validation'], config.data, **eval_kwargs)

    schedules = optim.make_schedules(config.optim, steps_per_epoch=steps_per_epoch,
                                     num_epochs=config.train.num_epochs)
    tx = optim.make_optimizer(config.optim, schedules, score_scale=score_scale)
    state = train_state.TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32), params=params,
        opt_state=tx.init(params), rng=jax.random.PRNGKey(config.seed))
    state = sharding.replicate(state, mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    loss_fn = losses.get_loss(config.train.loss, **config.train.loss_params.to_dict())
    train_step = train_state.make_train_step(train_graphdef, tx, loss_fn, mesh, state_sharding)
    eval_step = train_state.make_eval_step(eval_graphdef, mesh,
                                           config.data.eval_symmetries)

    progress = Progress(train_data=train_data)
    step = 0
    if checkpoints.latest_step() is not None:
        restored = checkpoints.restore(
            checkpoints.latest_step(), params=state.params,
            train_state=_train_items(state), data_iterators=feed.iterators)
        state = _with_restored(state, restored)
        progress = Progress.from_json(restored['progress'])
        progress.train_data = train_data   # the same, or a checkpoint from before it was kept
        if progress.best_step >= 0:
            # Written again: a run killed between an improving epoch's save and its
            # mark_best left checkpoints/best_step behind (or without one).
            checkpoints.mark_best(progress.best_step, write=is_main)
        step = int(jax.device_get(state.step))
        say(f'Resumed from step {step} in {checkpoints.directory}')

    counts = optim.count_by_group(state.params)
    from smartiqa_jax.models.swin import resolve_attention
    attention = resolve_attention(model_config.attention, model_config.dtype)
    say(f'SMART-IQA {model_config.variant}/{model_config.fusion} ({model_config.dtype}, '
        f'{attention} window attention) on {config.data.dataset}: '
        f'{feed.num_images} training images, {steps_per_epoch} steps/epoch of '
        f'{config.train.batch_size}, {config.train.num_epochs} epochs; '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'{jax.process_count()} process(es); parameters: backbone {counts["backbone"]:,}, '
        f'head {counts["head"]:,}; loss {config.train.loss}; workdir {workdir}')

    log = MetricLog(workdir, resume_step=step)
    started = time.time()

    def save():
        checkpoints.save(step, params=state.params,
                         train_state=_train_items(state), data_iterators=feed.iterators,
                         progress=progress.to_json(), config=config_json,
                         model_config=_json_model_config(model_config))

    while step < total_steps and not progress.stopped_early:
        epoch = step // steps_per_epoch + 1
        window_metrics, window_start = [], time.perf_counter()
        bar = tqdm.tqdm(total=steps_per_epoch, initial=step % steps_per_epoch,
                        desc=f'epoch {epoch}/{config.train.num_epochs}', unit='step',
                        disable=not is_main or not config.train.progress_bar, leave=False)
        while True:
            batch = sharding.shard_batch(feed.next(), mesh)
            # The step's inputs are already on device: any implicit host<->device copy
            # inside it would be a per-step cost, so make it an error.
            with jax.transfer_guard('disallow'):
                state, metrics = train_step(state, batch)
            step += 1
            window_metrics.append(metrics)
            bar.update(1)
            end_of_epoch = step % steps_per_epoch == 0
            checkpoint_now = step % config.train.checkpoint_every_steps == 0 and not end_of_epoch
            # Flush before a checkpoint too: its progress must hold every loss so far.
            if step % config.train.log_every_steps == 0 or end_of_epoch or checkpoint_now:
                window = jax.device_get(window_metrics)
                elapsed = time.perf_counter() - window_start
                # Before anything from this window is saved: no checkpoint follows a
                # non-finite loss or holds parameters whose norm is no longer finite.
                _check_finite(window, step, checkpoints)
                values = {
                    'loss': float(np.mean([m['loss'] for m in window])),
                    'grad_norm': float(np.mean([m['grad_norm'] for m in window])),
                    'param_norm': float(window[-1]['param_norm']),
                    'images_per_sec': len(window) * config.train.batch_size / elapsed,
                    **{f'lr_{g}': float(s(step - 1)) for g, s in schedules.items()},
                }
                progress.epoch_losses.extend(float(m['loss']) for m in window)
                bar.set_postfix(loss=f'{values["loss"]:.4g}',
                                img_s=f'{values["images_per_sec"]:.1f}')
                log.write(step, 'train', values)
                window_metrics, window_start = [], time.perf_counter()
            if end_of_epoch:
                break
            if checkpoint_now:
                save()
        bar.close()

        val = val_set.evaluate(eval_step, state.params, mesh)
        values = {'train_loss': float(np.mean(progress.epoch_losses)),
                  **{f'val_{k}': v for k, v in val.items() if k != 'images'}}
        improved = progress.record_epoch(epoch, step, values, config.train.patience)
        log.write(step, 'validation', {'epoch': epoch, **values})
        say(f'epoch {epoch}: loss {values["train_loss"]:.4f}  validation SRCC '
            f'{values["val_srcc"]:.4f} PLCC {values["val_plcc"]:.4f}'
            f'{"  (best)" if improved else ""}  [{time.time() - started:.0f}s]')
        save()
        if improved:
            checkpoints.wait()  # the best must never point at a step that is not on disk
            checkpoints.mark_best(step, write=is_main)
        if progress.stopped_early:
            say(f'Early stop: no better validation SRCC for {config.train.patience} epochs.')
    checkpoints.wait()
    train_seconds = time.time() - started

    # Test the best epoch (chosen on validation) on the test split and cross sets.
    state = state.replace(params=checkpoints.restore_params(progress.best_step, state.params))
    calibration = None
    if config.train.calibrate:
        # On the training split, with the evaluation protocol: never on test.
        train_set = EvalSet('train', splits['train'], config.data, cache=feed.cache,
                            **eval_kwargs)
        params, calibration = calibrate_score_layers(
            state.params, train_set.predict(eval_step, state.params, mesh), train_set.labels)
        state = state.replace(params=params)
        if calibration is None:
            say('Calibration skipped: the training predictions do not rise with the labels.')
        else:
            say(f'Calibrated on the training split: score = {calibration[0]:.4g} * raw '
                f'{calibration[1]:+.4g}')
        # The model users load from the workdir (checkpoint.find_checkpoint prefers it).
        from smartiqa_jax.checkpoint import save_model
        save_model(os.path.join(workdir, 'model'), nnx.merge(eval_graphdef, state.params),
                   force=True, training_config=config_json)
    test_sets = [EvalSet('test', splits['test'], config.data, **eval_kwargs)]
    for name, cross_splits in cross:
        records = [r for split in cross_splits for r in cross_splits[split]]
        test_sets.append(EvalSet(f'{name} (all)', records, config.data, **eval_kwargs))
    results = {}
    for eval_set in test_sets:
        results[eval_set.name] = eval_set.evaluate(eval_step, state.params, mesh)
        log.write(progress.best_step, f'test/{eval_set.name}', results[eval_set.name])
    checkpoints.close()
    log.close()

    summary = {'best_epoch': progress.best_epoch, 'best_step': progress.best_step,
               'steps': step, 'train_seconds': train_seconds,
               'stopped_early': progress.stopped_early, 'history': progress.history,
               'calibration': None if calibration is None else dict(zip('ab', calibration)),
               'results': {k: _nan_to_none(v) for k, v in results.items()}}
    if is_main:
        with open(os.path.join(workdir, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=1)
        if progress.history:
            plot_curves(progress.history, os.path.join(workdir, 'curves.png'))
        print(format_summary(results, progress.best_epoch))
        print(f'Wrote {workdir}/summary.json, curves.png, metrics.jsonl, tensorboard/')
    return summary


def _check_finite(window: Sequence[dict], step: int, checkpoints: TrainCheckpoints) -> None:
    """Raises TrainingDivergedError if a loss, or the norm of the parameters after a step,
    of the steps that end at `step` is not finite. (A step's loss is computed before its
    update, so the parameter norm is what catches an update that broke the parameters.)"""
    bad = next(((i, key, float(m[key])) for i, m in enumerate(window)
                for key in ('loss', 'param_norm') if not np.isfinite(float(m[key]))), None)
    if bad is None:
        return
    i, key, value = bad
    where = (f'the loss is {value} at step {step - len(window) + i + 1}' if key == 'loss' else
             f"the parameters' norm is {value} after step {step - len(window) + i + 1}")
    checkpoints.wait()
    latest = checkpoints.latest_step()
    checkpoints.close()   # the run ends here: no save may still be pending at exit
    kept = (f'the latest checkpoint, step {latest}, is in {checkpoints.directory}'
            if latest is not None else 'no checkpoint was saved')
    raise TrainingDivergedError(
        f'training diverged: {where}. '
        f'Nothing from then on was saved; {kept}. '
        'Lower the learning rates (config.optim.backbone.lr, config.optim.head.lr), keep '
        'config.optim.grad_clip_norm on, or add warmup (config.optim.warmup_epochs), and '
        'start again in a new --workdir.')


def _train_items(state: train_state.TrainState) -> dict:
    """The non-parameter part of the state, as checkpointed."""
    return {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng}


def _with_restored(state: train_state.TrainState, restored: dict) -> train_state.TrainState:
    items = restored['train_state']
    return state.replace(step=items['step'], params=restored['params'],
                         opt_state=items['opt_state'], rng=items['rng'])


def _json_model_config(model_config) -> dict:
    d = model_config.to_dict()
    d['label_range'] = list(d['label_range'])
    return d


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> None:
    """absl entry point; see the module docstring for the command."""
    from absl import app, flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    # A second call in one process (a notebook) defines the flags afresh: the config's
    # override flags (--config.x.y) are made from this call's argv.
    for name in list(flags.FLAGS):
        if name in _FLAG_NAMES or name.startswith('config.'):
            delattr(flags.FLAGS, name)
    config_flags.DEFINE_config_file(
        'config', None, 'Training config file (configs/*.py).', lock_config=True, sys_argv=argv)
    flags.DEFINE_string('workdir', None, 'Checkpoints, logs and results; default workdirs/<config>.')
    flags.DEFINE_bool('distributed', False,
                      'Multi-process run on a cluster JAX detects itself (TPU pod, SLURM, ...).')
    flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
    flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
    flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
    flags.mark_flags_as_required(['config'])

    def run(_):
        from absl import logging

        from smartiqa_jax.checkpoint import CheckpointError
        from smartiqa_jax.data import DataError
        from smartiqa_jax.weights import WeightsError
        f = flags.FLAGS
        # Orbax logs every save at INFO; the run's own lines say what matters.
        logging.set_verbosity(logging.WARNING)
        sharding.initialize_distributed(
            auto=f.distributed, coordinator_address=f.coordinator_address,
            num_processes=f.num_processes, process_id=f.process_id)
        config_file = config_flags.get_config_filename(f['config'])
        name = os.path.splitext(os.path.basename(config_file))[0]
        workdir = f.workdir or os.path.join('workdirs', name)
        try:
            train_and_evaluate(f.config, workdir)
        except (DatasetNotFoundError, WeightsError, CheckpointError, ConfigError,
                DataError, TrainingDivergedError) as e:
            raise SystemExit(str(e)) from None

    if any(arg in ('-h', '-?', '--help', '--helpshort') for arg in argv[1:]):
        # absl's own --help lists the flags of the module that sys.argv[0] names, none
        # under `smartiqa train`, and exits 1; --helpfull is still absl's.
        module = flags.FLAGS.find_module_defining_flag('workdir')
        own_flags = flags.FLAGS.module_help(module).strip().split('\n', 1)[1]  # less its name
        print(f'{__doc__.strip()}\n\nflags:\n{own_flags}\n'
              '  --config.KEY=VALUE: sets any key of the config (e.g. --config.train.num_epochs=3).')
        return
    config_path = _prepare_config_file(argv)
    try:
        app.run(run, argv=argv)
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for an override naming a key the config lacks,
        # while absl parses the flags, before `run`.
        problem = _unknown_override(argv, config_path) if config_path else None
        if problem is None:
            raise
        raise SystemExit(problem) from e


_FLAG_NAMES = ('config', 'workdir', 'distributed', 'coordinator_address', 'num_processes',
               'process_id')


def _unknown_override(argv, config_path: str) -> str | None:
    """The message for the first --config.KEY override whose key the config lacks."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('_smartiqa_config', config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for arg in argv[1:]:
        if not arg.startswith(('--config.', '--noconfig.')):
            continue
        key = arg.split('=', 1)[0].split('config.', 1)[1]
        node, path = config, 'config'
        for part in key.split('.'):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                keys = (', '.join(sorted(node.keys()))
                        if isinstance(node, ml_collections.ConfigDict) else '')
                return f'{arg}: {path} has no key {part!r}' + (f'; its keys: {keys}' * bool(keys))
            node, path = node[part], f'{path}.{part}'
    return None


def _prepare_config_file(argv) -> str | None:
    """Stops with a one-line message if the --config file does not exist, and puts the
    folder above its folder on sys.path, so that a config that builds on another (`from
    configs import base`) loads from any working directory and through the `smartiqa`
    command, not only with `python -m` from the repository root. Returns the file's path
    (None without --config)."""
    found = None
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            path = arg[len('--config='):]
        elif arg == '--config' and i + 1 < len(argv):
            path = argv[i + 1]
        else:
            continue
        path = path.split(':')[0]
        if not os.path.isfile(path):
            raise SystemExit(f'--config {path}: no such file')
        folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        found = path
    return found


if __name__ == '__main__':
    from smartiqa_jax import cpu_malloc
    cpu_malloc.reexec_with_tunables()
    main()
