"""The glibc settings that keep XLA:CPU's scratch memory: when they apply, and that they work."""

import os
import subprocess
import sys
import textwrap

import pytest

from smartiqa_jax import cpu_malloc

# Frees 256 MB and allocates it again; prints GLIBC_TUNABLES and the page faults of the
# second allocation (numpy's own huge-page advice off, so every 4 KB page counts).
_PROBE = textwrap.dedent('''
    import resource, sys
    from smartiqa_jax import cpu_malloc
    cpu_malloc.reexec_with_tunables()
    import os, numpy as np
    np._core.multiarray._set_madvise_hugepage(False)
    a = np.ones(32 << 20); del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(32 << 20); del a
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(os.environ.get('GLIBC_TUNABLES'), after - before)
''')


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', cpu_malloc.OPT_OUT)}
    env['JAX_PLATFORMS'] = 'cpu'
    env.update(extra)
    return env


def _probe(**extra):
    out = subprocess.run([sys.executable, '-c', _PROBE], env=_env(**extra), capture_output=True,
                         text=True, timeout=120, check=True)
    tunables, faults = out.stdout.split()
    return tunables, int(faults), out.stderr


# Needs Linux with glibc >= 2.35 (what CI runs on): skipped elsewhere, never under CI=true.
needs_glibc = pytest.mark.skipif(
    cpu_malloc.reason_not_to_reexec(_env()) is not None and not os.environ.get('CI'),
    reason='needs Linux with glibc >= 2.35')


@needs_glibc
def test_reexec_sets_the_tunables_and_glibc_keeps_freed_memory_mapped():
    tunables, faults, stderr = _probe()
    assert tunables == cpu_malloc.TUNABLES
    assert 'restarting with GLIBC_TUNABLES' in stderr
    assert faults < 1000                       # measured: 0

    # The opt-out: glibc's defaults, and the 256 MB are mapped and faulted in afresh.
    tunables, faults, stderr = _probe(**{cpu_malloc.OPT_OUT: 'system'})
    assert tunables == 'None' and 'restarting' not in stderr
    assert faults > 30000                      # measured: 65,537 (4 KB pages)


def test_when_the_tunables_are_not_applied():
    reason = cpu_malloc.reason_not_to_reexec
    assert reason(_env(**{cpu_malloc.OPT_OUT: 'system'})) == f'{cpu_malloc.OPT_OUT}=system'
    assert reason(_env(GLIBC_TUNABLES='glibc.malloc.arena_max=2')) == \
        'GLIBC_TUNABLES is set already'
    assert reason(_env(JAX_PLATFORMS='cuda')) == 'JAX runs on a GPU or TPU here'
    assert reason(_env(JAX_PLATFORMS='cuda,cpu')) == 'JAX runs on a GPU or TPU here'
    if sys.platform.startswith('linux') and cpu_malloc._glibc_version() >= (2, 35):
        assert reason(_env()) is None
        assert reason(_env(JAX_PLATFORMS=' CPU ')) is None


@needs_glibc
def test_the_train_command_restarts_itself_once_and_keeps_its_arguments():
    out = subprocess.run([sys.executable, '-m', 'smartiqa_jax.train', '--helpshort'],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr        # the trainer's own --help(short)
    assert out.stderr.count('restarting with GLIBC_TUNABLES') == 1
    assert '--workdir' in out.stdout + out.stderr       # the restarted process saw the flag


@needs_glibc
@pytest.mark.parametrize('how', ['stdin', 'stdin after a flag', 'argv rewritten', 'interactive',
                                 'debugger'])
def test_a_command_line_that_cannot_be_replayed_is_not_restarted(how, tmp_path):
    """A program from stdin, a caller that rewrote sys.argv (runpy, IPython's %run), an
    interactive session or a debugger: re-executing sys.orig_argv would not repeat the
    command (it would start a bare interpreter and lose the session or the breakpoints),
    so the process goes on as it is."""
    code = textwrap.dedent('''
        import sys
        from smartiqa_jax import cpu_malloc
        sys.argv = ['predict', '--help'] if ARGV else sys.argv
        cpu_malloc.reexec_with_tunables()
        print('went on', cpu_malloc.reason_not_to_replay())
    ''').replace('ARGV', str(how == 'argv rewritten'))
    if how == 'stdin':
        command, stdin = [sys.executable, '-'], code
    elif how == 'stdin after a flag':
        command, stdin = [sys.executable, '-u', '-', 'predict'], code
    elif how == 'debugger':
        (tmp_path / 'prog.py').write_text(code)
        command, stdin = [sys.executable, '-m', 'pdb', str(tmp_path / 'prog.py')], 'c\nq\n'
    elif how == 'argv rewritten':
        command, stdin = [sys.executable, '-c', code], None
    else:
        command, stdin = [sys.executable, '-i', '-c', code], ''
    out = subprocess.run(command, input=stdin, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert 'restarting' not in out.stderr
    assert 'went on' in out.stdout, out.stderr
