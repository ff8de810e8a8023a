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
def test_tiny_benchmark_writes_every_case(tmp_path):
    """The whole script (every case, the CLI and memory subprocesses) on a tiny CLIPSeg: the code path of --quick
    and the full run (which differ only in the model's size and the cases' counts) in ~1 minute instead of ~4."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--tiny", "--json", str(out)],
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
    assert data["env"]["tiny"] is True and all(t["met"] is None for t in data["targets"])  # a tiny model's speed
    assert "say nothing about the real models" in r.stdout  # is no evidence for or against a target
    assert "| k_prompts_4 |" in r.stdout and "| target |" in r.stdout
    from vlseg.precision import machine_info

    refs = {c["name"] for c in data["cases"] if c["name"].startswith("single_prompt_auto_vs_hf_")}
    if machine_info("cpu").cpu_bf16:  # the emulated-bf16 reference is left out of --quick only where bf16 is not native
        assert "single_prompt_auto_vs_hf_bf16-autocast" in refs and "skipped" not in data
    else:
        assert "single_prompt_auto_vs_hf_bf16-autocast" not in refs and "bf16-autocast" in data["skipped"][0]
        assert "Skipped: transformers bf16-autocast reference" in r.stdout


def test_folder_target_is_judged_only_on_a_100_image_folder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def result(images, ratio):
        return {"auto": {"chosen": "fp32"}, "cases": [
            {"name": f"folder_{images}_images_2_prompts_cli", "ratio": ratio, "images": images},
            {"name": f"folder_{images}_images_2_prompts_cli_first_use", "ratio": 0.1, "images": images}]}

    def folder_target(res):
        return next(t for t in bench.targets(res) if t["target"].startswith("folder"))

    assert folder_target(result(100, 3.5))["met"] is True
    assert folder_target(result(100, 2.0))["met"] is False
    quick = folder_target(result(2, 1.1))
    assert quick["met"] is None and "100 images" in quick["what"]
    assert "n/a" in bench.table({"env": {"date": "d", "device": "cpu", "machine": "m", "transformers": "t",
                                        "image_size": "s", "available_modes": ["fp32"]},
                                "auto": {"chosen": "fp32", "seconds": {}, "passed": {}},
                                "floor": {"matmul_gflops": {}, "encoder_gflop": 1.0, "matmul_shape": "s"},
                                "cases": [], "targets": [quick]})
