"""SMART-IQA blind image quality assessment in JAX/Flax NNX."""

__version__ = "0.1.0"


def load(path, **config_overrides):
    """Loads a ready SmartIQA model (eval mode) from an orbax checkpoint or training workdir.

    See smartiqa_jax.checkpoint.load; imported lazily so `import smartiqa_jax` stays cheap.
    """
    from smartiqa_jax.checkpoint import load as _load
    return _load(path, **config_overrides)
