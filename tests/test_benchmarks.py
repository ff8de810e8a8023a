import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"single_prompt_e2e", "k_prompts_1", "k_prompts_4", "k_prompts_8", "k_prompts_16", "cached_epoch"}


@pytest.mark.slow
def test_quick_benchmark_writes_every_case(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    names = {c["name"] for c in data["cases"]}
    assert REQUIRED <= names
    for c in data["cases"]:
        assert c["ratio"] == pytest.approx(c["reference_s"] / c["vlseg_s"], rel=1e-6)
        assert c["vlseg_s"] > 0 and c["reference_s"] > 0
    assert {"threads", "torch", "device", "image_size"} <= set(data["env"])
    single = next(c for c in data["cases"] if c["name"] == "single_prompt_e2e")
    assert single["mask_agreement"] > 0.999  # the optimised path gives the reference's masks
    assert "| k_prompts_8 |" in r.stdout
