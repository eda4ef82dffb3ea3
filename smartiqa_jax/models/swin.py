"""Swin Transformer v1 (patch 4, window 7) in Flax NNX, returning the four stage features.

Computes what timm's `swin_*_patch4_window7_224` computes with `features_only=True`
(SPEC 1.1): NHWC throughout, exact (erf) GELU, LayerNorm eps 1e-5, no final norm.
Parameter names follow timm's so that `weights.py` maps them one to one.

Dropout-like randomness (drop path) is drawn from an explicit `rngs` argument at call
time; the modules hold no RNG state, so `nnx.state(model)` is parameters only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smartiqa_jax.models import initializers as init
from smartiqa_jax.models.variants import Variant
from smartiqa_jax.sharding import DATA_AXIS

WINDOW = 7
SWIN_INPUT_SIZE = 224     # the input side SMART-IQA's backbones are built for (crops)
PATCH = 4
LN_EPS = 1e-5
SQRT_HALF = 0.5 ** 0.5

# timm's Swin init: trunc-normal 0.02 Linears and bias table (SPEC 1.5b); PyTorch defaults
# for the patch-embedding conv.
_trunc_normal = init.normal(0.02)


def matmul_output_dtype(dtype):
    """What a matmul in compute `dtype` writes: bf16 matmuls write fp32 on a CPU.

    XLA:CPU runs a bf16 matmul on the AMX/AVX-512-BF16 units only when it
    accumulates into and writes fp32; bf16 -> bf16 takes a slow path (on the
    2-core dev box: 520 against 100 GFLOP/s; fp32 reaches 230). On a GPU the
    bf16 output is kept: it halves the memory traffic of what follows.
    Decided where the model is built, from JAX's default backend.
    """
    if dtype is not None and jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == 'cpu':
        return jnp.float32
    return None


def linear(din: int, dout: int, *, rngs: nnx.Rngs, use_bias: bool = True, dtype=None) -> nnx.Linear:
    """A Linear initialised the way timm initialises Swin's: trunc-normal 0.02, zero bias."""
    return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=_trunc_normal,
                      bias_init=init.zeros, dtype=dtype, rngs=rngs,
                      preferred_element_type=matmul_output_dtype(dtype))


