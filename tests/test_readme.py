"""Executes the README's Python examples, so the documented API stays true."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
  text = (ROOT / 'README.md').read_text()
  return re.findall(r'```python\n(.*?)```', text, flags=re.S)


def test_readme_has_examples():
  blocks = _python_blocks()
  assert len(blocks) >= 2, 'README should show the bijector and the model API'


@pytest.mark.slow  # started first under pytest-xdist (conftest)
def test_readme_examples_run(tmp_path):
  blocks = _python_blocks()
  for i, code in enumerate(blocks):
    script = tmp_path / f'readme_block_{i}.py'
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f'README block {i} failed:\n{code}\n{proc.stderr[-3000:]}'
