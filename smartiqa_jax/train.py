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

This module is the loop; its parts live beside it: train_config (the config's
checks and what a resumed run may change), train_data (the splits, this
process's training feed, the multi-crop evaluation sets), train_params (the
initial parameters and the maps folded into the score layers), train_state
(the jitted steps), train_checkpoint (orbax) and train_log (metrics, curves,
the final table).
"""

from __future__ import annotations

if __name__ == '__main__':   # first: a restart here pays for the imports below only once
    from smartiqa_jax import cpu_malloc
    cpu_malloc.reexec_with_tunables()

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from smartiqa_jax import compilation_cache, losses, optim, sharding, train_state
from smartiqa_jax.train_checkpoint import TrainCheckpoints
from smartiqa_jax.train_config import (ConfigError, check_config, check_resumable,
                                       model_config_from, parse_cross_datasets)
from smartiqa_jax.train_data import (DatasetNotFoundError, EvalSet, TrainFeed, check_splits,
                                     expand_path, limit_records, load_splits, no_full_batch,
                                     shard_layout, train_split_fingerprint)
from smartiqa_jax.train_log import MetricLog, format_summary, plot_curves
from smartiqa_jax.train_params import (ARCHITECTURE_KEYS, adopt_architecture, build_params,
                                       calibrate_score_layers, init_label_map, load_init_model,
                                       score_scale_of)


# Set by `main`'s SIGINT / SIGTERM handler: the loop stops before its next step. (An
# exception raised by the handler itself can land where Python ignores it, e.g. in JAX's
# garbage-collection callback, and the run would go on.)
_STOP = threading.Event()


def _request_stop(signum, frame) -> None:
    if _STOP.is_set():
        raise KeyboardInterrupt
    _STOP.set()
    sys.stderr.write(f'\n{signal.Signals(signum).name}: stopping before the next step, once the '
                     'checkpoint being written is on disk (again: stop at once)\n')


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; nothing from then on was saved."""


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
    # Training time of the attempts before this one, up to their latest checkpoint.
    train_seconds: float = 0.0

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
    workdir = expand_path(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f'workdir {workdir} is a file: give a folder for the run '
                          '(checkpoints, logs and results)')
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    splits = load_splits(config.data.dataset, config.data.root, seed=config.data.split_seed,
                         csv=config.data.csv)
    splits = {name: limit_records(records, config.data.max_images_per_split)
              for name, records in splits.items()}
    check_splits(splits, config)
    cross = [(name, root, load_splits(name, root, setting='config.data.cross_datasets'))
             for name, root in parse_cross_datasets(config.data.cross_datasets)]

    try:
        mesh = sharding.make_mesh()
    except ValueError as e:
        raise ConfigError(f'the devices of this run: {e}') from None
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
    elif resuming:
        # A fine-tuning run goes on with the architecture it adopted from its
        # model.init_from, as it saved it, whatever init_from says now (it may be gone).
        from smartiqa_jax.checkpoint import training_config
        stored = training_config(os.path.join(checkpoint_dir, str(saved_steps[-1])))
        stored = stored.get('model') or {}
        if stored.get('init_from'):
            config = config.copy_and_resolve_references()
            for key in ARCHITECTURE_KEYS:
                if key in stored:
                    config.model[key] = stored[key]
    model_config = model_config_from(config, splits['train'][0].scale)
    if init is not None:
        from smartiqa_jax.models.smartiqa import UNTRAINED_HEAD
        mapping = init_label_map(init.config, model_config.label_range)
        say(f'Fine-tuning {model_config.variant}/{model_config.fusion} from '
            f'{expand_path(config.model.init_from)}'
            + (f'; scores mapped from {init.config.label_range} to {model_config.label_range}: '
               f'{mapping[0]:.4g} * score {mapping[1]:+.4g}' if mapping else '')
            + ('; its head is untrained (convert from-timm): config.model.backbone_weights '
               'with the timm file starts the head as a from-scratch run does'
               if init.config.label_name == UNTRAINED_HEAD else ''))
    train_labels = [r.score for r in splits['train']]
    mean_label = float(np.mean(train_labels))
    score_scale = score_scale_of(config, train_labels)
    train_graphdef, eval_graphdef, params = build_params(
        config, model_config, mesh, mean_label=mean_label, score_scale=score_scale, init=init,
        read_weights=not resuming)
    if config.model.backbone_weights and not resuming:
        say(f'Swin-{model_config.variant} backbone weights from '
            f'{expand_path(config.model.backbone_weights)} (every key matched)')

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
        raise no_full_batch(feed.num_images, config)
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
    started, earlier_seconds = time.time(), progress.train_seconds

    def save():
        progress.train_seconds = earlier_seconds + time.time() - started
        checkpoints.save(step, params=state.params,
                         train_state=_train_items(state), data_iterators=feed.iterators,
                         progress=progress.to_json(), config=config_json,
                         model_config=_json_model_config(model_config))

    try:
        while step < total_steps and not progress.stopped_early:
            epoch = step // steps_per_epoch + 1
            window_metrics, window_start = [], time.perf_counter()
            bar = tqdm.tqdm(total=steps_per_epoch, initial=step % steps_per_epoch,
                            desc=f'epoch {epoch}/{config.train.num_epochs}', unit='step',
                            disable=not is_main or not config.train.progress_bar, leave=False)
            while True:
                if _STOP.is_set():
                    raise KeyboardInterrupt
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
    except KeyboardInterrupt:   # Ctrl-C, or SIGTERM from the command line (`main`)
        # Each epoch's checkpoint is written in the background: the save in flight is the
        # work this stop keeps, so it finishes before the run ends.
        _stop(checkpoints, log, say)
        raise
    train_seconds = earlier_seconds + time.time() - started   # every attempt's

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
    for (name, root, cross_splits), label in zip(cross, _cross_labels(cross)):
        records = [r for split in cross_splits for r in cross_splits[split]]
        test_sets.append(EvalSet(label, records, config.data, **eval_kwargs))
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