def layer_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Always fp32: normalising in bf16 loses too much. The variance as PyTorch computes it,
    # mean((x - mean)^2): flax's default, mean(x^2) - mean^2, is off by 4e-3 for a token
    # whose mean is 100 times its spread (2e-5 this way).
    return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=jnp.float32, scale_init=init.ones,
                         bias_init=init.zeros, use_fast_variance=False, rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU in PyTorch's formula, x/2 * (1 + erf(x/sqrt(2))).

    Not `jax.nn.gelu`: it defaults to the tanh approximation, and its exact form goes
    through erfc(-x/sqrt(2)), which XLA:CPU runs slower (forward + backward 1.10-1.18x;
    BENCHMARKS.md, "Two ops written by hand").
    """
    return 0.5 * x * (1 + jax.lax.erf(x * SQRT_HALF))


class DropPath(nnx.Module):
    """Stochastic depth: drops a whole residual branch per sample with probability `rate`.

    Kept samples are scaled by 1/(1-rate) (timm's scale_by_keep). Deterministic when
    `self.deterministic` is set (model.eval()) or the rate is 0.
    """

    def __init__(self, rate: float):
        self.rate = float(rate)
        self.deterministic = False

    def set_view(self, deterministic: bool | None = None):
        """Lets `nnx.view(model, deterministic=True)` give an eval view."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        if rngs is None:
            raise ValueError('DropPath in training mode needs `rngs` with a "dropout" stream; '
                             'call model.eval() for deterministic inference.')
        if self.rate >= 1.0:   # every branch dropped; x / 0 would make the gradient NaN
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(rngs.dropout(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
    """(window**2, window**2) int32 index into the (2*window-1)**2-row bias table."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij'))
    coords = coords.reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel = rel + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) -> (B, num_windows, window*window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of `window_partition`: (B, num_windows, window*window, C) -> (B, H, W, C)."""
    b, _, _, c = x.shape
    x = x.reshape(b, h // window, w // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


@functools.lru_cache(maxsize=None)
def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """(num_windows, N, N) additive mask: -100 between tokens of different shifted regions."""
    region = np.zeros((1, h, w, 1), np.float32)
    count = 0
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = count
            count += 1
    windows = np.asarray(window_partition(region, window))[0, :, :, 0]  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


ATTENTION_IMPLS = ('xla', 'cudnn', 'pallas')
# What a config may name: an implementation, or 'auto' (`resolve_attention`).
ATTENTION_CHOICES = ATTENTION_IMPLS + ('auto',)


def resolve_attention(attention: str, dtype=None) -> str:
    """The implementation that `attention` names; 'auto' picks the fastest measured one.

    'auto' is 'pallas' for bfloat16 compute on an NVIDIA GPU of compute capability 8.0 or
    later (Ampere, Hopper: 1.19x XLA's train step and 1.10x its inference for Swin-Base
    on an H200, BENCHMARKS.md), else 'xla': on CPUs and TPUs, for float32 compute, on
    older GPUs (no bf16 tensor cores for Triton) and on ROCm (not measured).
    Decided where the model is built, from JAX's default backend.
    """
    if attention != 'auto':
        return attention
    if dtype is None or jnp.dtype(dtype) != jnp.bfloat16 or jax.default_backend() != 'gpu':
        return 'xla'
    device = jax.devices()[0]
    try:
        capability = float(getattr(device, 'compute_capability', '0'))
    except (TypeError, ValueError):   # e.g. a ROCm 'gfx90a'
        return 'xla'
    return 'pallas' if capability >= 8.0 else 'xla'


@jax.custom_vjp
def softmax(logits: jax.Array) -> jax.Array:
    """Softmax over the last axis, with its backward written out: (g - sum(g * p)) * p.

    The values of `jax.nn.softmax` to rounding, and its gradients; XLA:CPU runs its forward
    and backward together 1.3-2.7x as fast as those of jax.nn.softmax, whose backward comes
    from transposing a JVP (BENCHMARKS.md, "Two ops written by hand").
    """
    e = jnp.exp(logits - logits.max(-1, keepdims=True))
    return e * (1 / e.sum(-1, keepdims=True))


def _softmax_fwd(logits):
    probs = softmax(logits)
    return probs, probs


def _softmax_bwd(probs, g):
    return ((g - (g * probs).sum(-1, keepdims=True)) * probs,)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def window_attention_xla(q, k, v, bias, mask, scale):
    """Attention inside each window, written out for XLA.

    q, k, v: (B, nW, N, heads, d) in the compute dtype; bias: (heads, N, N) fp32;
    mask: (nW, N, N) additive or None. Returns (B, nW, N, heads, d).
    q.k is written in what the compute dtype's matmuls write (bf16 on a GPU, as under
    PyTorch autocast: half the bytes of the largest tensor here); bias, mask and softmax
    are fp32 inside one fusion.
    """
    out_dtype = matmul_output_dtype(q.dtype)
    logits = jnp.einsum('bwnhd,bwmhd->bwhnm', q * scale, k, preferred_element_type=out_dtype)
    logits = logits.astype(jnp.float32) + bias
    if mask is not None:
        logits = logits + mask[None, :, None]
    probs = softmax(logits).astype(v.dtype)
    return jnp.einsum('bwhnm,bwmhd->bwnhd', probs, v, preferred_element_type=out_dtype)


# What runs `window_attention_fused` in the model; tests set 'xla' to run the fused
# layout on a CPU.
FUSED_IMPLEMENTATION = 'cudnn'
# Whether the model runs the Pallas kernels in interpret mode (tests, on a CPU).
PALLAS_INTERPRET = False


def _is_rocm() -> bool:
    """Whether JAX's GPUs are AMD's (ROCm): their platform version names it, e.g. 'rocm 60300'."""
    client = getattr(jax.devices()[0], 'client', None)
    return 'rocm' in str(getattr(client, 'platform_version', '')).lower()


def check_attention_backend(attention: str) -> None:
    """Raises ValueError if window attention `attention` cannot run on JAX's backend.

    'pallas' needs a GPU (Triton); 'cudnn' an NVIDIA GPU: JAX's ROCm builds have no cuDNN.
    """
    if (attention in ('xla', 'auto')
            or (attention == 'pallas' and PALLAS_INTERPRET)
            or (attention == 'cudnn' and FUSED_IMPLEMENTATION != 'cudnn')):
        return
    backend = jax.default_backend()
    if backend == 'gpu' and not (attention == 'cudnn' and _is_rocm()):
        return
    if backend == 'gpu':
        raise ValueError("attention='cudnn' runs on NVIDIA GPUs (cuDNN); JAX's GPUs here are "
                         "AMD's (ROCm). Use attention='auto' or 'xla' (or 'pallas'): same "
                         "parameters, same results.")
    kernel = 'Triton kernels' if attention == 'pallas' else 'cuDNN'
    raise ValueError(f"attention={attention!r} runs on GPUs ({kernel}); JAX's backend here is "
                     f"{backend!r}. Use attention='auto' or 'xla': same parameters, same results.")


# What a padded key gets added to its logits: exp() of it is 0 in fp32, and it is finite
# in bf16, the dtype cuDNN takes the bias in.
_PAD_LOGIT = -30000.0


def window_attention_fused(q, k, v, bias, mask, scale, implementation='cudnn',
                           tokens: int | None = None):
    """The same attention through `jax.nn.dot_product_attention` (a fused kernel on a GPU).

    cuDNN's flash attention trains with a bias only at an even sequence length, so the
    49 tokens of a window are padded to 50: the padded key is masked out through the bias,
    the padded query's output is dropped. Windows without a shift mask share one
    (1, heads, 50, 50) bias, so they are the batch (a reshape); with a shift mask the bias
    differs per window, so the windows join the heads instead, (B, 50, nW*heads, d), and
    the bias is (1, nW*heads, 50, 50). Either way the bias has batch 1, the shape for
    which cuDNN also returns its gradient (the relative position bias table learns).
    The bias is added in the compute dtype (bf16 under mixed precision).
    `implementation='xla'` runs the same layout through XLA (used to test it on a CPU);
    `tokens` pads to more tokens than 50 (e.g. 64, a whole tile), for benchmarks.
    """
    b, nw, n, h, d = q.shape
    t = tokens or n + n % 2
    if mask is None:
        def layout(x):
            return x.reshape(b * nw, n, h, d)
        full = bias[None]                                            # (1, h, n, n)
    else:
        def layout(x):
            return x.transpose(0, 2, 1, 3, 4).reshape(b, n, nw * h, d)
        full = (bias[None] + mask[:, None]).reshape(1, nw * h, n, n)  # window-major heads
    pad = ((0, 0), (0, t - n), (0, 0), (0, 0))
    q, k, v = (jnp.pad(layout(x), pad) for x in (q, k, v))
    full = jnp.pad(full, ((0, 0), (0, 0), (0, t - n), (0, 0)))
    full = jnp.pad(full, ((0, 0), (0, 0), (0, 0), (0, t - n)), constant_values=_PAD_LOGIT)
    out = jax.nn.dot_product_attention(q, k, v, bias=full.astype(q.dtype), scale=scale,
                                       implementation=implementation)[:, :n]
    if mask is None:
        return out.reshape(b, nw, n, h, d)
    return out.reshape(b, n, nw, h, d).transpose(0, 2, 1, 3, 4)


def window_attention_pallas(qkv, bias, mask, scale, interpret=False):
    """The same attention as one Pallas kernel per direction (`window_attention_pallas.py`).

    qkv: (B, nW, N, 3, heads, d), the qkv projection as it comes; bias and mask as in
    `window_attention_xla`. Returns (B, nW, N, heads, d).

    XLA cannot split a Pallas kernel over devices (it would gather the whole batch onto
    each), so when the computation is traced under a mesh with a 'data' axis of several
    devices (`sharding.tracing_mesh`, as the train and eval steps are), each device runs
    the kernels on its own part of the batch (`jax.shard_map`); the bias gradient is then
    summed over the devices.
    """
    from smartiqa_jax.models import window_attention_pallas as kernel
    b, nw, n, _, h, d = qkv.shape
    pad = kernel.TILE - n
    qkv = jnp.pad(qkv.reshape(b * nw, n, 3 * h, d), ((0, 0), (0, pad), (0, 0), (0, 0)))
    bias = jnp.pad(jnp.pad(bias, ((0, 0), (0, pad), (0, 0))), ((0, 0), (0, 0), (0, pad)),
                   constant_values=_PAD_LOGIT)
    if mask is not None:
        mask = jnp.pad(jnp.asarray(mask, jnp.float32), ((0, 0), (0, pad), (0, pad)))

    def run(qkv, bias, mask):
        return kernel.window_attention(qkv, bias, mask, scale, interpret)

    mesh = jax.sharding.get_abstract_mesh()
    if DATA_AXIS in mesh.axis_names and mesh.shape[DATA_AXIS] > 1:
        P = jax.sharding.PartitionSpec
        run = jax.shard_map(run, mesh=mesh, in_specs=(P(DATA_AXIS), P(), P()),
                            out_specs=P(DATA_AXIS), check_vma=False)
    out = run(qkv, bias, mask)
    return out[:, :n].reshape(b, nw, n, h, d)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside 7x7 windows with a learned relative position bias.

    attention: 'xla' (the default: einsums and a softmax that XLA fuses), 'cudnn'
      (`window_attention_fused`: cuDNN's fused flash attention; CUDA GPUs, bf16 only) or
      'pallas' (`window_attention_pallas`: one Triton kernel per direction; GPUs).
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=None,
                 attention: str = 'xla'):
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f'unknown attention {attention!r}; choose one of '
                             f'{", ".join(ATTENTION_IMPLS)}')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attention = attention
        self.qkv = linear(dim, 3 * dim, rngs=rngs, dtype=dtype)
        self.proj = linear(dim, dim, rngs=rngs, dtype=dtype)
        self.relative_position_bias_table = nnx.Param(
            _trunc_normal(rngs.params(), ((2 * WINDOW - 1) ** 2, num_heads)))

    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """x: (B, num_windows, N, C) -> same shape; mask: (num_windows, N, N) or None."""
        check_attention_backend(self.attention)
        b, nw, n, c = x.shape
        heads = self.num_heads
        compute = self.qkv.dtype or x.dtype
        qkv = self.qkv(x).astype(compute).reshape(b, nw, n, 3, heads, c // heads)
        index = relative_position_index(WINDOW)
        bias = self.relative_position_bias_table[...][index.reshape(-1)]
        bias = bias.reshape(n, n, heads).transpose(2, 0, 1)
        if self.attention == 'pallas':
            out = window_attention_pallas(qkv, bias, mask, self.scale, PALLAS_INTERPRET)
        else:
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
            if self.attention == 'cudnn':
                out = window_attention_fused(q, k, v, bias, mask, self.scale, FUSED_IMPLEMENTATION)
            else:
                out = window_attention_xla(q, k, v, bias, mask, self.scale)
        return self.proj(out.reshape(b, nw, n, c))


class Mlp(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.fc1 = linear(dim, 4 * dim, rngs=rngs, dtype=dtype)
        self.fc2 = linear(4 * dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class SwinBlock(nnx.Module):
    """x + DropPath(W-MSA(LN(x))); x + DropPath(MLP(LN(x))), with an optional cyclic shift."""

    def __init__(self, dim: int, num_heads: int, resolution: int, shift: int, drop_path: float,
                 *, rngs: nnx.Rngs, dtype=None, attention: str = 'xla'):
        # A stage no larger than a window attends globally and never shifts (timm does the same).
        self.shift = 0 if resolution <= WINDOW else shift
        self.norm1 = layer_norm(dim, rngs=rngs)
        self.attn = WindowAttention(dim, num_heads, rngs=rngs, dtype=dtype, attention=attention)
        self.norm2 = layer_norm(dim, rngs=rngs)
        self.mlp = Mlp(dim, rngs=rngs, dtype=dtype)
        self.drop_path = DropPath(drop_path)

    def _attention(self, x: jax.Array) -> jax.Array:
        _, h, w, _ = x.shape
        shift = self.shift
        mask = None
        if shift:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
            mask = shifted_window_mask(h, w, WINDOW, shift)
        x = window_reverse(self.attn(window_partition(x, WINDOW), mask), WINDOW, h, w)
        if shift:
            x = jnp.roll(x, (shift, shift), axis=(1, 2))
        return x

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        compute = self.mlp.fc1.dtype or x.dtype
        x = x + self.drop_path(self._attention(self.norm1(x).astype(compute)), rngs)
        x = x + self.drop_path(self.mlp(self.norm2(x).astype(compute)), rngs)
        return x


class PatchMerging(nnx.Module):
    """2x2 neighbourhood -> one token: concat (r0c0, r1c0, r0c1, r1c1), LayerNorm, Linear 4C->2C."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.norm = layer_norm(4 * dim, rngs=rngs)
        self.reduction = linear(4 * dim, 2 * dim, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
        return self.reduction(self.norm(x.reshape(b, h // 2, w // 2, 4 * c)))


class PatchEmbed(nnx.Module):
    """4x4 stride-4 conv 3->C, then LayerNorm (left out with norm=False)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=None, norm: bool = True):
        fan_in = 3 * PATCH * PATCH
        self.proj = nnx.Conv(3, dim, (PATCH, PATCH), strides=(PATCH, PATCH), padding='VALID',
                             kernel_init=init.torch_default_kernel(),
                             bias_init=init.torch_default_bias(fan_in), dtype=dtype, rngs=rngs)
        self.norm = layer_norm(dim, rngs=rngs) if norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # Stage 0's residual stream in the dtype the compute-dtype Linears write, as the
        # later stages' (each starts with PatchMerging's Linear): bf16 on a GPU.
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.proj.dtype is not None:
            x = x.astype(matmul_output_dtype(self.proj.dtype) or self.proj.dtype)
        return x


class SwinStage(nnx.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, resolution: int,
                 drop_paths: list[float], *, rngs: nnx.Rngs, dtype=None, attention: str = 'xla'):
        self.downsample = PatchMerging(in_dim, rngs=rngs, dtype=dtype) if in_dim != dim else None
        self.blocks = nnx.List([
            SwinBlock(dim, num_heads, resolution, shift=0 if i % 2 == 0 else WINDOW // 2,
                      drop_path=drop_paths[i], rngs=rngs, dtype=dtype, attention=attention)
            for i in range(depth)
        ])

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x, rngs)
        return x


class SwinTransformer(nnx.Module):
    """Swin v1 backbone. `__call__` maps (B, 224, 224, 3) to the four raw stage outputs.

    Args:
      variant: widths, depths and heads (models/variants.py).
      drop_path_rate: stochastic depth at the last block; rises linearly from 0.
      img_size: input side; every stage must tile into 7x7 windows (224 does).
      dtype: compute dtype (None: follow the input; jnp.bfloat16 for mixed precision).
        Parameters stay fp32.
      attention: window attention implementation, 'xla', 'pallas' or 'cudnn' (see
        WindowAttention), or 'auto' (`resolve_attention`).
      patch_norm: LayerNorm after the patch embedding (Swin's, and every released model's).
        Without it stage 0 keeps the amplitude of each 4x4 patch's response, which a
        narrow Swin trained from scratch needs to tell noise levels apart (the demo).
    """

    def __init__(self, variant: Variant, *, drop_path_rate: float = 0.0,
                 img_size: int = SWIN_INPUT_SIZE,
                 rngs: nnx.Rngs, dtype=None, attention: str = 'xla', patch_norm: bool = True):
        dims = variant.stage_dims
        resolutions = [img_size // PATCH // 2**i for i in range(4)]
        # Three patch mergings halve the side: it must stay whole, and every stage must tile
        # into windows or fit in one.
        if img_size % (PATCH * 8) or any(r % WINDOW and r > WINDOW for r in resolutions):
            raise ValueError(f'img_size {img_size} does not give four stages that tile into '
                             f'{WINDOW}x{WINDOW} windows (stage sides {resolutions}); use 224')
        self.img_size = img_size
        # The implementation in use ('auto' resolved), for logs.
        self.attention = attention = resolve_attention(attention, dtype)
        rates = np.linspace(0.0, drop_path_rate, sum(variant.depths)).tolist()
        self.patch_embed = PatchEmbed(dims[0], rngs=rngs, dtype=dtype, norm=patch_norm)
        stages = []
        for i in range(4):
            start = sum(variant.depths[:i])
            stages.append(SwinStage(dims[max(i - 1, 0)], dims[i], variant.depths[i],
                                    variant.num_heads[i], resolutions[i],
                                    rates[start:start + variant.depths[i]], rngs=rngs, dtype=dtype,
                                    attention=attention))
        self.layers = nnx.List(stages)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None,
                 micro_batch: int | None = None) -> list[jax.Array]:
        """x: (B, H, W, 3) normalised -> [(B,H/4,W/4,C), (B,H/8,W/8,2C), (B,H/16,W/16,4C), (B,H/32,W/32,8C)].

        micro_batch: in inference, run the two high-resolution stages on this many images
          at a time (`lax.map`). Their activations then stay in cache, which is worth more
          than large matmuls on a memory-bound CPU; the low-resolution stages, whose cost
          is reading weights, still see the whole batch. Results are unchanged.
        """
        if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, 3):
            # Which blocks shift their windows was decided for img_size: another size would
            # run, differently from timm, or fail deep inside a reshape.
            raise ValueError(f'the backbone was built for ({self.img_size}, {self.img_size}, 3) '
                             f'inputs (B, H, W, C); got an array of shape {tuple(x.shape)}')
        b = x.shape[0]
        if micro_batch and rngs is None and b > micro_batch and b % micro_batch == 0:
            chunks = x.reshape(b // micro_batch, micro_batch, *x.shape[1:])
            early = jax.lax.map(lambda c: self._stages(self.patch_embed(c), 0, 2, None), chunks)
            features = [f.reshape(b, *f.shape[2:]) for f in early]
            return features + self._stages(features[-1], 2, 4, None)
        return self._stages(self.patch_embed(x), 0, 4, rngs)

    def _stages(self, x: jax.Array, start: int, stop: int, rngs: nnx.Rngs | None) -> list[jax.Array]:
        features = []
        for stage in self.layers[start:stop]:
            x = stage(x, rngs)
            features.append(x)
        return features
