"""Training checkpoints: one orbax CheckpointManager in `<workdir>/checkpoints`.

A checkpoint at optimiser step `s` holds everything needed to continue the
run as if it had never stopped:

  params        the model's nnx.Param state as a pure dict (what
                `smartiqa_jax.load` and the converters read)
  train_state   optimiser state, step and RNG key
  data_<k>      position of the k-th training-data iterator this process
                feeds (grain's own handler: one file per process)
  progress      JSON: per-epoch history, best epoch, early-stopping counter
  config        JSON: the run's ml_collections config
  model_config  JSON: what rebuilds the model (variant, fusion, dropout,
                drop path, label scale and range)

Saves are asynchronous and atomic (orbax writes to a temporary folder and
renames it), so a process killed at any moment leaves the previous
checkpoints intact. The manager keeps the latest `keep` checkpoints plus the
best one, which the trainer names (`mark_best`) from validation SRCC: one
rule decides "best" for early stopping, testing and keeping, so they cannot
disagree on ties.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from smartiqa_jax.data import checkpoint_args

BEST_STEP_FILE = 'best_step'   # read by smartiqa_jax.checkpoint.find_checkpoint


@dataclasses.dataclass
class _KeepStep(checkpoint_managers.PreservationPolicy):
    """Preserves one step, set at run time (the best epoch's checkpoint)."""
    step: int | None = None

    def should_preserve(self, checkpoints, *, context):
        return [info.step == self.step for info in checkpoints]


class TrainCheckpoints:
    """Saves and restores training checkpoints of one workdir."""

    def __init__(self, workdir: str, *, keep: int):
        # Orbax needs absolute paths.
        self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
        self._best = _KeepStep()
        policy = checkpoint_managers.AnyPreservationPolicy(
            [checkpoint_managers.LatestN(n=keep), self._best])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy, create=True,
                # A save cut short by a kill leaves a temporary folder; clear it on restart.
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        return self.manager.all_steps()

    def save(self, step: int, *, params, train_state, data_iterators: Sequence[Any],
             progress: dict, config: dict, model_config: dict) -> None:
        """Starts an asynchronous save of step `step`."""
        items = dict(
            params=ocp.args.StandardSave(params),
            train_state=ocp.args.StandardSave(train_state),
            progress=ocp.args.JsonSave(progress),
            config=ocp.args.JsonSave(config),
            model_config=ocp.args.JsonSave(model_config),
        )
        for k, iterator in enumerate(data_iterators):
            items[f'data_{k}'] = checkpoint_args(iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, *, params, train_state,
                data_iterators: Sequence[Any]) -> dict:
        """Restores step `step` into the given templates and iterators.

        `params` and `train_state` are pytrees of arrays or
        jax.ShapeDtypeStruct with the target shardings; the iterators are
        moved to their saved positions in place. Returns {'params',
        'train_state', 'progress'}.
        """
        items = dict(
            params=ocp.args.StandardRestore(params),
            train_state=ocp.args.StandardRestore(train_state),
            progress=ocp.args.JsonRestore(),
        )
        for k, iterator in enumerate(data_iterators):
            items[f'data_{k}'] = checkpoint_args(iterator, restore=True)
        restored = self._restore(step, items)
        return {'params': restored['params'], 'train_state': restored['train_state'],
                'progress': restored['progress']}

    def _restore(self, step: int, items: dict) -> Any:
        """manager.restore, with a CheckpointError naming the step and what else is kept."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:   # orbax's, tensorstore's, grain's
            from smartiqa_jax.checkpoint import CheckpointError, first_line
            why = first_line(e)
            if not _unreadable(e):   # e.g. grain: another data source than the saved one
                raise CheckpointError(f'{self.directory}/{step} cannot be restored into this '
                                      f'run: {why}') from e
            others = [s for s in self.all_steps() if s != step]
            what = (f'Steps {", ".join(map(str, others))} are also kept: move '
                    f'{self.directory}/{step} away to go on from step {max(others)}'
                    if others else 'No other step is kept: start again in a new --workdir')
            raise CheckpointError(
                f'{self.directory}/{step} cannot be restored (corrupt or truncated files?): '
                f'{why}. {what}.') from e

    def stored_progress(self, step: int) -> dict:
        """The progress item (JSON) saved with step `step`; {} if it has none or it cannot
        be read (`restore` then says what is wrong with the step)."""
        from smartiqa_jax.checkpoint import CheckpointError, json_item
        try:
            return json_item(os.path.join(self.directory, str(step)), 'progress')
        except CheckpointError:
            return {}

    def stored_config(self, step: int) -> dict:
        """The run config (JSON) saved with step `step`; {} if it has none."""
        from smartiqa_jax.checkpoint import training_config
        return training_config(os.path.join(self.directory, str(step)))

    def data_layout(self, step: int) -> tuple[int, int] | None:
        """(processes, iterators per process) that wrote step `step`'s data positions.

        Grain keeps one file per process (`data_k/process_i-of-n.json`), so a run
        resumes with the same number of processes and shards per process only.
        None when the step holds no data item.
        """
        step_dir = os.path.join(self.directory, str(step))
        iterators = sum(1 for name in os.listdir(step_dir) if re.fullmatch(r'data_\d+', name))
        if not iterators:
            return None
        names = os.listdir(os.path.join(step_dir, 'data_0'))
        pattern = re.compile(r'process_\d+-of-(\d+)\.json')
        counts = {int(m.group(1)) for n in names if (m := pattern.fullmatch(n))}
        return (counts.pop() if len(counts) == 1 else 0), iterators

    def restore_params(self, step: int, params) -> Any:
        """Only the model parameters of step `step` (e.g. the best one, for testing)."""
        return self._restore(step, dict(params=ocp.args.StandardRestore(params)))['params']

    def mark_best(self, step: int, *, write: bool = True) -> None:
        """Keeps step `step` from now on, and (if `write`) records it in
        checkpoints/best_step, which smartiqa_jax.load(workdir) follows.

        Call it once that step is on disk (after `wait`): until then the
        previous best stays protected.
        """
        self._best.step = step
        if not write:
            return
        path = os.path.join(self.directory, BEST_STEP_FILE)
        with open(path + '.tmp', 'w') as f:
            f.write(f'{step}\n')
        os.replace(path + '.tmp', path)  # atomic: a reader sees the old or the new step

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _unreadable(error: BaseException) -> bool:
    """Whether a restore failed on the files themselves (missing, cut short, not parseable)
    rather than on what they hold."""
    import json
    while error is not None:
        text = str(error)
        if (isinstance(error, (OSError, json.JSONDecodeError, EOFError))
                or any(code in text for code in ('OUT_OF_RANGE', 'DATA_LOSS', 'NOT_FOUND',
                                                 'OCDBT', 'tensorstore'))):
            return True
        error = error.__cause__ or error.__context__
    return False
