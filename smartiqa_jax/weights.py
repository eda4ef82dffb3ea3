"""Weight import and export between our Flax model and PyTorch state_dicts.

One explicit name map (`name_map`) pairs every JAX parameter path with its name in the
released SMART-IQA state_dict (SPEC 1.6) and a transpose rule. timm Swin checkpoints use
the same backbone names without the `swin.backbone.` prefix and with `layers.N`;
Microsoft's original release puts `downsample` at the end of the previous stage.

Every import checks every key and shape and raises `WeightsError` with the lists of
missing, unexpected and mismatched keys. Nothing is unpickled beyond tensors:
`.pth/.bin` go through `torch.load(weights_only=True)`, `.safetensors` need no torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from smartiqa_jax import torch_io
from smartiqa_jax.models.smartiqa import ModelConfig, SmartIQA
from smartiqa_jax.models.variants import VARIANTS, get_variant
from smartiqa_jax.torch_io import WRAPPER_KEYS

Path = tuple[Any, ...]
BACKBONE_PREFIX = 'swin.backbone.'


class WeightsError(ValueError):
    """A checkpoint that does not fit the model, or a file that is not a checkpoint."""


# ----------------------------------------------------------------------------- transpose rules
# Each rule maps a PyTorch tensor to the JAX layout; `inverse` maps back.


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


COPY = Rule('copy', lambda w: w, lambda w: w)
# nn.Linear weight (out, in) <-> nnx.Linear kernel (in, out).
LINEAR = Rule('linear', lambda w: w.T, lambda k: k.T)
# nn.Conv2d weight (out, in, kh, kw) <-> nnx.Conv kernel (kh, kw, in, out).
CONV = Rule('conv', lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
# A 1x1 nn.Conv2d (out, in, 1, 1), which we run as an nnx.Linear kernel (in, out).
CONV1X1 = Rule('conv1x1', lambda w: w[:, :, 0, 0].T, lambda k: k.T[:, :, None, None])


@dataclasses.dataclass(frozen=True)
class Entry:
    torch_key: str
    jax_path: Path
    rule: Rule


def _linear(torch_prefix: str, path: Path, bias: bool = True) -> list[Entry]:
    out = [Entry(f'{torch_prefix}.weight', path + ('kernel',), LINEAR)]
    if bias:
        out.append(Entry(f'{torch_prefix}.bias', path + ('bias',), COPY))
    return out


def _norm(torch_prefix: str, path: Path) -> list[Entry]:
    return [Entry(f'{torch_prefix}.weight', path + ('scale',), COPY),
            Entry(f'{torch_prefix}.bias', path + ('bias',), COPY)]


def _conv(torch_prefix: str, path: Path, rule: Rule = CONV, bias: bool = True) -> list[Entry]:
    out = [Entry(f'{torch_prefix}.weight', path + ('kernel',), rule)]
    if bias:
        out.append(Entry(f'{torch_prefix}.bias', path + ('bias',), COPY))
    return out


def backbone_map(depths: Iterable[int], prefix: str = BACKBONE_PREFIX, layer_sep: str = '_',
                 path: Path = ('backbone',), patch_norm: bool = True) -> list[Entry]:
    """The Swin entries. Released names: prefix 'swin.backbone.', 'layers_N'; timm: '', 'layers.N'."""
    entries = _conv(f'{prefix}patch_embed.proj', path + ('patch_embed', 'proj'))
    if patch_norm:
        entries += _norm(f'{prefix}patch_embed.norm', path + ('patch_embed', 'norm'))
    for i, depth in enumerate(depths):
        layer = f'{prefix}layers{layer_sep}{i}'
        lpath = path + ('layers', i)
        if i > 0:
            entries += _norm(f'{layer}.downsample.norm', lpath + ('downsample', 'norm'))
            entries += _linear(f'{layer}.downsample.reduction', lpath + ('downsample', 'reduction'),
                               bias=False)
        for j in range(depth):
            block = f'{layer}.blocks.{j}'
            bpath = lpath + ('blocks', j)
            entries += _norm(f'{block}.norm1', bpath + ('norm1',))
            entries.append(Entry(f'{block}.attn.relative_position_bias_table',
                                 bpath + ('attn', 'relative_position_bias_table'), COPY))
            entries += _linear(f'{block}.attn.qkv', bpath + ('attn', 'qkv'))
            entries += _linear(f'{block}.attn.proj', bpath + ('attn', 'proj'))
            entries += _norm(f'{block}.norm2', bpath + ('norm2',))
            entries += _linear(f'{block}.mlp.fc1', bpath + ('mlp', 'fc1'))
            entries += _linear(f'{block}.mlp.fc2', bpath + ('mlp', 'fc2'))
    return entries


def name_map(config: ModelConfig) -> list[Entry]:
    """Every parameter of `SmartIQA(config)`, paired with its released PyTorch name (SPEC 1.6)."""
    entries = backbone_map(get_variant(config.variant).depths, patch_norm=config.patch_norm)
    for i in range(3):
        entries += _conv(f'swin.lda{i + 1}_pool.0', ('lda_convs', i), CONV1X1, bias=False)
    for i in range(4):
        entries += _linear(f'swin.lda{i + 1}_fc', ('lda_fcs', i))
    if config.fusion == 'attention':
        entries += _linear('multiscale_attention.attention_net.0', ('attention_fc1',))
        entries += _linear('multiscale_attention.attention_net.3', ('attention_fc2',))
    for i, torch_index in enumerate((0, 2, 4)):
        entries += _conv(f'conv1.{torch_index}', ('hyper_convs', i), CONV1X1)
    for i in range(4):
        entries += _conv(f'fc{i + 1}w_conv', ('weight_convs', i))
        entries += _linear(f'fc{i + 1}b_fc', ('bias_fcs', i))
    entries += _linear('fc5w_fc', ('w5_fc',))
    entries += _linear('fc5b_fc', ('b5_fc',))
    return entries


# ----------------------------------------------------------------------------- reading files


def _to_numpy(tensor) -> np.ndarray:
    if isinstance(tensor, np.ndarray):
        return tensor
    # torch tensor: bf16/fp16 have no exact numpy twin everywhere; go through fp32.
    if tensor.dtype.is_floating_point:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint file into {name: numpy array} without running any pickle code.

    Accepts .safetensors (no torch needed), and .pth/.pt/.bin/.ckpt via
    `torch.load(weights_only=True)`. Unwraps `model_state_dict`, `state_dict` and `model`
    nesting and a DataParallel `module.` prefix.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f'{path}: no such file')
    if os.path.getsize(path) == 0:
        raise WeightsError(f'{path}: the file is empty')
    if torch_io.is_safetensors(path):
        from safetensors.numpy import load_file
        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises several types for bad headers/truncation
            raise WeightsError(f'{path}: not a readable safetensors file ({e})') from e
    else:
        import importlib.util
        if importlib.util.find_spec('torch') is None:
            raise WeightsError(f'{path}: reading .pth/.bin files needs PyTorch '
                               "(pip install 'smartiqa-jax[torch]'), or convert it to "
                               '.safetensors first')
        with open(path, 'rb') as f:
            magic = f.read(4)
        # torch.save writes a zip archive (PK..) or, before PyTorch 1.6, a pickle (0x80 ..).
        if not (magic.startswith(b'PK\x03\x04') or magic[:1] == b'\x80'):
            raise WeightsError(f'{path}: not a PyTorch checkpoint (neither the zip archive '
                               'torch.save writes nor a pickle) nor a safetensors file')
        try:
            state = torch_io.load_weights_only(path)
        except Exception as e:
            raise WeightsError(
                f'{path}: could not be read as a weights-only PyTorch checkpoint: '
                f'{type(e).__name__}: {torch_io.refusal_reason(e)}. Files that need arbitrary '
                'unpickling (code objects, custom classes) are refused on purpose.') from e
    return _unwrap(state, path)


def _unwrap(state: Any, path: str) -> dict[str, np.ndarray]:
    top = state
    # Training checkpoints nest the weights, sometimes twice ({'state_dict': {'model': ...}}).
    while isinstance(state, Mapping):
        key = next((k for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if key is None:
            break
        state = state[key]
    if not isinstance(state, Mapping):
        raise WeightsError(f'{path}: expected a state_dict (a mapping of names to tensors), '
                           f'found {type(state).__name__}')
    out = {}
    for name, value in state.items():
        if not hasattr(value, 'shape'):
            continue  # e.g. an epoch counter stored beside the tensors
        while name.startswith('module.'):   # DataParallel, possibly wrapped twice
            name = name[len('module.'):]
        if name in out:
            raise WeightsError(f"{path}: parameter {name!r} appears twice (with and without "
                               "the 'module.' prefix of DataParallel); which one is meant "
                               "is unclear")
        out[name] = _to_numpy(value)
    if not out:
        detail = ''
        if isinstance(top, Mapping) and top:
            detail = (f' where the weights are looked for ({", ".join(WRAPPER_KEYS)}, or the '
                      f'top level); its top-level keys: {", ".join(map(str, list(top)[:12]))}')
            nested = [str(k) for k, v in top.items() if isinstance(v, Mapping)]
            if nested:
                detail += f'; mappings among them: {", ".join(nested)}'
        raise WeightsError(f'{path}: holds no tensors{detail}')
    return out


# ----------------------------------------------------------------------------- checking and applying


def _format_problems(source: str, missing, unexpected, mismatched) -> str:
    lines = [f'{source}: the weights do not fit the model.']

    def block(title, items):
        if items:
            lines.append(f'  {title} ({len(items)}):')
            lines.extend(f'    {item}' for item in items[:20])
            if len(items) > 20:
                lines.append(f'    ... and {len(items) - 20} more')

    block('missing keys', missing)
    block('unexpected keys', unexpected)
    block('shape mismatches (key: file shape vs expected)', mismatched)
    return '\n'.join(lines)


def convert_state_dict(state: Mapping[str, np.ndarray], entries: list[Entry],
                       expected_shapes: Mapping[Path, tuple[int, ...]], source: str,
                       ignore: Callable[[str], bool] = lambda k: False) -> dict[Path, np.ndarray]:
    """Maps a PyTorch state_dict to {jax_path: array}, checking every key and shape.

    `expected_shapes` gives the JAX shape of each path. Keys for which `ignore(key)` holds
    may be present without being used. Raises WeightsError listing every problem at once.
    """
    wanted = {e.torch_key for e in entries}
    missing = [e.torch_key for e in entries if e.torch_key not in state]
    unexpected = sorted(k for k in state if k not in wanted and not ignore(k))
    mismatched, out = [], {}
    for e in entries:
        if e.torch_key not in state:
            continue
        value = np.asarray(state[e.torch_key])
        expected = tuple(expected_shapes[e.jax_path])
        torch_shape = tuple(e.rule.to_torch(np.empty(expected, np.uint8)).shape)
        if value.shape != torch_shape:
            mismatched.append(f'{e.torch_key}: {value.shape} vs {torch_shape}')
            continue
        out[e.jax_path] = np.ascontiguousarray(e.rule.to_jax(value)).astype(np.float32)
    if missing or unexpected or mismatched:
        raise WeightsError(_format_problems(source, missing, unexpected, mismatched))
    return out


def param_shapes(model: nnx.Module) -> dict[Path, tuple[int, ...]]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {tuple(path): tuple(var.get_value().shape) for path, var in flat}


def assign(model: nnx.Module, values: Mapping[Path, np.ndarray]) -> None:
    """Writes {path: array} into the model's parameters (shapes already checked)."""
    import jax.numpy as jnp
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for path, value in values.items():
        flat[path].set_value(jnp.asarray(value, dtype=flat[path].get_value().dtype))
    nnx.update(model, state)


