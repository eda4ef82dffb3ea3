"""The `smartiqa` command: one entry point for the package's tools.

  smartiqa train     --config configs/base.py ...        (= python -m smartiqa_jax.train)
  smartiqa predict   --checkpoint CKPT photos/ ...       (= python -m smartiqa_jax.predict)
  smartiqa evaluate  --checkpoint CKPT --datasets ...    (= python -m smartiqa_jax.evaluate)
  smartiqa convert   from-pytorch FILE --out CKPT ...    (= python -m smartiqa_jax.convert)

`smartiqa COMMAND --help` shows a command's own flags. Each command keeps its exit status.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# command -> (module, one-line summary). Modules are imported only when run, so
# `smartiqa --help` answers without loading JAX.
COMMANDS = {
    'train': ('smartiqa_jax.train', 'train and test a model from a config file'),
    'predict': ('smartiqa_jax.predict', 'score image files, folders or globs'),
    'evaluate': ('smartiqa_jax.evaluate', "SRCC/PLCC on IQA datasets, the paper's Table III"),
    'convert': ('smartiqa_jax.convert', 'timm / released PyTorch weights <-> checkpoints'),
}


def usage() -> str:
    lines = ['usage: smartiqa COMMAND [ARGS...]', '', 'commands:']
    lines += [f'  {name:<9} {summary}' for name, (_, summary) in COMMANDS.items()]
    lines += ['', "Run 'smartiqa COMMAND --help' for a command's flags."]
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatches to COMMANDS[argv[0]]'s main; returns its exit status (2: unknown command)."""
    entry_point = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help', 'help'):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f'smartiqa: unknown command {command!r}\n\n{usage()}', file=sys.stderr)
        return 2
    if entry_point and command != 'convert':   # a CPU that computes: glibc settings first
        from smartiqa_jax import cpu_malloc
        cpu_malloc.reexec_with_tunables()
    module = importlib.import_module(COMMANDS[command][0])
    # The trainer is an absl app: it wants the program name first in argv. Commands that
    # leave through sys.exit (absl, argparse's --help and usage errors) still give their
    # status back here, so that main() always returns one.
    args = [f'smartiqa {command}', *rest] if command == 'train' else rest
    try:
        status = module.main(args)
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit('message'): Python would print it and exit 1
            print(e.code, file=sys.stderr)
            return 1
        status = e.code
    return int(status or 0)


if __name__ == '__main__':
    sys.exit(main())
