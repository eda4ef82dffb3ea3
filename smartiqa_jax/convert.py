"""Checkpoint conversion between timm / released PyTorch files and our orbax checkpoints.

  python -m smartiqa_jax.convert from-timm FILE --variant base --out CKPT
  python -m smartiqa_jax.convert from-pytorch FILE --out CKPT
  python -m smartiqa_jax.convert to-pytorch CKPT --out FILE.pth|FILE.safetensors

Exit status: 0 on success, 1 when a file does not fit (the message names the file and
every problem), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from smartiqa_jax.models.smartiqa import FUSIONS
from smartiqa_jax.models.variants import VARIANTS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m smartiqa_jax.convert', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)

    timm = sub.add_parser('from-timm', help='a timm/Microsoft Swin checkpoint -> a new model checkpoint')
    timm.add_argument('file', help='.safetensors, .pth or .bin Swin weights (e.g. ImageNet-21K)')
    timm.add_argument('--variant', required=True, choices=[v for v in VARIANTS if v not in ('nano', 'pico')])
    timm.add_argument('--fusion', default='attention', choices=FUSIONS)
    timm.add_argument('--seed', type=int, default=0, help='init seed of the non-backbone layers')
    timm.add_argument('--out', required=True, help='orbax checkpoint directory to write')
    timm.add_argument('--force', action='store_true',
                      help='replace --out if it is a model checkpoint or a file')

    torch_in = sub.add_parser('from-pytorch', help='a released SMART-IQA state_dict -> a model checkpoint')
    torch_in.add_argument('file', help='.pth or .safetensors (variant and fusion are detected)')
    torch_in.add_argument('--out', required=True)
    torch_in.add_argument('--force', action='store_true',
                          help='replace --out if it is a model checkpoint or a file')

    torch_out = sub.add_parser('to-pytorch', help='a model checkpoint -> a released-format state_dict')
    torch_out.add_argument('checkpoint', help='model checkpoint directory or training workdir')
    torch_out.add_argument('--out', required=True, help='FILE.pth or FILE.safetensors')
    torch_out.add_argument('--force', action='store_true', help='replace --out if it is a file')
    return parser


def _check_out(path: str, force: bool, checkpoint_dir: bool = False) -> None:
    """Refuses an existing --out without --force, and with it a folder that --out cannot
    replace: anything but a model checkpoint or an empty folder for a checkpoint, any
    folder for a file."""
    if not os.path.lexists(path):
        return
    if not force:
        raise FileExistsError(f'{path} exists; pass --force to overwrite it')
    if not os.path.isdir(path):
        return
    from smartiqa_jax import checkpoint
    if not checkpoint_dir:
        raise FileExistsError(f'{path} is a folder; --out names the file to write')
    if not checkpoint._is_model_dir(Path(path)) and os.listdir(path):
        raise FileExistsError(f'{path} is a folder that is not a model checkpoint; --force '
                              'overwrites only a model checkpoint or a file: choose another --out')


OUTPUT_SUFFIXES = ('.pth', '.pt', '.safetensors')


def save_state_dict(state: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """Writes {name: numpy array} as .safetensors (no torch needed) or .pth (needs torch).

    metadata: strings for a .safetensors file's header (a .pth holds tensors only)."""
    if not path.endswith(OUTPUT_SUFFIXES):
        raise ValueError(f'{path}: the output must end in {", ".join(OUTPUT_SUFFIXES)}')
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{path}: no such folder {folder}')
    try:
        if path.endswith('.safetensors'):
            from safetensors.numpy import save_file
            save_file(state, path, metadata=metadata)
        else:
            import torch
            torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    except Exception as e:   # SafetensorError, torch's RuntimeError, OSError
        raise OSError(f'{path}: cannot write it ({e})') from None


def run(args: argparse.Namespace) -> str:
    """Executes one conversion; returns a one-line summary."""
    # Imported here so that `--help` and usage errors answer without loading JAX.
    from flax import nnx

    from smartiqa_jax import checkpoint, weights
    from smartiqa_jax.models.smartiqa import UNTRAINED_HEAD, ModelConfig, SmartIQA

    if args.command == 'from-timm':
        _check_out(args.out, args.force, checkpoint_dir=True)
        model = SmartIQA(ModelConfig(args.variant, args.fusion, label_name=UNTRAINED_HEAD),
                         rngs=nnx.Rngs(args.seed))
        weights.load_timm_backbone(model, args.file)
        out = checkpoint.save_model(args.out, model, force=args.force)
        return f'{args.file}: Swin-{args.variant} backbone -> {out} (fusion {args.fusion}, head seed {args.seed})'
    if args.command == 'from-pytorch':
        _check_out(args.out, args.force, checkpoint_dir=True)
        model = weights.load_pytorch(args.file)
        out = checkpoint.save_model(args.out, model, force=args.force)
        c = model.config
        return f'{args.file}: SMART-IQA {c.variant}/{c.fusion} -> {out}'
    _check_out(args.out, args.force)
    model = checkpoint.load(args.checkpoint)
    state = weights.export_state_dict(model)
    save_state_dict(state, args.out, weights.label_metadata(model.config))
    c, released = model.config, ModelConfig(model.config.variant)
    note = ''
    if (not args.out.endswith('.safetensors')
            and (c.label_name, c.label_range) != (released.label_name, released.label_range)):
        note = (f'; note: a .pth holds tensors only, so the scores\' label ({c.label_name}, '
                f'{c.label_range[0]:g}..{c.label_range[1]:g}) is not kept: loaded back, it reads '
                f"as the released model's ({released.label_name}, "
                f'{released.label_range[0]:g}..{released.label_range[1]:g}); .safetensors keeps it')
    return f'{args.checkpoint}: {len(state)} tensors -> {Path(args.out).resolve()}{note}'


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == 'to-pytorch' and not args.out.endswith(OUTPUT_SUFFIXES):
        parser.error(f'--out {args.out}: must end in {", ".join(OUTPUT_SUFFIXES)}')
    folder = os.path.dirname(os.path.abspath(args.out))
    if args.command == 'to-pytorch' and not os.path.isdir(folder):
        # Before the model is loaded; the checkpoint commands create their folders.
        print(f'error: --out {args.out}: no such folder {folder}', file=sys.stderr)
        return 2
    from smartiqa_jax.checkpoint import CheckpointError
    from smartiqa_jax.weights import WeightsError
    try:
        print(run(args))
    except (WeightsError, CheckpointError, OSError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
