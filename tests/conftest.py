"""Shared test setup: a persistent XLA compilation cache, so the same model compiled in
several tests (or in both xdist workers) is compiled once per machine."""

import os

import jax

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      '.pytest_cache', 'jax_compilation_cache')
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
