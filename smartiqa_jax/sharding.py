"""Data parallelism over one mesh axis, `data`, on one host or many.

Parameters and optimiser state are replicated; each batch is split along its
leading axis over every device of every process. Each process loads only its
own part of the global batch (its "local batch") and
`jax.make_array_from_process_local_data` stitches the parts into one global
array, so the jitted step sees exactly the batch a single device would.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed(*, auto: bool = False,
                           coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-process run; a no-op for a single process.

    Must run before anything else touches a JAX device. On TPU pods and managed
    GPU clusters (SLURM, Open MPI, Kubernetes) JAX finds the coordinator itself:
    pass `auto=True`. Elsewhere pass the coordinator's host:port, the number of
    processes and this process's id. CPU processes exchange data through gloo.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if not auto and all(v is None for v in explicit):
        return
    # Only the CPU client reads this; without it CPU processes cannot all-reduce.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def set_cpu_devices(count: int) -> None:
    """Splits the host CPU into `count` XLA devices (0: leave JAX's default, one).

    The data-parallel mesh then runs a part of every batch on each of them, each
    on its own thread. XLA:CPU spreads a single program over the cores only in
    part (its small and elementwise ops run on one), so on a 2-core CPU two
    devices train the demo's model about 1.3x faster and run Swin-T/B inference
    1.2-1.4x faster than one (BENCHMARKS.md, "One XLA device per core"). The
    global batch must divide by the count. Has to run before JAX initialises its
    backends (before any computation); later, only the count already in place is
    accepted. Only the CPU backend is affected: a GPU or TPU run keeps its devices.
    """
    if count <= 0:
        return
    try:
        jax.config.update('jax_num_cpu_devices', count)
    except RuntimeError:
        current = len(jax.devices('cpu'))
        if current != count:
            raise ValueError(
                f'cannot split the CPU into {count} devices: JAX has already started with '
                f'{current}; set the count before any JAX computation (a fresh process), '
                f'or set XLA_FLAGS=--xla_force_host_platform_device_count={count}') from None


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (every process's), axis 'data'.

    The axis type is Auto: jax 0.10's `make_mesh` would default to Explicit,
    which changes how jit propagates shardings through the model.
    """
    devices = jax.devices() if devices is None else list(devices)
    check_same_device_count(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(AxisType.Auto,), devices=devices)


def check_same_device_count(devices) -> None:
    """Raises ValueError unless every process owns as many of `devices` as the others.

    Each process feeds global batch / process count examples, which must split evenly
    over its own devices: with 2 GPUs on one host and 1 on another, every batch would
    fail deep inside JAX. Every process sees the same device list, so all of them stop.
    """
    counts = collections.Counter(d.process_index for d in devices)
    if len(set(counts.values())) > 1:
        per_process = ', '.join(f'process {p}: {n}' for p, n in sorted(counts.items()))
        raise ValueError(
            f'the processes have different numbers of devices ({per_process}); data '
            'parallelism gives each process an equal share of every batch, so each needs '
            'as many devices (e.g. the same CUDA_VISIBLE_DEVICES count on every host)')


def tracing_mesh(mesh: Mesh | None):
    """A context in which jitted code is traced knowing `mesh` (its abstract form).

    Data parallelism needs no more than input shardings, except for code that XLA cannot
    split over devices: the Pallas window attention kernels, which then run per device
    under `jax.shard_map` (`swin.window_attention_pallas`). The train, eval and scoring
    steps trace their model inside this. None: no mesh (one device).
    """
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters, optimiser state and scalars: a copy everywhere."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: the leading (example) axis split over 'data'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of the global batch.

    Raises ValueError when the global batch does not split evenly over the
    devices, which would otherwise fail deep inside XLA or pad silently.
    """
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f'The global batch size {global_batch_size} does not divide by the '
            f'{num_devices} devices of the mesh; choose a multiple of {num_devices}.')
    return global_batch_size // jax.process_count()


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays of this process's local batch -> global arrays on the mesh.

    Args:
      batch: name -> numpy array whose leading axis is the local batch.
      mesh: from `make_mesh`.

    Returns:
      name -> jax.Array with leading axis local batch x process count, sharded
      over 'data'.
    """
    sharding = batch_sharding(mesh)
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in batch.items()}


def replicate(tree, mesh: Mesh):
    """Places a pytree of host or device arrays on every device of the mesh.

    Every process must pass the same values (they do: all start from the same
    seed, or restore the same checkpoint).
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        tree)
