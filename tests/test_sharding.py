"""Mesh, batch sharding and the divisibility check; 4 forced CPU devices in a subprocess."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from smartiqa_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_has_one_auto_data_axis():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ('data',)
    assert mesh.axis_types == (AxisType.Auto,)
    assert mesh.devices.size == jax.device_count()


def test_processes_with_different_device_counts_are_refused():
    from types import SimpleNamespace
    on = [SimpleNamespace(process_index=p) for p in (0, 0, 1, 1)]
    sharding.check_same_device_count(on)
    uneven = [SimpleNamespace(process_index=p) for p in (0, 0, 1)]
    with pytest.raises(ValueError, match=r'different numbers of devices \(process 0: 2, '
                                         r'process 1: 1\)'):
        sharding.check_same_device_count(uneven)


def test_batch_must_divide_by_the_device_count():
    mesh = sharding.make_mesh()
    assert sharding.local_batch_size(8, mesh) == 8 // jax.process_count()


def test_shard_batch_keeps_values():
    mesh = sharding.make_mesh()
    batch = {'image': np.arange(24, dtype=np.float32).reshape(4, 2, 3), 'score': np.arange(4.0)}
    out = sharding.shard_batch(batch, mesh)
    np.testing.assert_array_equal(np.asarray(out['image']), batch['image'])
    assert out['score'].sharding.spec == jax.sharding.PartitionSpec('data')


def test_four_devices_split_the_batch_and_reject_uneven_batches():
    script = textwrap.dedent('''
        import jax, numpy as np
        from smartiqa_jax import sharding
        mesh = sharding.make_mesh()
        assert mesh.devices.size == 4
        out = sharding.shard_batch({'x': np.arange(8.0)}, mesh)['x']
        assert [s.data.shape for s in out.addressable_shards] == [(2,)] * 4
        params = sharding.replicate({'w': np.ones(3)}, mesh)['w']
        assert all(s.data.shape == (3,) for s in params.addressable_shards)
        try:
            sharding.local_batch_size(6, mesh)
        except ValueError as e:
            assert 'does not divide by the 4 devices' in str(e), e
        else:
            raise AssertionError('no error for a batch of 6 on 4 devices')
        print('ok')
    ''')
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, '-c', script], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and 'ok' in run.stdout, run.stderr[-3000:]


def test_set_cpu_devices_once_jax_has_started_accepts_only_the_count_in_place():
    count = len(jax.devices('cpu'))
    sharding.set_cpu_devices(0)          # JAX's default: nothing to do
    sharding.set_cpu_devices(count)      # what is already there
    with pytest.raises(ValueError, match=f'cannot split the CPU into {count + 1} devices: '
                                         f'JAX has already started with {count}'):
        sharding.set_cpu_devices(count + 1)
