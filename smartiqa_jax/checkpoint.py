"""Model checkpoints: an orbax directory with the parameters and the model's own config.

Layout of a model checkpoint directory:
  CKPT/params/         the nnx.Param state as a pure pytree (orbax StandardSave)
  CKPT/model_config/   ModelConfig as JSON (variant, fusion, dropout, label scale...)

Training checkpoints (train.py) store the same two items beside the optimiser state, so
`load` also accepts one of their step directories or a whole training workdir, and a
released SMART-IQA PyTorch state_dict file (`weights.load_pytorch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from smartiqa_jax.models.smartiqa import COMPUTE_DTYPES, ModelConfig, SmartIQA

PARAMS = 'params'
MODEL_CONFIG = 'model_config'
# State_dict files `load` reads through weights.load_pytorch (tensors only, never a pickle).
STATE_DICT_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.safetensors')


class CheckpointError(ValueError):
    """A path that holds no usable SMART-IQA checkpoint."""


def _absolute(path: str | os.PathLike) -> Path:
    # Orbax needs absolute paths (and reports a relative one late, from another thread).
    return Path(path).expanduser().resolve()


def params_pytree(model: nnx.Module) -> dict:
    """The model's parameters as a nested dict of arrays, with string keys (orbax-friendly)."""
    return _stringify(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _stringify(tree):
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return tree


def restore_params(model: nnx.Module, tree: dict) -> None:
    """Writes a `params_pytree`-shaped tree into the model, in place."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)

    def fill(target, source, where):
        for key in target:
            if str(key) not in source:
                raise CheckpointError(f'checkpoint lacks parameter {where}{key}')
            if isinstance(target[key], dict):
                fill(target[key], source[str(key)], f'{where}{key}/')
            else:
                value = source[str(key)]
                if tuple(value.shape) != tuple(target[key].shape):
                    raise CheckpointError(f'parameter {where}{key}: checkpoint shape '
                                          f'{tuple(value.shape)} vs model {tuple(target[key].shape)}')
                target[key] = value

    fill(pure, tree, '')
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def save_model(directory: str | os.PathLike, model: SmartIQA, *, force: bool = False,
               training_config: dict | None = None) -> Path:
    """Saves `model` (parameters + config) as an orbax checkpoint directory; returns its path.

    training_config: the run's config as JSON, stored as the `config` item as in
    training checkpoints, so `predict` finds the run's preprocessing.
    """
    directory = _absolute(directory)
    items = {PARAMS: ocp.args.StandardSave(params_pytree(model)),
             MODEL_CONFIG: ocp.args.JsonSave(model.config.to_dict())}
    if training_config is not None:
        items['config'] = ocp.args.JsonSave(training_config)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, ocp.args.Composite(**items), force=force)
    return directory


def _is_model_dir(path: Path) -> bool:
    return (path / PARAMS).is_dir() and (path / MODEL_CONFIG).is_dir()


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolves a model checkpoint directory from a checkpoint, a step directory or a workdir.

    A training workdir resolves to its `model/` (the final model train.py writes
    with `train.calibrate`), else its best checkpoint if train.py recorded one
    (`best_step` file), else its latest step.
    """
    path = _absolute(path)
    if not path.exists():
        what = 'file or checkpoint directory' if path.suffix in STATE_DICT_SUFFIXES else \
            'checkpoint directory'
        raise CheckpointError(f'{path}: no such {what}')
    if _is_model_dir(path):
        return path
    # The run's workdir, also when its checkpoints/ folder is what was given.
    workdir = path.parent if path.name == 'checkpoints' else path
    if _is_model_dir(workdir / 'model'):
        return workdir / 'model'
    for root in (path / 'checkpoints', path):
        if not root.is_dir():
            continue
        steps = sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit() and _is_model_dir(p))
        if not steps:
            continue
        best = root / 'best_step'
        if best.is_file():
            text = best.read_text().strip()
            if not text.isdigit():
                raise CheckpointError(f'{best}: expected a step number, found {text!r}; delete '
                                      f'it for the latest step, or pass a step directory')
            wanted = int(text)
            chosen = dict(steps).get(wanted)
            if chosen is None:
                raise CheckpointError(
                    f'{best} names step {wanted}, which is not in {root} (steps there: '
                    f'{", ".join(str(step) for step, _ in steps)}); pass one of those step '
                    'directories to choose a model')
        else:
            chosen = steps[-1][1]
        if _calibrates(chosen):
            # Its scores are on the scale of a scale-free loss until the calibration
            # is folded in: never hand them out as the run's model.
            raise CheckpointError(
                f'{path}: the run calibrates its scores (train.calibrate) but its calibrated '
                f'model ({workdir / "model"}) is not there yet: run the training command again '
                f'to finish it, or pass a step directory ({chosen}) for the raw model')
        return chosen
    raise CheckpointError(f'{path}: not a SMART-IQA checkpoint (expected {PARAMS}/ and '
                          f'{MODEL_CONFIG}/ inside it, or numbered step directories that have them)')