def export_state_dict(model: SmartIQA) -> dict[str, np.ndarray]:
    """The model's parameters under the released PyTorch names and shapes (fp32 numpy)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    # np.array copies: the result is writable and owns its memory (torch.from_numpy wants that).
    return {e.torch_key: np.array(e.rule.to_torch(np.asarray(flat[e.jax_path].get_value())),
                                  dtype=np.float32, order='C')
            for e in name_map(model.config)}


# ----------------------------------------------------------------------------- config detection


def infer_config(state: Mapping[str, np.ndarray], source: str = 'state_dict',
                 **overrides) -> ModelConfig:
    """Detects variant and fusion of a released SMART-IQA state_dict from its keys and shapes."""
    key = BACKBONE_PREFIX + 'patch_embed.proj.weight'
    if key not in state:
        raise WeightsError(f'{source}: not a SMART-IQA state_dict (no {key!r}); '
                           'for a plain timm Swin checkpoint use `convert from-timm`')
    embed_dim = state[key].shape[0]
    depths = []
    for i in range(4):
        pattern = re.compile(rf'{re.escape(BACKBONE_PREFIX)}layers_{i}\.blocks\.(\d+)\.')
        blocks = {int(m.group(1)) for k in state if (m := pattern.match(k))}
        depths.append(max(blocks) + 1 if blocks else 0)
    tables = [f'{BACKBONE_PREFIX}layers_{i}.blocks.0.attn.relative_position_bias_table'
              for i in range(4)]
    missing = [key for key, depth in zip(tables, depths) if depth and key not in state]
    if missing:
        raise WeightsError(f'{source}: an incomplete SMART-IQA state_dict: missing keys '
                           f'{", ".join(missing)}')
    heads = tuple(state[key].shape[1] if depth else 0 for key, depth in zip(tables, depths))
    matches = [name for name, v in VARIANTS.items()
               if (v.embed_dim, v.depths, v.num_heads) == (embed_dim, tuple(depths), heads)]
    if not matches:
        raise WeightsError(f'{source}: backbone with embed dim {embed_dim}, depths {tuple(depths)}, '
                           f'heads {heads} matches no known variant ({", ".join(VARIANTS)})')
    variant = get_variant(matches[0])
    if 'multiscale_attention.attention_net.0.weight' in state:
        fusion = 'attention'
    elif 'conv1.0.weight' in state and state['conv1.0.weight'].shape[1] == variant.stage_dims[3]:
        fusion = 'backbone'
    else:
        fusion = 'multiscale'
    overrides.setdefault('patch_norm', BACKBONE_PREFIX + 'patch_embed.norm.weight' in state)
    return ModelConfig(variant=matches[0], fusion=fusion, **overrides)


# What a model's scores mean, kept in a .safetensors export's metadata (a .pth holds
# tensors only): {'label_name': str, 'label_range': [low, high]} as JSON.
LABEL_METADATA_KEY = 'smartiqa_jax.labels'


def label_metadata(config: ModelConfig) -> dict[str, str]:
    """The safetensors metadata that records `config`'s label name and range."""
    import json
    return {LABEL_METADATA_KEY: json.dumps({'label_name': config.label_name,
                                            'label_range': list(config.label_range)})}


