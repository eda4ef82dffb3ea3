"""Evaluation metrics for quality prediction: SRCC, PLCC, KRCC, RMSE (SPEC 2).

These run on the host with numpy/scipy, once per evaluation, on per-image
scores (after averaging each image's crops). Predictions and labels are (N,)
arrays on the label scale. PLCC here is the raw Pearson correlation, without
the 4-parameter logistic fit some papers apply first; RMSE is in label units.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats


def _finite_or_nan(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else float('nan')


def quality_metrics(pred, target) -> dict[str, float]:
    """SRCC, PLCC, KRCC, RMSE of per-image predictions against labels.

    Args:
      pred: (N,) predicted scores, label scale.
      target: (N,) ground-truth scores, same scale.

    Returns:
      {'srcc', 'plcc', 'krcc', 'rmse'} as Python floats. A correlation is NaN
      when it is undefined (fewer than 2 images, constant predictions, or a
      non-finite prediction).
    """
    pred = np.asarray(pred, np.float64).reshape(-1)
    target = np.asarray(target, np.float64).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f'pred {pred.shape} and target {target.shape} differ.')
    rmse = float(np.sqrt(np.mean((pred - target) ** 2))) if pred.size else float('nan')
    if (pred.size < 2 or not np.all(np.isfinite(pred)) or np.ptp(pred) == 0
            or np.ptp(target) == 0):
        nan = float('nan')
        return {'srcc': nan, 'plcc': nan, 'krcc': nan, 'rmse': rmse}
    return {
        'srcc': _finite_or_nan(scipy.stats.spearmanr(pred, target)[0]),
        'plcc': _finite_or_nan(scipy.stats.pearsonr(pred, target)[0]),
        'krcc': _finite_or_nan(scipy.stats.kendalltau(pred, target)[0]),
        'rmse': rmse,
    }