def _stop(checkpoints: TrainCheckpoints, log: MetricLog, say) -> None:
    """Ends an interrupted run: lets the checkpoint being written finish, says where to go on."""
    try:
        checkpoints.wait()
    finally:
        checkpoints.close()
        log.close()
    latest = checkpoints.latest_step()
    say('\nInterrupted: ' + (f'the latest checkpoint is step {latest} in '
                              f'{checkpoints.directory}; ' if latest is not None else
                              'no checkpoint was written yet; ')
        + 'the same command resumes the run.')


def _cross_labels(cross: Sequence[tuple]) -> list[str]:
    """'spaq (all)' for each (name, root, ...) of the cross-dataset sets; a name listed more
    than once (two CSVs) gets its file's name too, or its whole path if that repeats."""
    names = [name for name, *_ in cross]
    bases = [os.path.basename(root.rstrip('/')) for _, root, *_ in cross]
    labels = []
    for (name, root, *_), base in zip(cross, bases):
        if names.count(name) > 1:
            name += ' ' + (base if bases.count(base) == 1 else root)
        labels.append(f'{name} (all)')
    return labels


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
        # Ctrl-C or SIGTERM (a preemption) stops the run between two steps, with the
        # checkpoint in flight written; a second one stops it at once.
        # Restored after: a notebook calling main keeps its own interrupt handling.
        _STOP.clear()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, _request_stop)
        try:
            train_and_evaluate(f.config, workdir)
        except (DatasetNotFoundError, WeightsError, CheckpointError, ConfigError,
                DataError, TrainingDivergedError) as e:
            raise SystemExit(str(e)) from None
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        except OSError as e:   # an unwritable workdir, a full disk: a line, no traceback
            raise SystemExit(f'workdir {workdir}: {e}') from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

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
    main()
