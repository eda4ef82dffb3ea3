"""A run's parameters: where they start (from scratch, timm backbone weights or a whole
model to fine-tune) and the affine maps folded into the score layers (label ranges,
calibration)."""

from __future__ import annotations

from typing import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from smartiqa_jax import sharding, train_state
from smartiqa_jax.train_config import ConfigError
from smartiqa_jax.train_data import expand_path


ARCHITECTURE_KEYS = ('variant', 'fusion', 'patch_norm')
# From-scratch initialisation settings that a whole-model checkpoint makes moot.
INIT_KEYS = {'backbone_init': 'timm', 'hyper_conv_init': 'model', 'score_bias_init': 'model'}


def load_init_model(config: ml_collections.ConfigDict):
    """The model config.model.init_from names, for fine-tuning; None when it is ''.

    A model checkpoint, a training workdir or step directory (the model
    `smartiqa_jax.load` returns from it), or a released SMART-IQA PyTorch
    state_dict file. Errors name the setting and the path.
    """
    if not config.model.init_from:
        return None
    from smartiqa_jax import checkpoint, weights
    if config.model.backbone_weights:
        raise ConfigError('config.model.init_from and config.model.backbone_weights both give '
                          'the backbone; set one of them')
    path = expand_path(config.model.init_from)
    try:
        return checkpoint.load(path)
    except (checkpoint.CheckpointError, weights.WeightsError) as e:
        raise type(e)(f'config.model.init_from: {e}') from None
    except ValueError as e:   # e.g. a model_config with keys of another version
        raise ConfigError(f'config.model.init_from {path}: {e}') from None


def adopt_architecture(config: ml_collections.ConfigDict, init_config) -> list[str]:
    """Sets config.model's variant, fusion and patch_norm to the init model's, in place.

    A fine-tuned model has the architecture of the one it starts from, so these
    come from the checkpoint whatever the config says. Returns a line per setting
    that changed and per from-scratch init setting that no longer applies.
    """
    notes = []
    for key in ARCHITECTURE_KEYS:
        value = getattr(init_config, key)
        if config.model[key] != value:
            notes.append(f'model.{key}: {value!r} from model.init_from '
                         f'(the config said {config.model[key]!r})')
            config.model[key] = value
    for key, default in INIT_KEYS.items():
        if config.model[key] != default:
            notes.append(f'model.{key}={config.model[key]!r} not applied: every parameter '
                         'comes from model.init_from')
    return notes


def init_label_map(init_config, target: Sequence[float]) -> tuple[float, float] | None:
    """label_range_map from the init model's label range; None for an untrained head
    (`convert from-timm`), whose scores are on no scale to map from."""
    from smartiqa_jax.models.smartiqa import UNTRAINED_HEAD
    if init_config.label_name == UNTRAINED_HEAD:
        return None
    return label_range_map(init_config.label_range, target)


def label_range_map(source: Sequence[float], target: Sequence[float]
                    ) -> tuple[float, float] | None:
    """(a, b) taking label range `source` linearly onto `target`; None when they are equal.

    Folded into the score layers (fold_affine), it makes a model trained on
    KonIQ's 0..100 start a fine-tuning on 1..5 labels predicting 1..5.
    """
    (lo, hi), (new_lo, new_hi) = map(tuple, (source, target))
    if (lo, hi) == (new_lo, new_hi):
        return None
    if not hi > lo:
        raise ConfigError(f'label range {(lo, hi)} of model.init_from is empty')
    a = (new_hi - new_lo) / (hi - lo)
    return a, new_lo - a * lo


def fold_affine(params: dict, a: float, b: float) -> dict:
    """The parameters of the same model predicting a * score + b.

    The score is b5 + w5 . q, with w5 and b5 Linears of the hyper feature, so
    scaling both layers by a and adding b to b5's bias is exact.
    """
    params = dict(params)
    params['w5_fc'] = {k: v * a for k, v in params['w5_fc'].items()}
    params['b5_fc'] = {'kernel': params['b5_fc']['kernel'] * a,
                       'bias': params['b5_fc']['bias'] * a + b}
    return params


def score_scale_of(config, labels: Sequence[float]) -> float:
    """The factor the score layers are parameterised in (1: as released).

    'label_std': the standard deviation of the training labels, so the run
    trains as if on z-scored labels (optim.make_optimizer, score_scale).
    """
    if config.model.score_scale == 'label_std':
        return float(np.std(labels)) or 1.0
    if config.model.score_scale != 'model':
        raise ConfigError(f"config.model.score_scale must be 'model' or 'label_std', "
                          f"got {config.model.score_scale!r}")
    return 1.0


