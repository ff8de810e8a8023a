import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"encoder_vs_floor_fp32", "single_prompt_e2e", "single_prompt_auto_vs_hf_best", "k_prompts_4",
            "k_prompts_4_cold", "cached_epoch", "batch_1"}


@pytest.mark.slow
def test_quick_benchmark_writes_every_case(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    names = {c["name"] for c in data["cases"]}
    assert REQUIRED <= names, REQUIRED - names
    assert any(n.startswith("folder_") for n in names)
    for c in data["cases"]:
        assert c["ratio"] == pytest.approx(c["reference_s"] / c["vlseg_s"], rel=1e-6)
        assert c["vlseg_s"] > 0 and c["reference_s"] > 0
    assert {"threads", "torch", "device", "image_size", "cpu", "cpu_flags", "machine"} <= set(data["env"])
    single = next(c for c in data["cases"] if c["name"] == "single_prompt_e2e")
    assert single["mask_agreement"] > 0.999  # fp32 vlseg gives the reference's masks
    for c in data["cases"]:
        if c.get("mode") not in (None, "fp32") and "mean_iou" in c:
            assert c["mean_iou"] >= 0.95, c  # every faster mode stays within the random-weights fidelity bar
    assert data["auto"]["chosen"] in data["env"]["available_modes"]
    assert data["memory"] and all(m.get("peak_mb", 0) > m.get("baseline_mb", 0) > 0 for m in data["memory"])
    assert {t["target"] for t in data["targets"]} >= {"one prompt vs transformers fp32"}
    assert "| k_prompts_4 |" in r.stdout and "| target |" in r.stdout
