"""Keeps XLA:CPU's per-step scratch memory mapped: glibc malloc settings set at start-up.

XLA:CPU takes each execution's scratch memory (1.7 GB for Swin-T's train step at
batch 8) from malloc and frees it afterwards. glibc serves blocks that large with a
fresh mmap and returns them with munmap, so every step page-faults and zero-fills
the whole block again (437,000 faults and about 1 s of system time per step for
that case; BENCHMARKS.md, "Page faults"). Four glibc tunables keep the memory in
the process instead:

  hugetlb=1        large blocks on transparent huge pages
  arena_max=1      one malloc arena, so the next step finds the freed block
  mmap_max=0       large blocks from the heap, not from their own mappings
  trim_threshold   (64 GiB) the heap is not handed back to the kernel when freed

glibc reads tunables only when a process starts, so the command-line entry points
(`smartiqa train|predict|evaluate`, `python -m smartiqa_jax.train|predict|evaluate`)
re-execute themselves once with GLIBC_TUNABLES set, before any computation, when all of:

- the process runs on Linux with glibc 2.35 or newer (`hugetlb` is 2.35's);
- JAX will run on the CPU: JAX_PLATFORMS names only `cpu`, or no GPU/TPU plugin is
  installed (a GPU or TPU run gains nothing: its scratch memory is on the device);
- GLIBC_TUNABLES is not set already (the user's own setting is left alone, and the
  re-executed process does not go round again);
- SMARTIQA_JAX_MALLOC is not `system` (the opt-out).

The cost: the process keeps its peak memory until it exits (3.4 GB for the demo),
as PyTorch's caching allocator does on a GPU. Library calls (`train_and_evaluate`,
notebooks, tests) are never re-executed, nor is a command whose line cannot be run again
(`reason_not_to_replay`: an interactive session, a program from stdin, a sys.argv that a
caller rewrote); they can set the variable themselves before Python starts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

TUNABLES = ('glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
            'glibc.malloc.trim_threshold=68719476736')
OPT_OUT = 'SMARTIQA_JAX_MALLOC'           # set to 'system' to keep glibc's defaults


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr('CS_GNU_LIBC_VERSION').split()   # e.g. 'glibc 2.36'
        major, minor = version.split('.')[:2]
        return (int(major), int(minor)) if name == 'glibc' else None
    except (AttributeError, ValueError, OSError):
        return None


def _runs_on_cpu(environ) -> bool:
    platforms = environ.get('JAX_PLATFORMS') or environ.get('JAX_PLATFORM_NAME')
    if platforms:
        return {p.strip().lower() for p in platforms.split(',') if p.strip()} == {'cpu'}
    # JAX finds GPU plugins through the 'jax_plugins' entry points or namespace package
    # (jax-cuda12-plugin, jax-rocm...), and TPUs through libtpu.
    if importlib.metadata.entry_points(group='jax_plugins') or _spec('libtpu'):
        return False
    namespace = _spec('jax_plugins')
    folders = namespace.submodule_search_locations or () if namespace else ()
    return not any(name != '__pycache__' for folder in folders for name in _listdir(folder))


def _spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def reason_not_to_reexec(environ=None) -> str | None:
    """Why the tunables would not be applied here; None when they would."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, '').lower() == 'system':
        return f'{OPT_OUT}=system'
    if 'GLIBC_TUNABLES' in environ:
        return 'GLIBC_TUNABLES is set already'
    if not sys.platform.startswith('linux'):
        return f'not Linux ({sys.platform})'
    version = _glibc_version()
    if version is None or version < (2, 35):
        return f'glibc 2.35 or newer needed (found {version})'
    if not _runs_on_cpu(environ):
        return 'JAX runs on a GPU or TPU here'
    return None


def reexec_with_tunables() -> None:
    """At a command-line entry point: re-executes this process with TUNABLES if it helps.

    Returns (doing nothing) when `reason_not_to_reexec()` gives a reason; otherwise
    replaces the process with the same command line (`sys.orig_argv`) and
    GLIBC_TUNABLES set, and does not return. Call it before any JAX computation.
    """
    if reason_not_to_reexec() is not None or reason_not_to_replay() is not None:
        return
    os.environ['GLIBC_TUNABLES'] = TUNABLES
    print(f'smartiqa_jax: restarting with GLIBC_TUNABLES={TUNABLES} (faster CPU steps; '
          f'{OPT_OUT}=system keeps the defaults)', file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    except OSError as e:   # carry on as we are
        del os.environ['GLIBC_TUNABLES']
        print(f'smartiqa_jax: could not restart ({e}); going on with glibc defaults',
              file=sys.stderr)


def reason_not_to_replay() -> str | None:
    """Why this process's command line cannot simply be run again; None when it can.

    Re-executing `sys.orig_argv` repeats the command only when it is this program's own
    command line: not in an interactive session or a notebook kernel (it would restart
    the interpreter, losing the session), not under a debugger (its breakpoints and
    connection would be lost), not for a program read from stdin or a pipe (already
    consumed), and not when sys.argv was rewritten by a caller (runpy, %run).
    """
    if sys.flags.interactive or hasattr(sys, 'ps1'):
        return 'an interactive session'
    ipython = sys.modules.get('IPython')    # imported by libraries too: ask for a shell
    if ipython is not None and getattr(ipython, 'get_ipython', lambda: None)() is not None:
        return 'an IPython session'
    orig = list(getattr(sys, 'orig_argv', []))
    if (sys.gettrace() is not None or 'pydevd' in sys.modules or 'debugpy' in sys.modules
            or any(a == '-m' and b in ('pdb', 'debugpy') for a, b in zip(orig, orig[1:]))):
        return 'a debugger'
    program = sys.argv[0] if sys.argv else ''
    if len(orig) < 2 or program in ('-', ''):
        return 'the program was read from stdin'
    if program != '-c' and not os.path.isfile(program):    # python <(...): a pipe
        return 'the program was read from a pipe'
    args = sys.argv[1:]
    if args and orig[-len(args):] != args:
        return 'sys.argv is not the command line'
    return None
