"""JAX's persistent compilation cache, on by default for training and scoring.

Compiling is a fixed cost of every run: Swin-Base's train step takes about a minute on a
GPU, and the demo spends about 40 s of its start compiling on a 2-core CPU. With the
cache, a rerun, a resumed run or a scoring run of a model already compiled on this
machine loads the programs instead (the demo's start: 79 s cold, 41 s warm).
"""

from __future__ import annotations

import os

DEFAULT_DIR = '~/.cache/smartiqa_jax/xla_cache'


def enable(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` ('' or None: off);
    returns the directory in use, or None when off.

    A JAX_COMPILATION_CACHE_DIR set in the environment is left in charge (set but empty:
    off, as JAX reads it). Has to run before the process's first compilation to take
    effect.
    """
    if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
        return os.environ['JAX_COMPILATION_CACHE_DIR'] or None
    if not directory:
        return None
    import jax   # here: the command-line flags read DEFAULT_DIR without importing JAX
    directory = os.path.abspath(os.path.expanduser(directory))
    jax.config.update('jax_compilation_cache_dir', directory)
    return directory
