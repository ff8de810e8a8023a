"""finetune/train.py and finetune/evaluate.py end to end on the CPU (tiny model, small data)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import vlseg

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "finetune" / "train.py"


def synthetic_manifest(folder: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = []
    for i in range(n):
        img = (rng.random((48, 64, 3)) * 60).astype(np.uint8)
        m = np.zeros((48, 64), np.uint8)
        y, x = rng.integers(0, 28), rng.integers(0, 40)
        m[y:y + 16, x:x + 20] = 255
        img[m > 0] = (220, 120, 120)
        Image.fromarray(img).save(folder / "images" / f"{i}.png")
        Image.fromarray(m).save(folder / "masks" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "mask": f"masks/{i}.png", "class_name": "polyp",
                     "dataset": "synth", "subject": f"s{i // 2}"})
    mf = folder / "manifest.jsonl"
    mf.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return mf


def run(args, launcher=("--cpu", "--num_processes", "1"), timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(TRAIN), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def base_args(mf, out, steps, extra=()):
    return ["model=tiny-test", "pretrained=false", f"data=[{{manifest: {mf}}}]", f"output_dir={out}",
            f"max_steps={steps}", "batch_size=4", "eval_every=1000", "eval_max_samples=4", "warmup_steps=1",
            "lr=0.01", "augment={hflip: 0.5}", "negative_rate=0.2", *extra]


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.fixture(scope="module")
def mf(tmp_path_factory):
    return synthetic_manifest(tmp_path_factory.mktemp("synth"))


def test_smoke_writes_loadable_checkpoints(mf, tmp_path):
    out = tmp_path / "run"
    run(base_args(mf, out, 3, ["cache_features=off"]))
    for name in ("last", "best"):
        m = vlseg.load(out / name)
        assert m.config.name == "tiny-test"
    assert len(losses(out)) == 3 and (out / "curves.png").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_steps"] == 3 and cfg["model"] == "tiny-test"
    assert any('"val_dice"' in x for x in (out / "metrics.jsonl").read_text().splitlines())
    # never overwrites an existing run
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(TRAIN), *base_args(mf, out, 3)], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_unknown_key_is_an_error(mf, tmp_path):
    r = subprocess.run([sys.executable, str(TRAIN), *base_args(mf, tmp_path, 1), "lr_rate=1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "unknown config key(s) ['lr_rate']" in r.stderr


@pytest.mark.slow
def test_resume_equals_uninterrupted(mf, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(base_args(mf, a, 6, ["cache_features=off", "eval_every=3"]))
    run(base_args(mf, b, 6, ["cache_features=off", "eval_every=3", "stop_after=3"]))
    run(base_args(mf, b, 6, ["cache_features=off", "eval_every=3", f"resume={b}/last"]))
    wa, wb = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-6), k
    assert np.allclose(losses(a), losses(b), atol=1e-6)


@pytest.mark.slow
def test_cached_and_uncached_give_same_losses(mf, tmp_path):
    run(base_args(mf, tmp_path / "c", 6, ["cache_features=memory"]))
    run(base_args(mf, tmp_path / "u", 6, ["cache_features=off"]))
    rows = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rows[-1]["cache_hits"] > 0
    assert np.allclose(losses(tmp_path / "c"), losses(tmp_path / "u"), atol=1e-5)


@pytest.mark.slow
def test_two_process_cpu_run_keeps_identical_weights(mf, tmp_path):
    out = tmp_path / "ddp"
    run(base_args(mf, out, 3, ["cache_features=off"]), launcher=("--multi_gpu", "--num_processes", "2"))
    final = json.loads((out / "final.json").read_text())
    assert final["processes"] == 2 and len(final["weights_sha256_per_process"]) == 2
    h0, h1 = final["weights_sha256_per_process"]
    assert h0 == h1
    assert vlseg.load(out / "last") is not None


@pytest.mark.slow
def test_loss_goes_down_on_real_images(shared_data, tmp_path):
    rows = [json.loads(x) for x in (shared_data / "cvc_clinicdb" / "manifest.jsonl").read_text().splitlines()[:6]]
    for r in rows:
        r["image"] = str(shared_data / "cvc_clinicdb" / r["image"])
        r["mask"] = str(shared_data / "cvc_clinicdb" / r["mask"])
        r["video"] = r["image"]  # every image its own group
    mf = tmp_path / "m.jsonl"
    mf.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "real"
    run(["model=tiny-test", "pretrained=false", f"data=[{{manifest: {mf}}}]", f"output_dir={out}", "max_steps=30",
         "batch_size=4", "eval_every=1000", "eval_max_samples=2", "warmup_steps=2", "lr=0.03", "augment=null",
         "negative_rate=0.0", "prompt_levels=[p1]", "val_fraction=0.2"])
    ls = losses(out)
    assert len(ls) == 30 and np.mean(ls[-5:]) < 0.8 * np.mean(ls[:5])


def test_evaluate_script_writes_metrics(mf, tmp_path):
    tiny = vlseg.create_model("tiny-test", pretrained=False)
    tiny.save_pretrained(tmp_path / "ck")
    r = subprocess.run([sys.executable, str(ROOT / "finetune" / "evaluate.py"), "--model", str(tmp_path / "ck"),
                        "--data", str(mf), "--out", str(tmp_path / "ev"), "--max-samples", "4"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["all"]["n"] == 8 and set(m["ablations"]) == {"correct", "empty", "wrong_class", "shuffled"}
    assert "synth" in m["per_dataset"] and set(m["per_level"]) == {"p1", "p6"}
    assert (tmp_path / "ev" / "per_image.csv").read_text().count("\n") == 9
    assert list((tmp_path / "ev" / "overlays").glob("worst_*.png"))
    bad = subprocess.run([sys.executable, str(ROOT / "finetune" / "evaluate.py"), "--model", "nope-model",
                          "--data", str(mf), "--out", str(tmp_path / "ev2")], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and "Unknown model" in bad.stderr


@pytest.mark.slow
def test_bf16_lora_and_accumulation_run(mf, tmp_path):
    out = tmp_path / "bf16"
    run(base_args(mf, out, 2, ["mixed_precision=bf16", "train_parts=lora", "lora={r: 2, text: true}",
                               "grad_accum=2", "cache_features=auto"]))
    m = vlseg.load(out / "last")
    assert m.config.lora is not None and m.config.lora.text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(rows) == 2 and "cache_hits" not in rows[0]  # LoRA on the image encoder: no feature cache


def test_channels_last_run_matches_the_default_layout(mf, tmp_path):
    """Channels-last convolution weights change the kernels' memory layout, not the maths: the same run in both
    layouts gives the same losses and weights (to float rounding), and the checkpoint is saved in the default
    layout, loadable as any other."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(base_args(mf, a, 3, ["cache_features=off"]))
    run(base_args(mf, b, 3, ["cache_features=off", "memory_format=channels_last"]))
    assert np.allclose(losses(a), losses(b), atol=1e-4)
    wa, wb = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    assert wa.keys() == wb.keys() and any(v.ndim == 4 for v in wb.values())
    for k in wa:
        assert wb[k].is_contiguous() and np.allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-4), k
    final = json.loads((b / "final.json").read_text())
    assert final["memory_format"] == "channels_last" and final["memory_format_choice"] is None
    assert json.loads((a / "final.json").read_text())["memory_format"] == "contiguous"
    vlseg.load(b / "best")


