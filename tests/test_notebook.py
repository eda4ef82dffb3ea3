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