def training_config(directory: str | os.PathLike) -> dict:
    """The run config (JSON) in a checkpoint's `config` item; {} if it has none.

    Training checkpoints carry one, and so does a calibrated run's `model/`; model
    checkpoints written by `save_model` without a `training_config` (the `convert`
    command's) do not.
    """
    return json_item(directory, 'config')


def json_item(directory: str | os.PathLike, name: str) -> dict:
    """The JSON item `name` of the checkpoint (or training step) in `directory`; {} if it
    has none; CheckpointError if it cannot be read."""
    directory = _absolute(directory)
    if not (directory / name).is_dir():
        return {}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        try:
            value = checkpointer.restore(directory, ocp.args.Composite(
                **{name: ocp.args.JsonRestore()}))[name]
        except Exception as e:   # orbax raises many types, with pages of detail
            raise CheckpointError(f'{directory}: {name}/ is unreadable (corrupt or '
                                  f'truncated?): {first_line(e)}') from None
    return value or {}


def _calibrates(step_dir: Path) -> bool:
    """Whether the training run that wrote `step_dir` has train.calibrate set."""
    return bool((training_config(step_dir).get('train') or {}).get('calibrate'))


def resolve(path: str | os.PathLike) -> Path:
    """What `load` reads: a file as it is (a state_dict, whatever its name: model.pth.tar,
    no suffix; weights.read_state_dict tells by its bytes), else `find_checkpoint(path)`."""
    file = _absolute(path)
    if file.is_file():
        return file
    return find_checkpoint(path)


def load(path: str | os.PathLike, **config_overrides) -> SmartIQA:
    """Loads a ready model (eval mode) from a checkpoint directory or a training workdir.

    Also from a released SMART-IQA PyTorch state_dict file (.pth, .pt, .bin, .ckpt,
    .safetensors or any other name; variant, fusion and patch norm detected from its keys,
    the label scale KonIQ's 0..100 as released, or the one a .safetensors export records),
    read without unpickling anything but tensors.
    `config_overrides` replace fields of the stored ModelConfig, e.g. dtype='bfloat16'.
    The window attention implementation the checkpoint was trained with is not kept:
    the model takes 'auto', the best one for this machine and `dtype` (the Pallas
    kernels for bfloat16 on a recent NVIDIA GPU, else XLA's), unless `attention=` is
    given. Parameters that are unreadable, or not those of the model the checkpoint's
    config describes, raise CheckpointError naming the directory.
    """
    directory = resolve(path)
    if directory.is_file():
        from smartiqa_jax import weights
        model = weights.load_pytorch(directory, **config_overrides)
        model.eval()
        return model
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        try:
            config_dict = checkpointer.restore(directory, ocp.args.Composite(**{
                MODEL_CONFIG: ocp.args.JsonRestore()}))[MODEL_CONFIG]
        except Exception as e:   # orbax raises many types, with pages of detail
            raise CheckpointError(f'{directory}: {MODEL_CONFIG}/ is unreadable (corrupt or '
                                  f'truncated?): {first_line(e)}') from None
        if not isinstance(config_dict, dict):
            raise CheckpointError(f'{directory}: {MODEL_CONFIG}/ holds no model config')
        config_dict = {**config_dict, 'attention': 'auto'}
        if config_dict.get('dtype') not in COMPUTE_DTYPES:
            # Saved before dtypes were checked: anything but 'bfloat16' computed in float32.
            config_dict['dtype'] = 'float32'
        config = ModelConfig.from_dict({**config_dict, **config_overrides})
        # Shapes only: every value is about to be overwritten by the checkpoint's.
        model = nnx.eval_shape(lambda: SmartIQA(config, rngs=nnx.Rngs(0)))
        # Onto one device of this process, whatever mesh the checkpoint was written from
        # (a run on 2 CPU devices, a GPU pod): orbax would otherwise ask for that topology.
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
            params_pytree(model))
        # Checked first: a restore that fails part way leaves orbax's other reads running.
        mismatch = _mismatch(directory, abstract)
        if mismatch:
            raise CheckpointError(
                f'{directory}: the parameters in {PARAMS}/ are not those of the model its '
                f'{MODEL_CONFIG}/ describes (SMART-IQA {config.variant}/{config.fusion}): '
                f'{mismatch}')
        try:
            with _quiet_abandoned_reads(directory):
                tree = checkpointer.restore(directory, ocp.args.Composite(**{
                    PARAMS: ocp.args.StandardRestore(abstract)}))[PARAMS]
        except Exception as e:
            raise CheckpointError(f'{directory}: the parameters in {PARAMS}/ are unreadable '
                                  f'(corrupt or truncated?): {first_line(e)}') from None
    restore_params(model, jax.tree.map(np.asarray, tree))
    model.eval()
    return model


