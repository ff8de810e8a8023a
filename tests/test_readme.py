import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLSEG_QUICKSTART_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2, 240, 320) bool" in r.stdout
    assert (tmp_path / "runs" / "quickstart" / "model.safetensors").is_file()


def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in readme and 'pip install -e ".[dev]"' in ci
    assert "python -m pytest" in readme and "python -m pytest" in ci
