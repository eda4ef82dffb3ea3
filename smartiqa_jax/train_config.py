"""What a training config may say: its checks, the model config it gives, and what a
resumed run may change. Every problem is a ConfigError naming the key."""

from __future__ import annotations

import jax
import ml_collections

from smartiqa_jax import losses
from smartiqa_jax.train_checkpoint import TrainCheckpoints


class ConfigError(ValueError):
    """A config value the run cannot use; the message names the key."""


def parse_cross_datasets(spec: str) -> list[tuple[str, str]]:
    """'spaq=/data/spaq,kadid10k=/data/kadid' -> [('spaq', '/data/spaq'), ...]."""
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(','))):
        name, sep, root = item.partition('=')
        if not sep:
            raise ConfigError(f'config.data.cross_datasets entry {item!r} is not name=root')
        pairs.append((name.strip(), root.strip()))
    return pairs


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
        pairs = parse_cross_datasets(d.cross_datasets)
        for i, (name, root) in enumerate(pairs):
            if name not in datasets:
                problems.append(f'data.cross_datasets: {name!r} is not one of '
                                f'{", ".join(datasets)}')
            if (name, root) in pairs[:i]:
                problems.append(f'data.cross_datasets lists {name}={root} twice')
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
    label_range = tuple(d.label_range or ())
    try:
        bad_range = bool(label_range) and not (len(label_range) == 2
                                               and float(label_range[0]) < float(label_range[1]))
    except (TypeError, ValueError):
        bad_range = True
    if bad_range:
        problems.append(f'data.label_range must be () (the data\'s) or (low, high) numbers with '
                        f'low < high, got {d.label_range}')
    for group in ('backbone', 'head'):
        for key in ('lr', 'min_lr', 'weight_decay'):
            if config.optim[group][key] < 0:
                problems.append(f'optim.{group}.{key} must be at least 0, got '
                                f'{config.optim[group][key]}')
    if not 0 <= config.seed < 2**32:
        problems.append(f'seed must be in 0..2**32-1 (the data order is drawn from it), '
                        f'got {config.seed}')
    if t.compute_dtype not in COMPUTE_DTYPES:
        problems.append(f'train.compute_dtype {t.compute_dtype!r} is not one of '
                        f'{", ".join(COMPUTE_DTYPES)}')
    if problems:
        raise ConfigError('config: ' + '; '.join(problems))


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


# Settings a resumed run may change: they do not change what it computes (or only
# where it finds its files, or the label name and range recorded with the model).
RESUME_MAY_CHANGE = frozenset({
    'train.progress_bar', 'train.log_every_steps', 'train.checkpoint_every_steps',
    'train.keep_checkpoints', 'train.compilation_cache_dir', 'train.cpu_devices',
    'train.eval_batch_size', 'data.root', 'data.cross_datasets', 'data.csv.images_dir',
    'data.label_name', 'data.label_range', 'model.attention', 'model.init_from',
    'model.backbone_weights'})


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
