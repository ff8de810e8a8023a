"""vlseg.segment_video on a short synthetic clip (a moving square): SAM 3's tracker through Sam3VideoModel and a
frame-by-frame family; readers (array, frames folder, video file), writers (mask videos, PNG sequences), CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sam3 import tiny_sam3_dir

import vlseg
from vlseg.video import open_video, read_mask_video

ROOT = Path(__file__).resolve().parents[1]
T, H, W = 6, 72, 96
PROMPTS = ["white square", "liver"]


def moving_square(t=T):
    frames = np.zeros((t, H, W, 3), np.uint8)
    for i in range(t):
        frames[i, 10 + 4 * i: 34 + 4 * i, 10 + 8 * i: 34 + 8 * i] = 255
    return frames


@pytest.fixture(scope="module")
def sam3():
    return vlseg.create_model("tiny-test-sam3", pretrained=tiny_sam3_dir())


@pytest.fixture(scope="module")
def tracker_options(sam3):
    """Random weights score ~0.3: put the detection thresholds just under frame 0's best score (over both test
    prompts), so one object is born there (real weights use the defaults, 0.5 / 0.7)."""
    with torch.inference_mode():
        best = sam3(sam3.processor([moving_square()[0]]), PROMPTS).instances.scores.max().item()
    return {"score_threshold_detection": best - 1e-3, "new_det_thresh": best - 1e-3}


def test_sam3_tracks_with_sam3_video_model(sam3, tracker_options):
    frames = moving_square(4)
    calls = []
    hook = sam3.image_encoder.backbone.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        results = list(vlseg.video.iter_segment_video(sam3, frames, ["white square", "liver"],
                                                      tracker_options=tracker_options, progress=False))
    finally:
        hook.remove()
    assert [r.index for r in results] == list(range(4)) and len(calls) == 4  # one ViT pass per frame
    assert all(r.masks.shape == (2, H, W) and r.masks.dtype == bool for r in results)
    born = [(k, o) for k, o in enumerate(results[0].objects) if len(o["ids"])]
    assert born  # objects start on frame 0 (without the `kernels` package transformers skips its mask NMS)
    for k, o in born:
        n = len(o["ids"])
        assert o["masks"].shape == (n, H, W) and o["boxes"].shape == (n, 4) and len(set(o["ids"].tolist())) == n
        assert np.array_equal(results[0].masks[k], o["masks"].any(0))
    # deterministic, and the same as transformers' own video pipeline (Sam3VideoProcessor + propagate_in_video)
    masks = vlseg.segment_video(sam3, frames, ["white square", "liver"], tracker_options=tracker_options,
                                progress=False)
    assert masks.shape == (4, 2, H, W)
    np.testing.assert_array_equal(masks, np.stack([r.masks for r in results]))
    from transformers import Sam3VideoModel, Sam3VideoProcessor

    ref = Sam3VideoModel.from_pretrained(tiny_sam3_dir()).eval()
    proc = Sam3VideoProcessor.from_pretrained(tiny_sam3_dir())
    for k, v in tracker_options.items():
        setattr(ref, k, v)
    session = proc.init_video_session(video=list(frames), inference_device="cpu")
    proc.add_text_prompt(session, ["white square", "liver"])
    for out in ref.propagate_in_video_iterator(session):
        r = proc.postprocess_outputs(session, out)
        for k, p in enumerate(["white square", "liver"]):
            ids = r["prompt_to_obj_ids"].get(p, [])
            sel = [j for j, o in enumerate(r["object_ids"].tolist()) if o in ids]
            expected = r["masks"][sel].any(0).numpy() if sel else np.zeros((H, W), bool)
            np.testing.assert_array_equal(masks[out.frame_idx, k], expected)
            assert sorted(results[out.frame_idx].objects[k]["ids"].tolist()) == sorted(ids)


def test_sam3_memory_stays_bounded(sam3, tracker_options):
    """The session keeps only the frames and tracker memories the tracker can still read."""
    from vlseg.families import sam3 as fam

    seen = {}
    original = fam._prune

    def spy(session, t, window, empty):
        original(session, t, window, empty)
        seen[t] = (sum(v.numel() > 0 for v in session.processed_frames.values()),
                   max((len(o["non_cond_frame_outputs"]) for o in session.output_dict_per_obj.values()), default=0))

    fam._prune = spy
    try:
        opts = {**tracker_options, "hotstart_delay": 0}
        n = 10
        out = vlseg.segment_video(sam3, moving_square(n), ["white square"], tracker_options=opts, progress=False)
    finally:
        fam._prune = original
    assert out.shape == (n, 1, H, W)
    window = max(sam3.image_encoder.tracker_model.config.num_maskmem,
                 sam3.image_encoder.tracker_model.config.max_object_pointers_in_encoder) + 1
    assert all(frames_held == 1 and memories <= window for frames_held, memories in seen.values())


def test_frame_by_frame_family_batches_and_smooths():
    model = vlseg.create_model("tiny-test", pretrained=False)
    frames = moving_square()
    calls = {"image": 0}
    enc = model.image_encoder
    hook = enc.register_forward_hook(lambda *a: calls.__setitem__("image", calls["image"] + 1))
    model.clear_cache()
    try:
        masks = vlseg.segment_video(model, frames, ["white square", "liver"], batch_size=4, progress=False)
    finally:
        hook.remove()
    assert masks.shape == (T, 2, H, W) and calls["image"] == 2  # 6 frames in batches of 4
    assert model.stats["text_encoder_calls"] >= 1
    expected = np.stack(vlseg.segment(model, list(frames), ["white square", "liver"]))
    np.testing.assert_array_equal(masks, expected)  # the same as segmenting each frame
    again = vlseg.segment_video(model, frames, ["white square", "liver"], batch_size=4, progress=False)
    np.testing.assert_array_equal(masks, again)
    smooth = vlseg.video.iter_segment_video(model, frames, ["white square"], smoothing=0.5, threshold=0.0,
                                            progress=False)
    assert [r.index for r in smooth] == list(range(T))
    with pytest.raises(ValueError, match="smoothing"):
        vlseg.segment_video(model, frames, ["x"], smoothing=1.0)
    flipped = vlseg.segment_video(model, frames, ["white square", "liver"], batch_size=4, progress=False, flip=True)
    np.testing.assert_array_equal(flipped, np.stack(vlseg.segment(model, list(frames), ["white square", "liver"],
                                                                  flip=True)))  # mirror TTA as for images
    with pytest.raises(ValueError, match="flip"):
        vlseg.segment_video(model, frames, ["x"], flip="yes", progress=False)
    with pytest.raises(ValueError, match="cannot track"):
        vlseg.segment_video(model, frames, ["x"], track=True, progress=False)


def test_readers_and_writers(tmp_path):
    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    frames = moving_square()
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):  # natural order: frame_2 before frame_10
        Image.fromarray(f).save(folder / f"frame_{i * 5}.png")
    src = open_video(folder)
    assert src.num_frames == T and np.array_equal(np.stack(list(src.frames)), frames)
    model = vlseg.create_model("tiny-test", pretrained=False)
    written = vlseg.segment_video(model, frames, ["white square"], out=tmp_path / "out", threshold=0.3,
                                  progress=False)
    assert [p.name for p in written] == ["video__white_square.mp4", "video__overlay.mp4"]
    masks = vlseg.segment_video(model, frames, ["white square"], threshold=0.3, progress=False)
    np.testing.assert_array_equal(read_mask_video(written[0], (H, W)), masks[:, 0])  # lossless
    clip = open_video(written[1])
    assert clip.num_frames == T and clip.fps == pytest.approx(25.0)
    pngs = vlseg.segment_video(model, str(written[1]), ["white square"], out=tmp_path / "png", out_format="png",
                               progress=False, max_frames=4)
    assert len(list(pngs[0].iterdir())) == 4 and read_mask_video(pngs[0]).shape == (4, H, W)
    with pytest.raises(ValueError, match="not a video file"):
        open_video(tmp_path / "frames" / "frame_0.png")
    assert av is not None


def test_cli_segments_a_video(sam3, tracker_options, tmp_path):
    pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    clip = tmp_path / "clip.mp4"
    import av

    with av.open(str(clip), mode="w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for f in moving_square():
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    out = tmp_path / "masks"
    r = subprocess.run([sys.executable, "-m", "vlseg.cli", "segment", str(clip), "-p", "the grasper", "-m",
                        "tiny-test", "--pretrained", "false", "-o", str(out), "--video-format", "png"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["files_written"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["clip__overlay", "clip__the_grasper"]
    assert len(list((out / "clip__the_grasper").iterdir())) == T
    assert vlseg.io.find_inputs([clip])[0].kind == "video"
