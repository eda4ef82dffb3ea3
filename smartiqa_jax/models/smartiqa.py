"""SMART-IQA: Swin features -> local-distortion vector, fused 7x7 map -> hyper network ->
per-image target network -> quality score (SPEC 1.2-1.5).

The pooling, fusion and target network are plain functions of arrays; the module only
holds parameters. The target network is applied per image with `jax.vmap` over the
generated parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smartiqa_jax.models import initializers as init
from smartiqa_jax.models import swin
from smartiqa_jax.models.variants import get_variant
from smartiqa_jax.preprocess import SYMMETRIES

FUSIONS: tuple[str, ...] = ('attention', 'multiscale', 'backbone')

# Widths of the released model (HyperIQA's target network sizes).
TARGET_IN = 224                  # length of the target network's input vector
COMPUTE_DTYPES = ('float32', 'bfloat16')
# The label name of a model whose head has not been trained (`convert from-timm`): its
# scores are on no scale, and fine-tuning does not map them onto one.
UNTRAINED_HEAD = 'none (untrained head)'
LDA_CHANNELS = (16, 32, 64)      # 1x1 conv widths of the local-distortion branches, stages 0-2
LDA_OUT = 16                     # each of those branches' Linear output
HYPER_WIDTHS = (512, 256, 112)   # the 1x1 conv stack before the hyper feature
HYPER_DIM = 112                  # channels of the hyper feature h
TARGET_WIDTHS = (112, 56, 28, 14)  # hidden sizes of the target network
ATTENTION_HIDDEN = 256
FEATURE_SIZE = 7                 # every stage is pooled to 7x7 for fusion

_kaiming_normal = init.kaiming_normal()
_attention_init = init.normal(0.01)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint needs to rebuild its model.

    Attributes:
      variant: backbone size, a key of models.variants.VARIANTS.
      fusion: 'attention' (full SMART-IQA), 'multiscale' (no stage attention) or
        'backbone' (stage 3 only), the paper's Table II.
      dropout: hyper feature / target net dropout; None takes the variant's released default.
      drop_path_rate: Swin stochastic depth; None takes the variant's released default.
      attention_dropout: dropout inside the stage-attention MLP (0.5 released).
      label_name: what the score means, e.g. 'koniq10k MOS_zscore'.
      label_range: (low, high) of the training labels; higher is better.
      dtype: compute dtype name ('float32' or 'bfloat16'); parameters are always fp32.
      attention: Swin window attention implementation: 'auto' (the default: 'pallas' for
        bfloat16 on an NVIDIA GPU from Ampere on, else 'xla'; swin.resolve_attention),
        'xla' (any device), 'pallas' (fused Triton kernels; GPUs) or 'cudnn' (cuDNN's fused
        attention; a CUDA GPU and bfloat16). Same parameters whichever it is.
      patch_norm: the LayerNorm after Swin's patch embedding. True in every released
        model; False (the demo's choice) leaves it out, and the export then lacks its
        two tensors (torch_reference.SmartIQATorch(patch_norm=False) loads it).
    """

    variant: str = 'tiny'
    fusion: str = 'attention'
    dropout: float | None = None
    drop_path_rate: float | None = None
    attention_dropout: float = 0.5
    label_name: str = 'koniq10k MOS_zscore'
    label_range: tuple[float, float] = (0.0, 100.0)
    dtype: str = 'float32'
    attention: str = 'auto'
    patch_norm: bool = True

    def __post_init__(self):
        variant = get_variant(self.variant)
        if self.fusion not in FUSIONS:
            raise ValueError(f'unknown fusion {self.fusion!r}; choose one of {", ".join(FUSIONS)}')
        if self.attention not in swin.ATTENTION_CHOICES:
            raise ValueError(f'unknown attention {self.attention!r}; choose one of '
                             f'{", ".join(swin.ATTENTION_CHOICES)}')
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f'unknown dtype {self.dtype!r}; choose one of '
                             f'{", ".join(COMPUTE_DTYPES)}')
        if self.attention == 'cudnn' and self.dtype != 'bfloat16':
            raise ValueError("attention='cudnn' needs dtype='bfloat16' (cuDNN's fused "
                             "attention takes bf16 or fp16 only)")
        if self.dropout is None:
            object.__setattr__(self, 'dropout', variant.dropout)
        if self.drop_path_rate is None:
            object.__setattr__(self, 'drop_path_rate', variant.drop_path_rate)
        object.__setattr__(self, 'label_range', tuple(float(v) for v in self.label_range))
        for name in ('dropout', 'drop_path_rate', 'attention_dropout'):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f'{name} must be in [0, 1), got {rate}')

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> 'ModelConfig':
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f'unknown model config keys {sorted(unknown)}')
        return cls(**d)


