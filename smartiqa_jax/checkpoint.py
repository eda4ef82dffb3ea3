"""Model checkpoints: an orbax directory with the parameters and the model's own config.

Layout of a model checkpoint directory:
  CKPT/params/         the nnx.Param state as a pure pytree (orbax StandardSave)
  CKPT/model_config/   ModelConfig as JSON (variant, fusion, dropout, label scale...)

Training checkpoints (train.py) store the same two items beside the optimiser state, so
`load` also accepts one of their step directories or a whole training workdir, and a
released SMART-IQA PyTorch state_dict file (`weights.load_pytorch`).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA

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
        raise CheckpointError(f'{path}: no such checkpoint directory')
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
            wanted = int(best.read_text().strip())
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
    directory = _absolute(directory)
    if not (directory / 'config').is_dir():
        return {}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        config = checkpointer.restore(directory, ocp.args.Composite(
            config=ocp.args.JsonRestore()))['config']
    return config or {}


def _calibrates(step_dir: Path) -> bool:
    """Whether the training run that wrote `step_dir` has train.calibrate set."""
    return bool((training_config(step_dir).get('train') or {}).get('calibrate'))


def resolve(path: str | os.PathLike) -> Path:
    """What `load` reads: a state_dict file as it is, else `find_checkpoint(path)`."""
    file = _absolute(path)
    if file.is_file() and file.suffix in STATE_DICT_SUFFIXES:
        return file
    return find_checkpoint(path)


def load(path: str | os.PathLike, **config_overrides) -> SmartIQA:
    """Loads a ready model (eval mode) from a checkpoint directory or a training workdir.

    Also from a released SMART-IQA PyTorch state_dict file (.pth, .pt, .bin, .ckpt or
    .safetensors; variant, fusion and patch norm detected from its keys, the label
    scale KonIQ's 0..100 as released), read without unpickling anything but tensors.
    `config_overrides` replace fields of the stored ModelConfig, e.g. dtype='bfloat16'.
    The window attention implementation the checkpoint was trained with is not kept:
    the model takes 'auto', the best one for this machine and `dtype` (the Pallas
    kernels for bfloat16 on a recent NVIDIA GPU, else XLA's), unless `attention=` is
    given.
    """
    directory = resolve(path)
    if directory.is_file():
        from smartiqa_jax import weights
        model = weights.load_pytorch(directory, **config_overrides)
        model.eval()
        return model
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        config_dict = checkpointer.restore(directory, ocp.args.Composite(**{
            MODEL_CONFIG: ocp.args.JsonRestore()}))[MODEL_CONFIG]
        config_dict = {**config_dict, 'attention': 'auto'}
        config = ModelConfig.from_dict({**config_dict, **config_overrides})
        # Shapes only: every value is about to be overwritten by the checkpoint's.
        model = nnx.eval_shape(lambda: SmartIQA(config, rngs=nnx.Rngs(0)))
        # Onto one device of this process, whatever mesh the checkpoint was written from
        # (a run on 2 CPU devices, a GPU pod): orbax would otherwise ask for that topology.
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
            params_pytree(model))
        tree = checkpointer.restore(directory, ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(abstract)}))[PARAMS]
    restore_params(model, jax.tree.map(np.asarray, tree))
    model.eval()
    return model