def test_bad_model_is_one_readable_error(mf, tmp_path):
    r = subprocess.run([sys.executable, str(TRAIN), *base_args(mf, tmp_path / "x", 1), "model=tiny-tset"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.startswith("error: Unknown model 'tiny-tset'") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_resume_equals_uninterrupted_with_canvases(shared_data, tmp_path):
    """Composite canvases, several prompts per image and negatives are drawn from (seed, step): a resumed run
    equals an uninterrupted one; the finished run stores a calibrated presence threshold and reports language use."""
    mf = shared_data / "manifest_all.jsonl"
    args = ["model=tiny-test", "pretrained=false", f"data=[{{manifest: {mf}}}]", "max_steps=6", "batch_size=3",
            "eval_every=3", "eval_max_samples=4", "warmup_steps=1", "lr=0.01", "augment={hflip: 0.5}",
            "prompts_per_image=3", "composite_rate=0.5", "negative_rate=0.3", "cache_features=off"]
    a, b = tmp_path / "a", tmp_path / "b"
    run([*args, f"output_dir={a}"])
    run([*args, f"output_dir={b}", "stop_after=3"])
    run([*args, f"output_dir={b}", f"resume={b}/last"])
    wa, wb = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    for k in wa:
        assert np.allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-6), k
    assert np.allclose(losses(a), losses(b), atol=1e-6)
    steps = [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step logged twice after the resume
    final = json.loads((a / "final.json").read_text())
    t = final["finish"]["presence_calibration"]["threshold"]
    assert vlseg.load(a / "best").config.presence_threshold == pytest.approx(t)
    assert final["finish"]["language_use"]["summary_line"].startswith("language use: ")


def test_evaluate_in_a_precision_mode(mf, tmp_path, monkeypatch):
    """`vlseg evaluate --precision`: fp32 by default (the model as trained), a named mode runs that variant, and
    auto calibrates on the evaluated images with their class names (not on synthetic ones)."""
    from helpers import spy_on_auto_calibration
    from vlseg import precision as P
    from vlseg.data import from_manifest
    from vlseg.evaluation import evaluate

    tiny = vlseg.create_model("tiny-test", pretrained=False)
    ds = from_manifest(mf)
    kw = dict(max_samples=2, ablations=False, language_use=False, overlays=0, progress=False)
    ref = evaluate(tiny, ds, tmp_path / "fp32", **kw)
    assert ref["precision"] == "fp32"
    q = evaluate(tiny, ds, tmp_path / "int8", precision="int8", **kw)
    assert q["precision"] == "int8" and abs(q["all"]["dice"] - ref["all"]["dice"]) < 0.2
    seen = spy_on_auto_calibration(monkeypatch, tiny)
    evaluate(tiny, ds, tmp_path / "auto", precision="auto", **kw)
    assert len(seen["images"]) == min(3, len(ds)) and np.array_equal(seen["images"][0], ds[0].image)
    assert seen["prompts"] == [ds[i].class_name for i in range(min(3, len(ds)))]
    P._RESOLVED.pop(tiny, None)


@pytest.mark.parametrize("path", sorted((ROOT / "finetune" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    """Every config in finetune/configs validates (keys, types, ranges) and names a known model."""
    from vlseg.training import load_config

    cfg = load_config(path)
    assert cfg.max_steps > 0 and cfg.data
    assert cfg.model in vlseg.list_models() or Path(cfg.model).exists(), cfg.model


def test_split_seed_fixes_the_split_while_the_seed_varies(tmp_path, monkeypatch):
    """`split_seed` draws the train/val split apart from `seed` (default: the same), so several training seeds can
    be compared on one validation split; `vlseg evaluate --split-seed` selects that split."""
    from vlseg import cli, evaluation
    from vlseg.training import get_task, load_config

    mf = synthetic_manifest(tmp_path / "d", n=24)  # 12 subjects: the split depends on the seed

    def val_images(*overrides):
        cfg = load_config(None, ["model=tiny-test", f"data=[{{manifest: {mf}}}]", *overrides])
        _, val = get_task("segmentation").datasets(cfg)
        return sorted(r["image"] for r in val.records)

    assert val_images("seed=0") != val_images("seed=1")
    assert val_images("seed=1", "split_seed=0") == val_images("seed=0")
    assert val_images("seed=0", "split_seed=1") == val_images("seed=1")
    seen = []

    def fake_evaluate(model, ds, out, **kw):  # what `vlseg evaluate` would score
        seen.append((sorted(r["image"] for r in ds.records), kw["seed"]))
        return {}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    monkeypatch.setattr(evaluation, "report_lines", lambda summary: [])
    base = ["evaluate", "--model", "tiny-test", "--pretrained", "false", "--data", str(mf), "--out", str(tmp_path / "e"),
            "--split", "val"]
    assert cli.main([*base, "--seed", "1", "--split-seed", "0"]) == 0
    assert cli.main([*base, "--seed", "1"]) == 0
    assert seen == [(val_images("seed=0"), 1), (val_images("seed=1"), 1)]