def build_params(config, model_config, mesh, *, mean_label: float, score_scale: float = 1.0,
                  init=None, read_weights: bool = True):
    """Initial parameters: the model's init, then the config's backbone weights and score head.

    init: a whole model to start from instead (config.model.init_from, via
    load_init_model, with the architecture adopted): its parameters, with the
    scores mapped from its label range onto model_config's (label_range_map).
    read_weights: False skips config.model.backbone_weights (a resumed run, whose
    checkpoint then gives every parameter).
    """
    from smartiqa_jax.models.smartiqa import SmartIQA
    from smartiqa_jax.optim import SCORE_LAYERS
    if config.model.backbone_init != 'timm' and config.model.backbone_weights:
        raise ConfigError(f'config.model.backbone_init={config.model.backbone_init!r} is for '
                          'training from scratch; it would overwrite config.model.backbone_weights')
    train_graphdef, eval_graphdef, params = train_state.init_params(
        lambda: SmartIQA(model_config, rngs=nnx.Rngs(config.seed)), mesh)
    if init is not None:
        loaded = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init, nnx.Param)))
        pairs = zip(jax.tree.leaves(loaded), jax.tree.leaves(params))
        if jax.tree.structure(loaded) != jax.tree.structure(params) or any(
                a.shape != b.shape for a, b in pairs):
            raise ConfigError('config.model.init_from: its parameters do not fit the '
                              f'{model_config.variant}/{model_config.fusion} model')
        mapping = init_label_map(init.config, model_config.label_range)
        if mapping:
            loaded = fold_affine(loaded, *mapping)
        return train_graphdef, eval_graphdef, sharding.replicate(loaded, mesh)
    host = {}   # the parameters as a pure dict on the host, made by the first change

    def editable() -> dict:
        if not host:
            host.update(jax.device_get(params))
        return host

    if config.model.backbone_weights and read_weights:
        from smartiqa_jax import weights
        model = nnx.merge(eval_graphdef, jax.device_get(params))
        try:
            weights.load_timm_backbone(model, expand_path(config.model.backbone_weights))
        except weights.WeightsError as e:
            raise weights.WeightsError(f'config.model.backbone_weights: {e}') from None
        host.update(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if config.model.backbone_init == 'fan_in':
        # timm's trunc-normal 0.02 suits Swin's widths of 96+ (and ImageNet-long
        # schedules). In a 16- or 32-wide Swin a 0.02 Linear scales its input by
        # ~0.1, so every block starts nearly as the identity and nearly linear.
        # LeCun-normal (std 1/sqrt(fan_in)) makes the blocks nonlinear from the
        # start: configs/demo.py uses it (its docstring has the comparison).
        pure = editable()

        def rescale(path, leaf):
            leaf = np.asarray(leaf)
            if path[-1].key == 'kernel' and leaf.ndim == 2:
                return leaf * (leaf.shape[0] ** -0.5 / 0.02)
            return leaf
        pure['backbone'] = jax.tree_util.tree_map_with_path(rescale, pure['backbone'])
    elif config.model.backbone_init != 'timm':
        raise ConfigError(f"config.model.backbone_init must be 'timm' or 'fan_in', "
                          f"got {config.model.backbone_init!r}")
    if config.model.hyper_conv_init == 'kaiming':
        # The released 1x1 conv stack before the hyper feature has PyTorch's
        # default init (uniform, variance 1/(3 fan_in)): with ReLUs each layer
        # shrinks its input ~2.4x, so from a random backbone the hyper feature
        # is ~15x smaller than the fused features, and the generated weights
        # are the generating layers' biases, nearly the same for every image.
        # Kaiming-uniform (variance 2/fan_in, sqrt(6) times the released
        # bound) keeps the scale, so the target network depends on the image
        # from the first step.
        for layer in editable()['hyper_convs'].values():
            layer['kernel'] = np.asarray(layer['kernel']) * np.sqrt(6.0)
    elif config.model.hyper_conv_init != 'model':
        raise ConfigError(f"config.model.hyper_conv_init must be 'model' or 'kaiming', "
                          f"got {config.model.hyper_conv_init!r}")
    if score_scale != 1.0:
        # The score is b5 + w5 . q with w5 and b5 Linears of the hyper feature.
        # From a random backbone its spread over images starts far below a
        # unit (nano: ~0.005), the labels' is ~20 on 0..100: under Adam, whose
        # steps are ~lr whatever the gradient, those layers need thousands of
        # steps to grow that far, and until then L1/L2 see a constant
        # prediction. Scaled by the label std (and their rate by as much:
        # optim.make_optimizer), they start and move at the labels' scale, as
        # if the labels were z-scored; the parameters stay in label units.
        pure = editable()
        for name in SCORE_LAYERS:
            pure[name] = {k: np.asarray(v) * score_scale for k, v in pure[name].items()}
    if config.model.score_bias_init == 'mean_label':
        # The score is b5 + w5 . q, and b5 is a Linear of the hyper feature: its
        # bias sets where scores start. Starting at the mean label (instead of
        # ~0 on a 0..100 scale) saves a from-scratch run hundreds of steps of
        # only shifting its output, time in which the features do not learn.
        bias = editable()['b5_fc']['bias']
        host['b5_fc']['bias'] = np.full_like(bias, mean_label)
    elif config.model.score_bias_init != 'model':
        raise ConfigError(f"config.model.score_bias_init must be 'model' or 'mean_label', "
                          f"got {config.model.score_bias_init!r}")
    if host:
        params = sharding.replicate(host, mesh)
    return train_graphdef, eval_graphdef, params


def calibrate_score_layers(params: dict, predictions: np.ndarray, labels: np.ndarray
                           ) -> tuple[dict, tuple[float, float] | None]:
    """Fits labels ~ a * predictions + b (least squares) and folds it into the score layers.

    The fit is folded in by `fold_affine`: the model then predicts
    a * score + b exactly. For a scale-free loss (plcc, rank_hinge, fidelity),
    whose scores have an arbitrary scale and offset: the ranking, SRCC, PLCC
    and KRCC are unchanged, RMSE becomes meaningful. Returns (params, (a, b)),
    or (params unchanged, None) when a <= 0 (that would reverse the ranking)
    or fewer than two distinct predictions are finite.
    """
    keep = np.isfinite(predictions)
    x, y = np.asarray(predictions, np.float64)[keep], np.asarray(labels, np.float64)[keep]
    if len(np.unique(x)) < 2:
        return params, None
    a, b = np.polyfit(x, y, 1)
    if not a > 0:
        return params, None
    return fold_affine(params, a, b), (float(a), float(b))
