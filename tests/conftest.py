"""Shared test setup: a persistent XLA compilation cache (the same model compiled in several
tests, or in both xdist workers, is compiled once per machine) and shared fixtures."""

import os

import jax
import pytest

_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'smartiqa_jax', 'test_jax_cache')
# The environment variables reach the trainer subprocesses of test_train_parallel.py too.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '2')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))


@pytest.fixture(scope='session')
def ckpt(tmp_path_factory):
    """A saved nano attention-fusion model checkpoint (random weights); its path."""
    from flax import nnx

    from smartiqa_jax import checkpoint
    from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
    path = tmp_path_factory.mktemp('ckpt') / 'nano'
    checkpoint.save_model(path, SmartIQA(ModelConfig('nano', 'attention'), rngs=nnx.Rngs(0)))
    return str(path)


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory):
    """The demo dataset (CSV + folder), generated once per test process; its root."""
    from smartiqa_jax.data.demo import ensure_demo_dataset
    root = tmp_path_factory.mktemp('demo')
    ensure_demo_dataset(str(root))
    return str(root)


@pytest.fixture
def decode_counts(monkeypatch):
    """Counts image decodes by file name for the test's duration; the Counter."""
    import collections

    from smartiqa_jax import preprocess
    counts = collections.Counter()
    decode = preprocess.decode_image

    def counting_decode(data, name='<bytes>'):
        counts[name] += 1
        return decode(data, name)

    monkeypatch.setattr(preprocess, 'decode_image', counting_decode)
    return counts
