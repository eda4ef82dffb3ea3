"""The trainer gives the same model on 1 or 4 devices, on 1 or 2 processes, and
after a SIGKILL and restart.

Each run is the real command line (`python -m smartiqa_jax.train`) in a
subprocess: XLA's device count and jax.distributed must be set before JAX
starts. The runs share a persistent compilation cache, so programs with the
same shapes compile once.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    return env


def _command(workdir, demo_root, *extra) -> list:
    return [sys.executable, '-m', 'smartiqa_jax.train', '--config', 'configs/smoke.py',
            '--workdir', str(workdir), f'--config.data.root={demo_root}', *extra]


def _train(workdir, demo_root, *extra, devices=1):
    run = subprocess.run(_command(workdir, demo_root, *extra), cwd=REPO, env=_env(devices),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run


def _final_params(workdir) -> dict:
    """Parameters of the last checkpoint, flattened to {'a/b/c': array}."""
    root = os.path.join(workdir, 'checkpoints')
    step = max(int(d) for d in os.listdir(root) if d.isdigit())
    path = os.path.join(root, str(step), 'params')
    checkpointer = ocp.StandardCheckpointer()
    # Restore onto this process's one device whatever mesh the run used.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    tree = checkpointer.restore(path, target)
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f'{prefix}/{k}', v)
        else:
            flat[prefix] = np.asarray(node)
    walk('', tree)
    return step, flat


def _assert_same_params(a, b, atol):
    step_a, params_a = _final_params(a)
    step_b, params_b = _final_params(b)
    assert step_a == step_b
    assert params_a.keys() == params_b.keys()
    worst = max(float(np.max(np.abs(params_a[k] - params_b[k]))) for k in params_a)
    assert worst <= atol, f'largest parameter difference {worst}'


def test_one_and_four_devices_train_the_same_parameters(tmp_path, demo_root):
    _train(tmp_path / 'one', demo_root, devices=1)
    _train(tmp_path / 'four', demo_root, devices=4)
    _assert_same_params(tmp_path / 'one', tmp_path / 'four', atol=1e-5)
    # config.train.cpu_devices splits the CPU itself (no XLA_FLAGS), to the same result.
    run = _train(tmp_path / 'two', demo_root, '--config.train.cpu_devices=2', devices=1)
    assert '2 cpu device(s)' in run.stdout
    assert '(float32, xla window attention)' in run.stdout   # 'auto' on a CPU
    _assert_same_params(tmp_path / 'one', tmp_path / 'two', atol=1e-5)
    # This process has one device: the checkpoint of the 2-device run still loads.
    import smartiqa_jax
    model = smartiqa_jax.load(tmp_path / 'two')
    assert model.predict(np.zeros((1, 224, 224, 3), np.float32))['score'].shape == (1,)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_reading_two_shards(tmp_path, demo_root):
    port = _free_port()
    workdir = tmp_path / 'two'
    procs = [
        subprocess.Popen(
            _command(workdir, demo_root, f'--coordinator_address=localhost:{port}',
                     '--num_processes=2', f'--process_id={i}'),
            cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    _train(tmp_path / 'one', demo_root, '--config.data.shard_count=2', devices=1)
    # The same batches: every step's loss agrees to float rounding.
    losses = [[r['loss'] for r in map(json.loads, open(w / 'metrics.jsonl'))
               if r.get('kind') == 'train'] for w in (tmp_path / 'one', workdir)]
    assert len(losses[0]) == 6
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # Two processes sum their gradients in another order than one device does; Adam makes
    # an element whose gradient is near 0 move by up to lr (1e-4 here) either way, so the
    # parameters agree to a step of lr, not to rounding.
    _assert_same_params(tmp_path / 'one', workdir, atol=2e-4)


def _committed_steps(workdir) -> list:
    root = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(root):
        return []
    # Orbax renames a finished checkpoint's temporary folder to the bare step number.
    return [d for d in os.listdir(root) if d.isdigit()]


def test_sigkill_and_restart_ends_like_an_uninterrupted_run(tmp_path, demo_root):
    _train(tmp_path / 'whole', demo_root)
    workdir = tmp_path / 'killed'
    proc = subprocess.Popen(_command(workdir, demo_root), cwd=REPO, env=_env(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not _committed_steps(workdir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, 'the run ended before it could be killed'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = _committed_steps(workdir)
    run = _train(workdir, demo_root)
    assert 'Resumed from step' in run.stdout, (steps, run.stdout)
    _assert_same_params(tmp_path / 'whole', workdir, atol=0.0)
    histories = [json.load(open(os.path.join(w, 'summary.json')))['history']
                 for w in (tmp_path / 'whole', workdir)]
    assert histories[0] == histories[1]       # per-epoch losses and validation metrics

    def logged(w):   # metrics.jsonl: what was lost with the process is logged once, when redone
        return [(r['step'], r['kind']) for r in map(json.loads, open(os.path.join(w, 'metrics.jsonl')))]
    assert logged(workdir) == logged(tmp_path / 'whole')


def test_compiled_programs_go_to_the_persistent_cache(tmp_path, demo_root):
    """train.compilation_cache_dir: the run's programs are written there, and a second
    run of the same config finds them."""
    env = _env()
    env.pop('JAX_COMPILATION_CACHE_DIR', None)   # the tests' own cache would take over
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    cache = tmp_path / 'xla_cache'
    for name in ('first', 'second'):
        run = subprocess.run(
            _command(tmp_path / name, demo_root, f'--config.train.compilation_cache_dir={cache}'),
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-5000:]
        if name == 'first':
            entries = set(os.listdir(cache))
            assert entries, 'nothing was cached'
    # The second run compiled nothing new: every program came from the cache.
    assert set(os.listdir(cache)) == entries


def test_compilation_cache_setting(monkeypatch, tmp_path):
    from smartiqa_jax import compilation_cache
    calls = []
    monkeypatch.setattr(jax.config, 'update', lambda *a: calls.append(a))
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
    assert compilation_cache.enable('') is None and not calls
    assert compilation_cache.enable(str(tmp_path / 'c')) == str(tmp_path / 'c')
    assert calls == [('jax_compilation_cache_dir', str(tmp_path / 'c'))]
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '/elsewhere')
    assert compilation_cache.enable(str(tmp_path / 'c')) == '/elsewhere'
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '')    # set empty: off, as JAX reads it
    assert compilation_cache.enable(str(tmp_path / 'c')) is None
    assert len(calls) == 1


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_keeps_the_epoch_just_saved_and_resumes_from_it(tmp_path, demo_root,
                                                                          signum):
    """Sent just after an epoch ends, while its checkpoint is still being written in the
    background: the run waits for it, says where it stopped and exits 130; the same
    command goes on from that epoch."""
    workdir = tmp_path / 'stopped'
    proc = subprocess.Popen(_command(workdir, demo_root, '--config.train.progress_bar=False'),
                            cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('epoch 1:'):
            proc.send_signal(signum)
            break
    out = ''.join(lines) + proc.stdout.read()
    assert proc.wait(timeout=600) == 130, out[-3000:]
    found = re.search(rf'Interrupted: the latest checkpoint is step (\d+) in '
                      rf'{workdir}/checkpoints; the same command resumes the run', out)
    assert found, out[-3000:]
    step = int(found.group(1))
    epoch_end = [r['step'] for r in map(json.loads, open(workdir / 'metrics.jsonl'))
                 if r['kind'] == 'validation'][0]
    assert step >= epoch_end and str(step) in _committed_steps(workdir)   # epoch 1 is kept
    run = _train(workdir, demo_root)
    assert f'Resumed from step {step}' in run.stdout