# ----------------------------------------------------------------------------- pure functions


def avg_pool(x: jax.Array, size: int) -> jax.Array:
    """Non-overlapping average pooling of (B, H, W, C) with square windows of `size`."""
    b, h, w, c = x.shape
    return x.reshape(b, h // size, size, w // size, size, c).mean(axis=(2, 4))


def adaptive_pool(x: jax.Array, out: int = FEATURE_SIZE) -> jax.Array:
    """Adaptive average pooling to (B, out, out, C); the stage sizes divide exactly."""
    return avg_pool(x, x.shape[1] // out)


def flatten_channel_major(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C*H*W) in PyTorch's NCHW flatten order (what the released Linears expect)."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)


def fuse_stages(stage_features: list[jax.Array], stage_weights: jax.Array | None) -> jax.Array:
    """Multi-scale fusion: each stage pooled to 7x7, optionally weighted, concatenated.

    stage_features: the four NHWC stage outputs; stage_weights: (B, 4) or None.
    Returns (B, 7, 7, 15C).
    """
    pooled = [adaptive_pool(f) for f in stage_features]
    if stage_weights is not None:
        pooled = [p * stage_weights[:, i, None, None, None] for i, p in enumerate(pooled)]
    return jnp.concatenate(pooled, axis=-1)


def conv_output_as_matrix(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """(B, 7, 7, K) conv output -> (B, rows, cols), viewing it as PyTorch's (B, K, 7, 7) does."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], rows, cols)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `key` is None (eval) or the rate is 0."""
    if key is None or rate == 0.0:
        return x
    if rate >= 1.0:   # everything dropped; x / 0 would make the gradient NaN
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def target_network(params: dict[str, jax.Array], x: jax.Array, rate: float = 0.0,
                   key: jax.Array | None = None) -> jax.Array:
    """One image's target network: 4 sigmoid layers with dropout between, then a linear score.

    params: {'w1': (112, 224), 'b1': (112,), ..., 'w5': (1, 14), 'b5': (1,)};
    x: (224,). Returns a scalar. Use with jax.vmap for a batch of images.
    """
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
    q = x
    for i in range(1, 5):
        q = jax.nn.sigmoid(params[f'w{i}'] @ q + params[f'b{i}'])
        if i < 4:
            q = dropout(q, rate, keys[i - 1])
    return (params['w5'] @ q + params['b5'])[0]


def symmetric_views(images: jax.Array, symmetries: int) -> jax.Array:
    """(B, H, W, C) square crops -> (symmetries, B, H, W, C): the crops themselves (1),
    with their mirror images (2), their four 90-degree rotations (4), or all eight
    rotations and mirrors (8): the symmetries that training with `hflip` and
    `rotate90` shows the model."""
    if symmetries not in SYMMETRIES:
        raise ValueError(f'symmetries must be one of {SYMMETRIES}, got {symmetries}')
    mirror = lambda x: x[:, :, ::-1]
    if symmetries <= 2:
        return jnp.stack([images, mirror(images)][:symmetries])
    rotations = [jnp.rot90(images, k, axes=(1, 2)) for k in range(4)]
    if symmetries == 4:
        return jnp.stack(rotations)
    return jnp.stack([view for x in rotations for view in (x, mirror(x))])


def mean_over_symmetries(apply, images: jax.Array, symmetries: int):
    """`apply(images)` (a pytree of per-image arrays) averaged over `symmetric_views`;
    the views are scored one after another (`jax.lax.map`), so memory is one batch's."""
    if symmetries == 1:
        return apply(images)
    outputs = jax.lax.map(apply, symmetric_views(images, symmetries))
    return jax.tree.map(lambda x: x.mean(0), outputs)


# ----------------------------------------------------------------------------- the module


@nnx.jit(static_argnums=2)
def _predict(model: 'SmartIQA', images: jax.Array, micro_batch: int | None) -> dict[str, jax.Array]:
    return model(images, micro_batch=micro_batch)


def _linear(din, dout, rngs, kernel_init=_kaiming_normal, bias_init=None, use_bias=True):
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=kernel_init,
                      bias_init=bias_init or init.torch_default_bias(din), rngs=rngs)


def _conv(din, dout, size, rngs, kernel_init=_kaiming_normal):
    return nnx.Conv(din, dout, (size, size), padding='SAME', kernel_init=kernel_init,
                    bias_init=init.torch_default_bias(din * size * size), rngs=rngs)


class SmartIQA(nnx.Module):
    """SMART-IQA on a Swin backbone.

    `model(images)` takes (B, 224, 224, 3) ImageNet-normalised NHWC crops and returns a dict:
      score: (B,) float32 quality on the label scale (KonIQ MOS_zscore 0..100, higher is better);
      stage_weights: (B, 4) softmax stage attention (attention fusion), else None.
    `model.analyse(images)` also returns the features and the generated target parameters.

    The model starts in eval mode (deterministic). `model.train()` enables dropout and drop
    path, which then draw from `rngs.dropout` passed at call time.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        variant = get_variant(config.variant)
        dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else None
        dims = variant.stage_dims
        self.backbone = swin.SwinTransformer(variant, drop_path_rate=config.drop_path_rate,
                                             rngs=rngs, dtype=dtype, attention=config.attention,
                                             patch_norm=config.patch_norm)
        # Local-distortion-aware branches (SPEC 1.2): 1x1 convs as Linears over channels.
        self.lda_convs = nnx.List([
            _linear(dims[i], LDA_CHANNELS[i], rngs, use_bias=False) for i in range(3)])
        # Pooling stage i (56 >> i per side) by 7 leaves (8 >> i)**2 positions per channel.
        self.lda_fcs = nnx.List([
            _linear(LDA_CHANNELS[i] * (8 >> i) ** 2, LDA_OUT, rngs) for i in range(3)])
        self.lda_fcs.append(_linear(dims[3], TARGET_IN - 3 * LDA_OUT, rngs))
        if config.fusion == 'attention':
            self.attention_fc1 = _linear(dims[3], ATTENTION_HIDDEN, rngs, _attention_init, init.zeros)
            self.attention_fc2 = _linear(ATTENTION_HIDDEN, 4, rngs, _attention_init, init.zeros)
        else:
            self.attention_fc1 = self.attention_fc2 = None
        fused = dims[3] if config.fusion == 'backbone' else sum(dims)
        widths = (fused,) + HYPER_WIDTHS
        self.hyper_convs = nnx.List([
            _linear(widths[i], widths[i + 1], rngs, init.torch_default_kernel())
            for i in range(3)])
        target_dims = (TARGET_IN,) + TARGET_WIDTHS
        # Weight-generating 3x3 convs: out channels * 49 = rows * cols of the generated matrix.
        self.weight_convs = nnx.List([
            _conv(HYPER_DIM, target_dims[i + 1] * target_dims[i] // FEATURE_SIZE**2, 3, rngs)
            for i in range(4)])
        self.bias_fcs = nnx.List([_linear(HYPER_DIM, target_dims[i + 1], rngs) for i in range(4)])
        self.w5_fc = _linear(HYPER_DIM, TARGET_WIDTHS[-1], rngs)
        self.b5_fc = _linear(HYPER_DIM, 1, rngs)
        self.deterministic = False
        # NNX's eval()/train() set `deterministic` on every submodule that has the attribute.
        self.eval()

    def set_view(self, deterministic: bool | None = None):
        """Lets `nnx.view(model, deterministic=True)` give an eval view."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, images: jax.Array, rngs: nnx.Rngs | None = None,
                 micro_batch: int | None = None) -> dict[str, jax.Array]:
        out = self.analyse(images, rngs, micro_batch)
        return {'score': out['score'], 'stage_weights': out['stage_weights']}

    def predict(self, images, micro_batch: int | None = None) -> dict[str, np.ndarray | None]:
        """Scores a batch in eval mode, jitted: (B, 224, 224, 3) normalised crops ->
        {'score': (B,) on the label scale, 'stage_weights': (B, 4) or None} as numpy.

        Each image's score depends only on that image (no batch statistics), so batch size
        and neighbours do not change it beyond float rounding. `micro_batch`: see
        SwinTransformer.__call__ (a CPU speed-up; results unchanged).
        """
        images = jnp.asarray(images, jnp.float32)   # the backbone checks the shape
        out = _predict(nnx.view(self, deterministic=True), images, micro_batch)
        return jax.tree.map(np.asarray, out)

    def analyse(self, images: jax.Array, rngs: nnx.Rngs | None = None,
                micro_batch: int | None = None) -> dict[str, Any]:
        """Like `__call__`, plus 'stage_features', 'target_in' (B, 224), 'hyper_feature'
        (B, 7, 7, 112) and 'target_params' ({'w1': (B, 112, 224), ..., 'b5': (B, 1)})."""
        train = not self.deterministic
        if train and rngs is None:
            raise ValueError('SmartIQA in training mode needs `rngs` with a "dropout" stream; '
                             'call model.eval() for deterministic inference.')
        key = (lambda: rngs.dropout()) if train else (lambda: None)
        rate = self.config.dropout
        stages = self.backbone(images, rngs if train else None, micro_batch)
        stages = [s.astype(jnp.float32) for s in stages]
        b = images.shape[0]

        # Local-distortion vector (SPEC 1.2). Pool windows 7 give 8x8, 4x4, 2x2, 1x1 maps.
        lda = [self.lda_fcs[i](flatten_channel_major(avg_pool(self.lda_convs[i](stages[i]), 7)))
               for i in range(3)]
        lda.append(self.lda_fcs[3](avg_pool(stages[3], 7).reshape(b, -1)))
        target_in = jnp.concatenate(lda, axis=-1)

        # Fusion (SPEC 1.3).
        stage_weights = None
        if self.config.fusion == 'attention':
            pooled = stages[3].mean(axis=(1, 2))
            hidden = dropout(jax.nn.relu(self.attention_fc1(pooled)),
                             self.config.attention_dropout, key())
            stage_weights = jax.nn.softmax(self.attention_fc2(hidden), axis=-1)
        if self.config.fusion == 'backbone':
            fused = stages[3]
        else:
            fused = fuse_stages(stages, stage_weights)

        # Hyper network (SPEC 1.4).
        h = fused
        for conv in self.hyper_convs:
            h = jax.nn.relu(conv(h))
        h = dropout(h, rate, key())
        g = h.mean(axis=(1, 2))
        target_dims = (TARGET_IN,) + TARGET_WIDTHS
        params = {}
        for i in range(4):
            params[f'w{i + 1}'] = conv_output_as_matrix(self.weight_convs[i](h),
                                                        target_dims[i + 1], target_dims[i])
            params[f'b{i + 1}'] = self.bias_fcs[i](g)
        params['w5'] = self.w5_fc(g).reshape(b, 1, TARGET_WIDTHS[-1])
        params['b5'] = self.b5_fc(g)

        # Target network, one per image (SPEC 1.5).
        if train:
            keys = jax.random.split(key(), b)
            score = jax.vmap(target_network, in_axes=(0, 0, None, 0))(params, target_in, rate, keys)
        else:
            score = jax.vmap(lambda p, x: target_network(p, x))(params, target_in)
        return {'score': score, 'stage_weights': stage_weights, 'stage_features': stages,
                'target_in': target_in, 'hyper_feature': h, 'target_params': params}