def read_label_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """{'label_name', 'label_range'} recorded in a .safetensors file (label_metadata); {} for
    other files, or when it records none."""
    import json
    if not torch_io.is_safetensors(path):
        return {}
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), 'np') as f:
            text = (f.metadata() or {}).get(LABEL_METADATA_KEY)
        labels = json.loads(text) if text else {}
        return {'label_name': str(labels['label_name']),
                'label_range': tuple(float(v) for v in labels['label_range'])} if labels else {}
    except Exception as e:   # read_state_dict names an unreadable file; this is its metadata
        raise WeightsError(f'{path}: unreadable {LABEL_METADATA_KEY} metadata ({e})') from None


# ----------------------------------------------------------------------------- public entry points


def load_pytorch(state_or_path: str | os.PathLike | Mapping[str, Any],
                 config: ModelConfig | None = None, **config_overrides) -> SmartIQA:
    """Builds a SmartIQA model from a released SMART-IQA PyTorch state_dict or file.

    Variant and fusion are detected from the keys unless `config` is given. Every key and
    shape is checked (strict), as `load_state_dict(strict=True)` would. The label name and
    range are the released model's (KonIQ's 0..100), or those a .safetensors file written
    by `convert to-pytorch` records (`label_metadata`).
    """
    if isinstance(state_or_path, Mapping):
        source, state = 'state_dict', _unwrap(state_or_path, 'state_dict')
    else:
        source, state = os.fspath(state_or_path), read_state_dict(state_or_path)
        config_overrides = {**read_label_metadata(source), **config_overrides}
    if config is None:
        config = infer_config(state, source, **config_overrides)
    # Shapes only: the strict check below guarantees that every parameter gets a value.
    model = nnx.eval_shape(lambda: SmartIQA(config, rngs=nnx.Rngs(0)))
    values = convert_state_dict(state, name_map(config), param_shapes(model), source)
    assign(model, values)
    return model


