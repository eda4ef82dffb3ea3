"""Reading PyTorch files with nothing unpickled but tensors and plain data.

torch and numpy only (no JAX): both weights.py and the PyTorch reference read files
through here.
"""

from __future__ import annotations

import os
from typing import Any

# Where training checkpoints keep the weights (the released code: model_state_dict).
WRAPPER_KEYS = ('model_state_dict', 'state_dict', 'model')


def numpy_safe_globals() -> list:
    """numpy's reconstructors of arrays, scalars and dtypes, for torch.load(weights_only=True).

    Training scripts save metrics beside the weights, and a metric from scipy or numpy is
    a numpy.float64 that the weights-only unpickler refuses by default; these build numbers
    and arrays only, never code.
    """
    import numpy as np
    core = getattr(np, '_core', None) or np.core
    allowed = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType')]
    return allowed


def load_weights_only(path: str | os.PathLike) -> Any:
    """torch.load(path, weights_only=True) on the CPU, numpy scalars and arrays allowed."""
    import torch
    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(path, map_location='cpu', weights_only=True)


def refusal_reason(error: BaseException) -> str:
    """The line of a weights-only refusal that names what was refused (torch puts it after
    a paragraph of advice), else the error's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = next((line for line in lines if 'Unsupported global' in line), None)
    return named or (lines[0] if lines else type(error).__name__)


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether `path` ends in .safetensors or starts as one does: an 8-byte header length,
    then the header's JSON."""
    if os.fspath(path).endswith('.safetensors'):
        return True
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{'
