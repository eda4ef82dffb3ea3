"""What a run reports: metrics as JSON lines and TensorBoard scalars, the curves' PNG
and the final table."""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Sequence

import jax


class MetricLog:
    """Metrics as JSON lines and TensorBoard scalars; only process 0 writes.

    resume_step: the step the run starts from (0: a fresh start). What an
    earlier attempt logged after it (work lost with the process, to be redone)
    and its test results (repeated at the end) are dropped, so every step is
    logged once. The test results ('test/...' kinds) go to TensorBoard's run
    tensorboard/test, written afresh by each run that tests.
    """

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.active = jax.process_index() == 0
        self.test_tensorboard = None
        if self.active:
            from tensorboardX import SummaryWriter
            path = os.path.join(workdir, 'metrics.jsonl')
            if resume_step is not None and os.path.exists(path):
                _truncate_metrics(path, resume_step)
            self.jsonl = open(path, 'a')
            self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
            self.tensorboard = SummaryWriter(
                self.tensorboard_dir,
                purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.active:
            return
        record = {'step': step, 'kind': kind, 'time': time.time(), **values}
        self.jsonl.write(json.dumps(record) + '\n')
        self.jsonl.flush()
        writer = self._test_writer() if kind.startswith('test/') else self.tensorboard
        for name, value in values.items():
            if isinstance(value, (int, float)) and name not in ('epoch',):
                writer.add_scalar(f'{kind}/{name}', value, step)
        writer.flush()

    def _test_writer(self):
        # The test is logged at the best epoch's step, before the steps a rerun purges,
        # and a rerun of a finished run repeats it: its events start afresh each time.
        if self.test_tensorboard is None:
            from tensorboardX import SummaryWriter
            folder = os.path.join(self.tensorboard_dir, 'test')
            shutil.rmtree(folder, ignore_errors=True)
            self.test_tensorboard = SummaryWriter(folder)
        return self.test_tensorboard

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tensorboard.close()
            if self.test_tensorboard is not None:
                self.test_tensorboard.close()


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