def first_line(error: BaseException, limit: int = 240) -> str:
    """The first line of the innermost cause of `error` (orbax wraps tensorstore's), cut
    to `limit` characters."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[:limit] + '...'


def _mismatch(directory: Path, abstract: dict) -> str:
    """How the stored parameters differ from `abstract` in names or shapes; '' if they do
    not, or if the stored metadata cannot be read (the restore then says why)."""
    def shapes(tree) -> dict[str, tuple]:
        return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    handler = ocp.StandardCheckpointHandler()
    try:
        stored = handler.metadata(directory / PARAMS)
        have = shapes(getattr(stored, 'tree', stored))
    except Exception:
        return ''
    finally:
        handler.close()
    if not have:
        return ''
    want = shapes(abstract)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = [f'{k} {have[k]} vs {want[k]}' for k in sorted(set(want) & set(have))
              if have[k] != want[k]]
    parts = [f'{len(missing)} missing (e.g. {missing[0]})' if missing else '',
             f'{len(extra)} not in the model (e.g. {extra[0]})' if extra else '',
             f'{len(shapes)} of another shape (e.g. {shapes[0]})' if shapes else '']
    return '; '.join(p for p in parts if p)


# Checkpoint directories being restored, or whose restore failed and left reads behind
# (`_quiet_abandoned_reads`); the report filters act only while it is not empty.
_ABANDONED: set[str] = set()


@contextlib.contextmanager
def _quiet_abandoned_reads(directory: Path):
    """Drops the reports of the reads a failed restore of `directory` abandons.

    Orbax reads every array at once; when one read fails it closes its event loop with
    the others still running, and each of those then reports a traceback of pages: into
    the closed loop (through sys.excepthook or sys.unraisablehook, from tensorstore's
    callbacks, as soon as the first read fails), or when its coroutine or task is garbage
    collected. The CheckpointError says what was wrong, so from the restore on, and after
    it fails, the reports of orbax's reads are dropped; any other report goes through.
    The filters are installed once per process and act only then.
    """
    _install_abandoned_read_filters()
    _ABANDONED.add(str(directory))
    yield
    # Not reached when the restore fails: its abandoned reads finish after it returned.
    _ABANDONED.discard(str(directory))


_FILTERS_INSTALLED = []


def _install_abandoned_read_filters() -> None:
    if _FILTERS_INSTALLED:
        return
    _FILTERS_INSTALLED.append(True)
    previous_unraisablehook, previous_excepthook = sys.unraisablehook, sys.excepthook

    def unraisablehook(unraisable):
        if not _abandoned_read(unraisable.exc_value, repr(unraisable.object),
                               from_native_callback=unraisable.object is None):
            previous_unraisablehook(unraisable)

    def excepthook(kind, error, tb):
        if not _abandoned_read(error, from_native_callback=True):
            previous_excepthook(kind, error, tb)

    sys.unraisablehook, sys.excepthook = unraisablehook, excepthook
    logging.getLogger('asyncio').addFilter(lambda record: not (
        'exception was never retrieved' in record.getMessage() and _abandoned_read(
            record.exc_info[1] if record.exc_info else None, record.getMessage())))
    warnings.filterwarnings(
        'ignore', "coroutine '_read_array_index_and_device_put' was never awaited",
        RuntimeWarning)


def _reports_a_checkpoint_error(error: BaseException) -> bool:
    """Whether `error` is a CheckpointError or was raised while handling one."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, CheckpointError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _abandoned_read(error: BaseException | None, message: str = '', *,
                    from_native_callback: bool = False) -> bool:
    """Whether `error` (and `message`) report a read that a failed restore abandoned."""
    if not _ABANDONED:
        return False
    if error is not None:
        if _reports_a_checkpoint_error(error):
            return False   # the failed load's own error, or one raised from it: the user's
        message += ''.join(traceback.format_exception(error))
    if any(directory in message for directory in _ABANDONED):
        return True
    if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
        return False
    # A read that finished after orbax closed its event loop: reported with orbax's frames,
    # or, from tensorstore's native completion callback, with no object and only the
    # loop's call_soon_threadsafe on the stack.
    frames = traceback.extract_tb(error.__traceback__)
    return ('orbax' in message or 'tensorstore' in message or (
        from_native_callback and bool(frames) and frames[0].name == 'call_soon_threadsafe'))