def _is_ignorable_timm_key(key: str) -> bool:
    # Classifier head, final norm and derived buffers: not part of a features-only backbone.
    return (key.startswith(('head.', 'norm.')) or key.endswith(('relative_position_index',
                                                                   'attn_mask')))


def _microsoft_to_timm(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Microsoft's layout keeps `downsample` at the end of stage i; timm at the start of i+1."""
    pattern = re.compile(r'^layers\.(\d+)\.downsample\.(.*)$')
    out = {}
    for key, value in state.items():
        m = pattern.match(key)
        out[f'layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}' if m else key] = value
    return out


def load_timm_backbone(model: SmartIQA, state_or_path: str | os.PathLike | Mapping[str, Any]) -> SmartIQA:
    """Loads a timm (or Microsoft original) Swin checkpoint into `model.backbone`, in place.

    The classifier head, the final norm and stored index/mask buffers are ignored; every
    other key must match the model's variant exactly.
    """
    if isinstance(state_or_path, Mapping):
        source, state = 'state_dict', _unwrap(state_or_path, 'state_dict')
    else:
        source, state = os.fspath(state_or_path), read_state_dict(state_or_path)
    if any(k.startswith('swin.backbone.') for k in state):
        raise WeightsError(
            f'{source}: a whole SMART-IQA model (keys swin.backbone.*), not a Swin backbone '
            'file: load it with `convert from-pytorch` or smartiqa_jax.load, or start '
            'training from it with config.model.init_from')
    # Microsoft's layout is recognisable by a downsample in stage 0, which timm never has.
    if any(k.startswith('layers.0.downsample.') for k in state):
        state = _microsoft_to_timm(state)
    depths = get_variant(model.config.variant).depths
    entries = backbone_map(depths, prefix='', layer_sep='.', patch_norm=model.config.patch_norm)
    values = convert_state_dict(state, entries, param_shapes(model), source,
                                ignore=_is_ignorable_timm_key)
    assign(model, values)
    return model
