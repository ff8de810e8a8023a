"""Training VQA models with finetune/train.py (``task: vqa``): a short CPU run on engine questions generated from the
real images in ../shared/data must beat the majority answer and its own question-blind ablation on held-back
images, and ground its answers better than before training; resume is exact and frozen features are cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vqa_model import synthetic_segmentation

import vlseg

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "finetune" / "train.py"
ARTIFACTS = ROOT / "test-artifacts"


def run_train(config: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", str(TRAIN),
           "--config", str(config), "threads=1", *overrides]  # one thread: no spinning on a shared, busy CPU
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    return r


# A small, fast version of finetune/configs/vqa-offline-shared.yaml: the real MiniLM text encoder, a 2-block scratch
# image trunk at 96 px, the multi-class sets plus two single-class sets.
SHARED_CONFIG = """
model: minilm-scratch-vqa
model_overrides:
  image_size: 96
  image_encoder: {{type: scratch, pretrained: false,
                  options: {{width: 96, depth: 2, heads: 2, patch_size: 16, image_size: 96}}}}
  decoder: {{name: film, options: {{layers: [0, 1], reduce_dim: 32, heads: 2}}}}
  family_options: {{answer_dim: 128, fusion: {{dim: 64, layers: 1, heads: 4}}}}
task: vqa
task_options: {{questions_per_image: 4, engine: {{questions_per_image: 8, max_per_type: 2}}}}
data:
  - {{name: epfl_em, manifest: {data}/epfl_em_multiclass/manifest.jsonl, weight: 2.0,
     qa: {{infer_absent: true, absent_pool: [polyp]}}}}
  - {{name: cholec, manifest: {data}/cholec_instance_seg_sample/manifest.jsonl,
     qa: {{absent_pool: [liver]}}}}
  - {{name: ph2, manifest: {data}/ph2/manifest.jsonl, qa: {{absent_pool: [breast tumor]}}}}
  - {{name: kvasir, manifest: {data}/kvasir_seg_sample/manifest.jsonl, weight: 0.3,
     qa: {{absent_pool: [skin lesion]}}}}
augment: null
batch_size: 8
lr: 0.002
warmup_steps: 10
max_steps: {steps}
eval_every: 1000
eval_max_samples: 120
best_metric: accuracy
seed: 0
"""


@pytest.fixture(scope="module")
def shared_run(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vqa-train")
    cfg = tmp / "vqa.yaml"
    cfg.write_text(SHARED_CONFIG.format(data=shared_data, steps=300))
    out = tmp / "run"
    run_train(cfg, f"output_dir={out}")
    return {"config": cfg, "out": out}


@pytest.mark.slow
def test_short_run_beats_majority_and_question_blind(shared_run):
    out = shared_run["out"]
    final = json.loads((out / "final.json").read_text())
    s = final["finish"]["vqa"]  # the best model on the whole held-back split
    assert s == json.loads((out / "vqa_eval.json").read_text())
    lines = (out / "vqa_eval.txt").read_text()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "vqa_short_run.txt").write_text(lines)
    print("\n" + lines)
    acc, b = s["all"]["accuracy"], s["baselines"]
    assert s["majority_source"] == "train" and s["n"] >= 150
    assert acc > b["majority"]["all"]["accuracy"] + 0.2, lines
    assert acc > b["question_blind"]["all"]["accuracy"] + 0.2, lines
    assert s["all"]["macro_f1"] > b["majority"]["all"]["macro_f1"], lines
    assert s["all"]["macro_f1"] > b["question_blind"]["all"]["macro_f1"], lines
    assert len(s["per_type"]) >= 5


@pytest.mark.slow
def test_grounding_improves_and_masks_fit_the_image(shared_run):
    from vlseg.training import load_config
    from vlseg.vqa import evaluate
    from vlseg.vqa.task import build_datasets

    trained = vlseg.load(shared_run["out"] / "best")
    cfg = load_config(shared_run["config"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, val = build_datasets(cfg)
    torch.manual_seed(0)
    untrained = vlseg.create_model(cfg.model, pretrained=True, **cfg.model_overrides)
    untrained.set_vocab(trained.vocab)
    kw = {"train_answers": train, "max_samples": 120, "seed": 0, "question_blind": False}
    before, after = evaluate(untrained, val, **kw), evaluate(trained, val, **kw)
    assert after["all"]["n_grounded"] >= 60
    assert after["all"]["dice"] > before["all"]["dice"] + 0.05, (before["all"], after["all"])
    assert after["all"]["iou"] > before["all"]["iou"]
    i = next(i for i in range(len(val)) if val.records[i]["type"] == "location")
    s = val[i]
    r = vlseg.answer(trained, s.image, [s.question, "Is there any polyp?"], region_threshold=None)
    assert all(x["mask"].shape == s.image.shape[:2] and x["mask"].dtype == bool for x in r)


@pytest.mark.slow
def test_resume_is_exact_with_cached_features(tmp_path):
    mf = synthetic_segmentation(tmp_path / "data", n=8)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: tiny-test-vqa
pretrained: false
task_options: {{questions_per_image: 2}}
data: [{{manifest: {mf}, qa: {{infer_absent: true}}}}]
augment: null
batch_size: 3
max_steps: 4
warmup_steps: 1
eval_every: 2
eval_max_samples: 8
best_metric: accuracy
cache_features: memory
""")
    run_train(cfg, f"output_dir={tmp_path / 'a'}")
    run_train(cfg, f"output_dir={tmp_path / 'b'}", "stop_after=2")
    run_train(cfg, f"output_dir={tmp_path / 'b'}", f"resume={tmp_path / 'b' / 'last'}")
    logs = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    la, lb = ([r["loss"] for r in log if "loss" in r] for log in logs)
    assert len(la) == len(lb) == 4 and np.allclose(la, lb, rtol=1e-5)
    counts = [(r["cache_hits"], r["cache_misses"]) for r in logs[0] if "loss" in r]
    assert [h + m for h, m in counts] == [3, 6, 9, 12] and counts[-1][0] > 0  # frozen features computed once
    fa, fb = (json.loads((tmp_path / r / "final.json").read_text()) for r in "ab")
    assert fa["weights_sha256_per_process"] == fb["weights_sha256_per_process"]
    m = vlseg.load(tmp_path / "a" / "best")
    assert m.config.family == "vqa" and {"grasper", "hook"} <= set(m.vocab.answers)
