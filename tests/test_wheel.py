"""The built wheel works on its own: installed into a fresh venv and run from outside the source tree, the console
script lists models, segments a real image and evaluates on real data (presets, encoder presets and the prompt
library must all be inside the wheel)."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_in_fresh_venv(tmp_path, shared_data):
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(dist.glob("vlseg-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # The dependencies come from the test environment (added after the venv's own site-packages, so the
    # wheel's vlseg is the one imported; the source tree's editable install is not activated there).
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", VLSEG_CACHE=str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()

    def vlseg(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run([str(venv / "bin" / "vlseg"), *args], capture_output=True, text=True, env=env,
                             cwd=work, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    where = subprocess.run([str(py), "-c", "import vlseg; print(vlseg.__file__)"], capture_output=True, text=True,
                           env=env, cwd=work, check=True).stdout.strip()
    assert where.startswith(str(venv)), where
    assert "biomedclip-film" in vlseg("models").stdout
    image = sorted((shared_data / "cvc_clinicdb" / "images").iterdir())[0]
    out = json.loads(vlseg("segment", str(image), "-p", "polyp", "-m", "tiny-test", "--pretrained", "false",
                           "-o", "masks").stdout.strip().splitlines()[-1])
    assert out["files_written"] == 2 and (work / "masks" / f"{image.stem}__polyp.png").is_file()
    vlseg("evaluate", "--model", "tiny-test", "--pretrained", "false", "--data",
          str(shared_data / "cvc_clinicdb" / "manifest.jsonl"), "--out", "ev", "--max-samples", "4",
          "--language-use-images", "6")
    m = json.loads((work / "ev" / "metrics.json").read_text())
    assert m["all"]["n"] == 8 and "language_use" in m
