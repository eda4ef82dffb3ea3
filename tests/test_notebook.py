"""The Colab notebook runs to the end in smoke mode (CPU, demo data)."""

import json
import os
import pathlib
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'smartiqa_tpu.ipynb'


def test_notebook_runs_in_smoke_mode(monkeypatch, tmp_path):
    cells = json.loads(NOTEBOOK.read_text())['cells']
    code = [''.join(c['source']) for c in cells if c['cell_type'] == 'code']
    assert 'parameters' in cells[1]['metadata']['tags']
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv('TMPDIR', str(tmp_path))
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))   # gettempdir() caches its answer
    namespace = {'__name__': '__notebook__'}
    for i, source in enumerate(code):
        exec(compile(source, f'{NOTEBOOK.name} code cell {i}', 'exec'), namespace)
        if i == 0:  # what papermill's -p SMOKE True would inject after the parameters cell
            namespace['SMOKE'] = True
    workdir = pathlib.Path(namespace['WORKDIR'])
    assert (workdir / 'smartiqa.safetensors').stat().st_size > 0
    assert len((workdir / 'scores.csv').read_text().splitlines()) == 5   # header + 4 photos
    assert namespace['torch_model'] is not None
    data_dir = namespace['DATA_DIR']
    assert os.path.isdir(data_dir)
    # The trainer was given the folder the demo versions live in, not one version's folder
    # (which would have made a second copy of the dataset inside the first).
    assert os.path.dirname(data_dir) == namespace['DATA_ROOT']
    assert not os.path.exists(os.path.join(data_dir, os.path.basename(data_dir)))


def test_the_notebook_kernel_never_starts_jax():
    """A TPU VM's chips serve one process: if the kernel started JAX, every command the
    notebook runs (train, evaluate, predict, convert) would find the TPU taken and fall
    back to the CPU. So JAX runs in those commands only, and they are told to use the
    TPU or fail."""
    import ast
    cells = json.loads(NOTEBOOK.read_text())['cells']
    allowed = {'smartiqa_jax.torch_reference', 'smartiqa_jax.data'}   # torch; demo data
    for i, cell in enumerate(c for c in cells if c['cell_type'] == 'code'):
        tree = ast.parse(''.join(cell['source']))
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                assert module.split('.')[0] not in ('jax', 'flax', 'optax', 'orbax'), (i, module)
                if module.startswith('smartiqa_jax'):
                    assert module in allowed, (i, module)
            if isinstance(node, ast.Attribute) and node.attr == 'load':
                assert not (isinstance(node.value, ast.Name)
                            and node.value.id == 'smartiqa_jax'), i
    source = ''.join(cells[2]['source'])
    assert "{**os.environ, 'JAX_PLATFORMS': 'tpu'}" in source
