"""PyTorch reference implementation of the released SMART-IQA model.

This module rebuilds, on top of timm's Swin Transformer, the model that the
authors' released PyTorch code trains and checkpoints (SPEC section 1). It has
two uses:

* parity tests: the JAX model in :mod:`smartiqa_jax.models` must reproduce
  :class:`SmartIQATorch` tensor by tensor given the same weights;
* users who want to run our exported weights (or the authors' checkpoints) in
  PyTorch: :func:`load_released_state_dict` + :func:`infer_config` +
  ``SmartIQATorch(**cfg).load_state_dict(sd, strict=True)``, or simply
  :meth:`SmartIQATorch.from_released`.

torch, timm and safetensors are the optional ``[torch]`` extra. They are
imported at the top of this module on purpose: importing it means torch is
wanted. Nothing else in the package imports this module.

Layout: everything here is NCHW except the raw Swin stage outputs, which timm
returns NHWC (the JAX layout); the reshapes the SPEC marks **layout** are done on
logical NCHW tensors, exactly as the released code does.

Nothing is downloaded: the backbone is always created with
``pretrained=False`` and weights come from files the user gives.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as _load_safetensors
from torch import nn

from smartiqa_jax.torch_io import WRAPPER_KEYS, is_safetensors, load_weights_only

__all__ = [
    "VARIANTS",
    "FUSIONS",
    "SmartIQATorch",
    "load_released_state_dict",
    "infer_config",
]

# Per-variant Swin geometry and the released regularisation defaults (SPEC 1.1,
# 1.5). ``dropout`` is used for the hyper feature and between target layers.
VARIANTS: dict[str, dict[str, Any]] = {
    # Not released: the narrow Swin of smartiqa_jax's CPU demo (timm's Swin class with
    # these widths), so that models trained on the demo can be exported and checked too.
    "nano": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                 dropout=0.1, drop_path_rate=0.0),
    "pico": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                 dropout=0.1, drop_path_rate=0.0),
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 dropout=0.3, drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                  dropout=0.35, drop_path_rate=0.25),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                 dropout=0.4, drop_path_rate=0.3),
}

#: 'attention' = full SMART-IQA (multi-scale + stage attention),
#: 'multiscale' = multi-scale fusion without attention,
#: 'backbone' = stage-3 features only (SPEC 1.3).
FUSIONS = ("attention", "multiscale", "backbone")

# Hyper/target network widths (HyperIQA's numbers, SPEC 1.4/1.5).
_HYPER_CH = 112          # channels of the hyper feature h (7x7x112)
_TARGET_IN = 224         # length of the target input vector
_TARGET_WIDTHS = (112, 56, 28, 14)   # f1..f4; the last layer maps f4 -> 1
_FEATURE_HW = 7          # spatial size of the fused map and of h


def _kaiming_normal_(module: nn.Module) -> None:
    """Kaiming-normal (fan-in, gain sqrt 2) weight; the bias keeps PyTorch's
    default uniform(+-1/sqrt(fan_in)) init, as in the released code."""
    nn.init.kaiming_normal_(module.weight)


class _SwinLDA(nn.Module):
    """Swin backbone plus the four local-distortion-aware (LDA) branches.

    Registered as ``SmartIQATorch.swin`` so that parameter names are
    ``swin.backbone.*`` and ``swin.lda*`` as in the released state_dict.
    """

    def __init__(self, variant: str, drop_path_rate: float, patch_norm: bool = True):
        super().__init__()
        c = VARIANTS[variant]["embed_dim"]
        # timm's FeatureListNet keeps the stages as children ``layers_0`` ..
        # ``layers_3`` (no final norm, no head), which is exactly the naming of
        # the released checkpoints. Relative-position indices and shifted-window
        # masks are non-persistent buffers, so they are not in the state_dict.
        geometry = {k: VARIANTS[variant][k] for k in ("embed_dim", "depths", "num_heads")}
        self.backbone = timm.create_model(
            # timm has no nano; its tiny model with nano's widths is the same Swin class.
            f"swin_{'tiny' if variant in ('nano', 'pico') else variant}_patch4_window7_224",
            pretrained=False,
            features_only=True,
            out_indices=(0, 1, 2, 3),
            drop_path_rate=drop_path_rate,
            **geometry,
        )
        if not patch_norm:   # smartiqa_jax's ModelConfig(patch_norm=False); never released
            self.backbone.patch_embed.norm = nn.Identity()
        # Stages 0..2: 1x1 conv (no bias) -> avg-pool 7/7 -> flatten (C,H,W) -> Linear.
        # Pooled maps: 56->8, 28->4, 14->2 spatially.
        self.lda1_pool = nn.Sequential(nn.Conv2d(c, 16, 1, bias=False), nn.AvgPool2d(7, 7))
        self.lda1_fc = nn.Linear(16 * 8 * 8, 16)
        self.lda2_pool = nn.Sequential(nn.Conv2d(2 * c, 32, 1, bias=False), nn.AvgPool2d(7, 7))
        self.lda2_fc = nn.Linear(32 * 4 * 4, 16)
        self.lda3_pool = nn.Sequential(nn.Conv2d(4 * c, 64, 1, bias=False), nn.AvgPool2d(7, 7))
        self.lda3_fc = nn.Linear(64 * 2 * 2, 16)
        # Stage 3 (7x7) is pooled straight to a vector; no conv, so no parameters
        # for the pool (and nothing in the state_dict for it).
        self.lda4_pool = nn.AvgPool2d(7, 7)
        self.lda4_fc = nn.Linear(8 * c, _TARGET_IN - 3 * 16)   # 176

        for m in (self.lda1_pool[0], self.lda2_pool[0], self.lda3_pool[0],
                  self.lda1_fc, self.lda2_fc, self.lda3_fc, self.lda4_fc):
            _kaiming_normal_(m)

    def forward(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], torch.Tensor]:
        """Run the backbone and the LDA branches.

        Args:
            x: (B, 3, 224, 224) normalised images, NCHW.

        Returns:
            ``(features_nhwc, features_nchw, target_in)`` where the features are
            the four raw stage outputs (B,56,56,C), (B,28,28,2C), (B,14,14,4C),
            (B,7,7,8C) in NHWC as timm returns them, the same four permuted to
            NCHW, and ``target_in`` is the (B, 224) target-network input.
        """
        feats_nhwc = tuple(self.backbone(x))
        feats = tuple(f.permute(0, 3, 1, 2) for f in feats_nhwc)
        # flatten(1) of a logical NCHW tensor is the channel-major (C,H,W) order
        # the released Linear weights expect, whatever the memory format.
        lda1 = self.lda1_fc(self.lda1_pool(feats[0]).flatten(1))
        lda2 = self.lda2_fc(self.lda2_pool(feats[1]).flatten(1))
        lda3 = self.lda3_fc(self.lda3_pool(feats[2]).flatten(1))
        lda4 = self.lda4_fc(self.lda4_pool(feats[3]).flatten(1))
        return feats_nhwc, feats, torch.cat([lda1, lda2, lda3, lda4], dim=1)


class _MultiScaleAttention(nn.Module):
    """Per-stage attention weights from the globally pooled stage-3 feature."""

    def __init__(self, in_dim: int, dropout: float):
        super().__init__()
        # Indices 0 and 3 are the Linears: names attention_net.0.* / .3.*.
        self.attention_net = nn.Sequential(
            nn.Linear(in_dim, 256), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(256, 4),
        )
        for m in (self.attention_net[0], self.attention_net[3]):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)

    def forward(self, stage3: torch.Tensor) -> torch.Tensor:
        """(B, 8C, 7, 7) NCHW -> (B, 4) softmax weights, one per stage.

        Softmax, not the paper's "sigmoid": the released code uses softmax.
        """
        return torch.softmax(self.attention_net(stage3.mean(dim=(2, 3))), dim=1)


class SmartIQATorch(nn.Module):
    """SMART-IQA as released: Swin + LDA branches, fusion, HyperIQA hyper/target nets.

    Args:
        variant: 'tiny', 'small' or 'base' Swin backbone.
        fusion: 'attention' (full SMART-IQA), 'multiscale' or 'backbone'.
        dropout: dropout on the hyper feature and between target layers;
            None = released default (0.3 tiny, 0.35 small, 0.4 base).
        drop_path_rate: Swin stochastic depth; None = released default
            (0.2 tiny, 0.25 small, 0.3 base).
        attention_dropout: dropout inside the stage-attention MLP.
        patch_norm: False leaves out the LayerNorm after the patch embedding, as
            smartiqa_jax's ModelConfig(patch_norm=False) does (not a released model).

    The state_dict has exactly the names and shapes of SPEC 1.6 (210 tensors
    for tiny with attention), so released checkpoints and our exports load
    with ``strict=True``.
    """

    def __init__(
        self,
        variant: str = "tiny",
        fusion: str = "attention",
        dropout: float | None = None,
        drop_path_rate: float | None = None,
        attention_dropout: float = 0.5,
        patch_norm: bool = True,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        cfg = VARIANTS[variant]
        self.variant = variant
        self.fusion = fusion
        self.dropout_rate = cfg["dropout"] if dropout is None else float(dropout)
        self.drop_path_rate = cfg["drop_path_rate"] if drop_path_rate is None else float(drop_path_rate)
        c = cfg["embed_dim"]

        self.swin = _SwinLDA(variant, self.drop_path_rate, patch_norm)
        if fusion == "attention":
            self.multiscale_attention = _MultiScaleAttention(8 * c, attention_dropout)
        else:
            self.multiscale_attention = None

        # Multi-scale fusion concatenates C+2C+4C+8C = 15C channels; the
        # backbone-only variant feeds stage 3 (8C) alone.
        fused_ch = 8 * c if fusion == "backbone" else 15 * c
        # PyTorch default init here (released code does not re-initialise it).
        self.conv1 = nn.Sequential(
            nn.Conv2d(fused_ch, 512, 1), nn.ReLU(inplace=True),
            nn.Conv2d(512, 256, 1), nn.ReLU(inplace=True),
            nn.Conv2d(256, _HYPER_CH, 1), nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(self.dropout_rate)

        # Weight generators: out_channels * 7 * 7 == f_out * f_in, so that the
        # (B, out_ch, 7, 7) map can be viewed as a (B, f_out, f_in) matrix.
        f_in = (_TARGET_IN,) + _TARGET_WIDTHS[:-1]                 # 224, 112, 56, 28
        area = _FEATURE_HW * _FEATURE_HW
        w_ch = [fo * fi // area for fo, fi in zip(_TARGET_WIDTHS, f_in)]   # 512, 128, 32, 8
        self.fc1w_conv = nn.Conv2d(_HYPER_CH, w_ch[0], 3, padding=1)
        self.fc1b_fc = nn.Linear(_HYPER_CH, _TARGET_WIDTHS[0])
        self.fc2w_conv = nn.Conv2d(_HYPER_CH, w_ch[1], 3, padding=1)
        self.fc2b_fc = nn.Linear(_HYPER_CH, _TARGET_WIDTHS[1])
        self.fc3w_conv = nn.Conv2d(_HYPER_CH, w_ch[2], 3, padding=1)
        self.fc3b_fc = nn.Linear(_HYPER_CH, _TARGET_WIDTHS[2])
        self.fc4w_conv = nn.Conv2d(_HYPER_CH, w_ch[3], 3, padding=1)
        self.fc4b_fc = nn.Linear(_HYPER_CH, _TARGET_WIDTHS[3])
        self.fc5w_fc = nn.Linear(_HYPER_CH, _TARGET_WIDTHS[3])
        self.fc5b_fc = nn.Linear(_HYPER_CH, 1)
        for m in (self.fc1w_conv, self.fc2w_conv, self.fc3w_conv, self.fc4w_conv,
                  self.fc1b_fc, self.fc2b_fc, self.fc3b_fc, self.fc4b_fc,
                  self.fc5w_fc, self.fc5b_fc):
            _kaiming_normal_(m)

    # ------------------------------------------------------------------ fusion
    def _fuse(self, feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """NCHW stage features -> ((B, 15C or 8C, 7, 7) fused map, (B, 4) weights or None)."""
        if self.fusion == "backbone":
            return feats[3], None
        # Adaptive pooling to 7x7 is an exact block mean here (8x8, 4x4, 2x2, 1x1).
        pooled = [F.adaptive_avg_pool2d(f, _FEATURE_HW) for f in feats]
        weights = None
        if self.multiscale_attention is not None:
            weights = self.multiscale_attention(feats[3])
            pooled = [p * weights[:, i, None, None, None] for i, p in enumerate(pooled)]
        return torch.cat(pooled, dim=1), weights

    # ------------------------------------------------------------------- hyper
    def _hyper(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Generate the target network's parameters from h (B, 112, 7, 7).

        Returns ``fc{i}w`` (B, f_out, f_in) and ``fc{i}b`` (B, f_out) for
        i = 1..5: fc1w (B,112,224), fc2w (B,56,112), fc3w (B,28,56),
        fc4w (B,14,28), fc5w (B,1,14), fc5b (B,1).
        """
        b = h.shape[0]
        g = h.mean(dim=(2, 3))                 # GAP: (B, 112)
        f_in = (_TARGET_IN,) + _TARGET_WIDTHS[:-1]
        convs = (self.fc1w_conv, self.fc2w_conv, self.fc3w_conv, self.fc4w_conv)
        fcs = (self.fc1b_fc, self.fc2b_fc, self.fc3b_fc, self.fc4b_fc)
        params = {}
        for i, (conv, fc, fo, fi) in enumerate(zip(convs, fcs, _TARGET_WIDTHS, f_in), start=1):
            # **layout**: the released code views the NCHW conv output
            # (B, out_ch, 7, 7) as (B, f_out, f_in). reshape (not view) keeps
            # that logical order even for channels_last tensors.
            params[f"fc{i}w"] = conv(h).reshape(b, fo, fi)
            params[f"fc{i}b"] = fc(g)
        params["fc5w"] = self.fc5w_fc(g).reshape(b, 1, _TARGET_WIDTHS[-1])
        params["fc5b"] = self.fc5b_fc(g)
        return params

    def _target(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-image MLP with generated weights: (B, 224) -> (B,) scores.

        A batched matrix-vector product per layer; mathematically what
        HyperIQA's grouped 1x1 convolution computes.
        """
        q = x
        for i in range(1, 5):
            q = torch.sigmoid(torch.einsum("boi,bi->bo", params[f"fc{i}w"], q) + params[f"fc{i}b"])
            if i < 4:      # dropout between the sigmoid layers, none before fc5
                q = self.dropout(q)
        return (torch.einsum("boi,bi->bo", params["fc5w"], q) + params["fc5b"])[:, 0]

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """Score a batch of crops.

        Args:
            x: (B, 3, 224, 224) float, ImageNet-normalised, NCHW.

        Returns:
            dict with
              * ``score``: (B,) predicted quality (training-label scale, KonIQ 0..100);
              * ``stage_weights``: (B, 4) softmax stage attention, or None
                unless ``fusion == 'attention'``;
              * ``target_in``: (B, 224) target-network input (LDA vector);
              * ``target_params``: generated weights, see :meth:`_hyper`;
              * ``features``: tuple of the four raw Swin stage outputs, NHWC
                (B,56,56,C) .. (B,7,7,8C), for stage-by-stage parity checks.
        """
        feats_nhwc, feats, target_in = self.swin(x)
        fused, weights = self._fuse(feats)
        h = self.dropout(self.conv1(fused))    # (B, 112, 7, 7)
        params = self._hyper(h)
        score = self._target(target_in, params)
        return {
            "score": score,
            "stage_weights": weights,
            "target_in": target_in,
            "target_params": params,
            "features": feats_nhwc,
        }

    @classmethod
    def from_released(cls, path_or_dict: Any, **kwargs: Any) -> "SmartIQATorch":
        """Build the model a released/exported checkpoint describes and load it strictly.

        ``kwargs`` (dropout, drop_path_rate, attention_dropout) only matter
        for training; the architecture comes from :func:`infer_config`.
        Returned in eval mode.
        """
        sd = load_released_state_dict(path_or_dict)
        model = cls(**infer_config(sd), **kwargs)
        model.load_state_dict(sd, strict=True)
        return model.eval()


# --------------------------------------------------------------------- loading


def load_released_state_dict(path_or_dict: Any) -> dict[str, torch.Tensor]:
    """Load a SMART-IQA state_dict as a flat ``{name: tensor}`` dict.

    Args:
        path_or_dict: a ``.safetensors`` file, any other file (``.pth``/``.pt``,
            read with ``torch.load(weights_only=True)`` only: arbitrary pickles
            are refused; numpy scalars and arrays saved beside the weights are
            read), or an in-memory mapping.

    Training checkpoints nest the weights under ``model_state_dict`` (the
    released code), ``state_dict`` or ``model``; that nesting is unwrapped and the other
    entries (optimizer, epoch, ...) are dropped. A ``module.`` prefix
    (DataParallel/DDP) is stripped. numpy arrays are converted to tensors.
    Tensors are returned on the CPU.
    """
    if isinstance(path_or_dict, (str, os.PathLike)):
        path = os.fspath(path_or_dict)
        if is_safetensors(path):
            obj: Any = _load_safetensors(path, device="cpu")
        else:
            obj = load_weights_only(path)
    elif isinstance(path_or_dict, Mapping):
        obj = path_or_dict
    else:
        raise TypeError(f"expected a path or a mapping, got {type(path_or_dict).__name__}")

    while isinstance(obj, Mapping):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint does not hold a state_dict mapping (got {type(obj).__name__})")

    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = str(key)
        while name.startswith("module."):
            name = name[len("module."):]
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        if name in out:
            raise ValueError(f"duplicate parameter {name!r} after stripping 'module.'")
        out[name] = value
    return out


_BLOCK_RE = re.compile(r"^swin\.backbone\.layers_2\.blocks\.(\d+)\.")


def infer_config(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """Read ``variant`` and ``fusion`` off a SMART-IQA state_dict's keys and shapes.

    * embed dim C = rows of ``swin.backbone.patch_embed.proj.weight``
      (96 tiny/small, 128 base);
    * number of blocks in ``layers_2`` (6 tiny, 18 small/base);
    * ``multiscale_attention.*`` present -> 'attention'; otherwise the
      in-channels of ``conv1.0.weight``: 15C -> 'multiscale', 8C -> 'backbone'.

    Accepts the raw output of :func:`load_released_state_dict` (``module.``
    prefixes are tolerated too). Returns ``dict(variant=..., fusion=...)``, plus
    ``patch_norm=False`` where the patch norm is absent, suitable as
    ``SmartIQATorch(**cfg)``. Raises ValueError on anything else.
    """
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    try:
        c = int(sd["swin.backbone.patch_embed.proj.weight"].shape[0])
        conv1_in = int(sd["conv1.0.weight"].shape[1])
    except KeyError as e:
        raise ValueError(f"not a SMART-IQA state_dict: missing {e.args[0]!r}") from None
    depth2 = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))), default=-1)

    variant = next((name for name, v in VARIANTS.items()
                    if v["embed_dim"] == c and v["depths"][2] == depth2), None)
    if variant is None:
        raise ValueError(f"unknown Swin variant: embed dim {c}, {depth2} blocks in stage 2")

    has_attention = any(k.startswith("multiscale_attention.") for k in sd)
    if conv1_in == 15 * c:
        fusion = "attention" if has_attention else "multiscale"
    elif conv1_in == 8 * c and not has_attention:
        fusion = "backbone"
    else:
        raise ValueError(f"conv1.0 takes {conv1_in} channels (attention keys: {has_attention}); "
                         f"expected {15 * c} (multi-scale) or {8 * c} (backbone only)")
    if "swin.backbone.patch_embed.norm.weight" not in sd:   # smartiqa_jax's patch_norm=False
        return {"variant": variant, "fusion": fusion, "patch_norm": False}
    return {"variant": variant, "fusion": fusion}
