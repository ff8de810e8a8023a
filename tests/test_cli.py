import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlseg
from vlseg.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ckpt(tmp_path):
    m = vlseg.create_model("tiny-test", pretrained=False)
    with __import__("torch").no_grad():
        m.decoder.presence_head[1].bias.fill_(10.0)  # always "present", so masks are not gated away
    return m.save_pretrained(tmp_path / "ck")


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (33, 21), dtype=np.uint8)).save(d / "sub" / "b.jpg")
    return d


def test_segment_folder_writes_masks_and_overlays(ckpt, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["segment", str(images), "--prompt", "polyp", "-p", "the grasper tip", "--model", ckpt, "--out",
               str(out), "--threshold", "0.3"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a__overlay.png", "a__polyp.png", "a__the_grasper_tip.png", "sub__b__overlay.png",
                     "sub__b__polyp.png", "sub__b__the_grasper_tip.png"]
    assert Image.open(out / "a__polyp.png").size == (60, 40)
    assert Image.open(out / "sub__b__polyp.png").size == (21, 33)
    assert set(np.unique(np.asarray(Image.open(out / "a__polyp.png")))) <= {0, 255}
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["files_written"] == 6
    # never overwrites without --overwrite: nothing is touched, exit code 2
    before = (out / "a__polyp.png").stat().st_mtime_ns
    assert main(["segment", str(images), "-p", "polyp", "-m", ckpt, "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "a__polyp.png").stat().st_mtime_ns == before
    assert main(["segment", str(images), "-p", "polyp", "-m", ckpt, "-o", str(out), "--overwrite"]) == 0


def test_segment_nifti_keeps_affine(ckpt, tmp_path):
    nib = pytest.importorskip("nibabel")
    aff = np.array([[0.8, 0, 0, 10], [0, 0.7, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image((np.random.default_rng(0).random((30, 26, 3)) * 800).astype(np.int16), aff),
             str(tmp_path / "ct.nii.gz"))
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "-p", "liver", "-m", ckpt, "-o", str(out),
                 "--window", "abdomen"]) == 0
    m = nib.load(str(out / "ct__liver.nii.gz"))
    assert m.shape == (30, 26, 3) and np.allclose(m.affine, aff)


@pytest.mark.parametrize("argv,msg", [
    (["segment", "missing.png", "-p", "x", "-o", "o"], "input not found"),
    (["segment", "{img}", "-p", "x", "-m", "no-such-model", "-o", "{out}"], "Unknown model"),
    (["segment", "{img}", "-p", "", "-m", "{ck}", "-o", "{out}"], "empty"),
    (["info", "{img}"], "not a vlseg checkpoint"),
])
def test_errors_are_one_line(argv, msg, ckpt, images, tmp_path, capsys):
    argv = [a.format(img=images / "a.png", out=tmp_path / "o", ck=ckpt) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_models_and_info(ckpt, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "biomedclip-film" in out and "clipseg-rd64-refined" in out
    assert main(["info", ckpt]) == 0
    out = capsys.readouterr().out
    assert '"vlseg_format": 1' in out and "decoder" in out and "trainable" in out


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "vlseg"
    if not exe.exists():
        pytest.skip("vlseg console script not installed in this environment")
    r = subprocess.run([str(exe), "segment", str(tmp_path / "nope.png"), "-p", "x", "-o", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: input not found")


@pytest.mark.slow
def test_accelerate_two_processes_shard_inputs(ckpt, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(5):
        Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "-m", "vlseg.cli", "segment", str(d), "-p", "polyp", "-m", ckpt, "-o", str(out)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])
    assert summary == {"inputs": 5, "files_written": 10, "out": str(out), "processes": 2}
    assert len(list(out.glob("*__polyp.png"))) == 5


def test_segment_dicom_series_folder_to_nifti(ckpt, tmp_path):
    pytest.importorskip("pydicom")
    nib = pytest.importorskip("nibabel")
    from test_clinical import write_dicom

    series = tmp_path / "series"
    series.mkdir()
    for i, z in enumerate([0.0, 2.0, 4.0]):
        write_dicom(series / f"{i}.dcm", np.full((20, 24), 1000 + 30 * i, np.uint16), z=z, instance=i)
    out = tmp_path / "out"
    assert main(["segment", str(series), "-p", "liver", "-m", ckpt, "-o", str(out), "--window", "abdomen"]) == 0
    m = nib.load(str(out / "series__liver.nii.gz"))
    assert m.shape == (20, 24, 3)
    assert np.allclose(np.linalg.norm(m.affine[:3, :3], axis=0), [0.7, 0.8, 2.0])  # voxel sizes per array axis


def test_segment_flip_flag(ckpt, tmp_path):
    """``--flip on/off`` reach ``vlseg.segment(flip=...)``: the written masks are the Python call's."""
    img = np.random.default_rng(5).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    img[:, :25] = 250  # left-right asymmetric
    Image.fromarray(img).save(tmp_path / "a.png")
    model = vlseg.load(ckpt)
    probs = vlseg.segment(model, img, ["polyp"], return_probs=True, flip=False)[0]
    t = float(np.median(probs))  # a threshold that cuts the map in two, so the masks say something
    want = {f: vlseg.segment(model, img, ["polyp"], threshold=t, flip=f)[0] for f in (True, False)}
    assert (want[True] != want[False]).any()
    for flag, f in (("on", True), ("off", False)):
        out = tmp_path / flag
        assert main(["segment", str(tmp_path / "a.png"), "-p", "polyp", "-m", ckpt, "-o", str(out), "--threshold",
                     str(t), "--precision", "fp32", "--flip", flag]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(out / "a__polyp.png")) > 0, want[f])


def test_calibrate_writes_a_calibrated_copy(tmp_path, capsys):
    from test_finetune import synthetic_manifest

    from vlseg.cli import _split_dataset, build_parser
    from vlseg.language_use import presence_calibration

    mf = synthetic_manifest(tmp_path / "d", n=16)
    src = Path(vlseg.create_model("tiny-test", pretrained=False).save_pretrained(tmp_path / "ck"))  # untuned presence
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    argv = ["calibrate", "--model", str(src), "--data", str(mf), "--out", str(tmp_path / "cal"), "--seed", "3",
            "--max-images", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # the same number as the library call on the same split and draw; the source checkpoint is untouched
    ds = _split_dataset(build_parser().parse_args(argv))
    want = presence_calibration(vlseg.load(src), ds, seed=3, max_images=6)
    got = vlseg.load(tmp_path / "cal")
    assert got.config.presence_threshold == pytest.approx(want["threshold"]) and 0 < want["threshold"] < 1
    assert vlseg.load(src).config.presence_threshold is None
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    rec = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert rec["threshold"] == pytest.approx(want["threshold"]) and rec["n_negative"] == want["n_negative"] > 0
    assert "presence threshold unset (0.5) -> " in printed and "true masks kept" in printed
    # refused: an existing --out, the checkpoint itself, a folder that is not a checkpoint, no presence head
    capsys.readouterr()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--out", str(src)]) == 2 and "already exists" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "d"), "--data", str(mf), "--out", str(tmp_path / "x")]) == 2
    assert "not a vlseg checkpoint" in capsys.readouterr().err
    vlseg.create_model("tiny-test", pretrained=False, presence=False).save_pretrained(tmp_path / "nohead")
    nohead = ["calibrate", "--model", str(tmp_path / "nohead"), "--data", str(mf), "--out", str(tmp_path / "y")]
    assert main(nohead) == 2
    assert "no presence head" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "z"), "--min-specificity", "95"]) == 2
    assert "min_specificity must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
