"""SAM 3 through vlseg against transformers' own pipeline, timed in the same run on the same machine.

    python benchmarks/sam3.py --quick                       # tiny random SAM 3 on the CPU, a few seconds
    python benchmarks/sam3.py --device cuda --model sam3    # real size (facebook/sam3 weights, or --random-weights)

Cases (ratio = reference time / vlseg time, both measured here):
    k_prompts_K   one image, K prompts. Reference: transformers' documented pipeline, once per prompt:
                  ``Sam3Processor(images=image, text=prompt)`` + ``Sam3Model(**inputs)`` +
                  ``post_process_instance_segmentation`` (the image is re-encoded for every prompt). vlseg:
                  ``vlseg.segment(model, image, prompts)`` (the ViT once, the K prompts batched, prompt features
                  from the model's cache: a new image with prompts seen before). ``mask_agreement`` = fraction of
                  equal mask pixels.
    video         frames/s of ``vlseg.segment_video`` (Sam3VideoModel tracking, frames streamed) against
                  transformers' ``Sam3VideoProcessor.init_video_session(video=...)`` + ``propagate_in_video_iterator``.
Random weights unless ``--pretrained`` names a folder: speed does not depend on the weights (except through how
many instances pass the threshold). Prints the CPU model, its vector extensions and torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vlseg
from vlseg.families.sam3 import write_upstream_folder

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")


def cpu_info() -> dict[str, Any]:
    name, flags = platform.processor() or "unknown", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and name in ("unknown", "", platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in FLAGS if f in have]
                break
    except OSError:
        pass
    return {"cpu": name, "cpu_flags": flags, "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """(median seconds of ``repeats`` calls after one warm-up call, the last call's result)."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def scene(size: int, seed: int = 0) -> np.ndarray:
    """A (size, 1.3 size) grey image with bright discs."""
    rng = np.random.default_rng(seed)
    h, w = size, int(size * 1.3)
    yy, xx = np.mgrid[0:h, 0:w]
    sem = ((yy - 0.35 * h) ** 2 + (xx - 0.3 * w) ** 2 <= (0.15 * h) ** 2) | \
        ((yy - 0.65 * h) ** 2 + (xx - 0.7 * w) ** 2 <= (0.12 * h) ** 2)
    img = np.clip(60 + rng.normal(0, 15, (h, w)) + 160 * sem, 0, 255).astype(np.uint8)
    return np.stack([img] * 3, -1)


def moving_square(t: int, h: int, w: int) -> np.ndarray:
    frames = np.zeros((t, h, w, 3), np.uint8)
    s = h // 3
    for i in range(t):
        y, x = min(h - s, 4 + 3 * i), min(w - s, 4 + 6 * i)
        frames[i, y:y + s, x:x + s] = 255
    return frames


def bench_prompts(model: Any, folder: str, device: str, ks: list[int], repeats: int) -> list[dict[str, Any]]:
    from transformers import Sam3Model, Sam3Processor

    proc = Sam3Processor.from_pretrained(folder)
    ref = Sam3Model.from_pretrained(folder).to(device).eval()
    image = scene(int(model.processor.size * 1.2))
    vocabulary = ["polyp", "liver", "left kidney", "surgical instrument", "tumour", "white disc", "vessel", "lesion",
                  "spleen", "gallbladder", "the grasper's tip", "stomach", "aorta", "pancreas", "bladder", "lung"]
    thr = model.decoder.score_threshold
    cases = []
    for k in ks:
        prompts = vocabulary[:k]

        def reference(prompts: list[str] = prompts) -> list[np.ndarray]:
            masks = []
            for p in prompts:
                inputs = proc(images=image, text=p, return_tensors="pt").to(device)
                with torch.inference_mode():
                    out = ref(**inputs)
                r = proc.post_process_instance_segmentation(out, threshold=thr, mask_threshold=0.5,
                                                            target_sizes=inputs["original_sizes"].tolist())[0]
                m = r["masks"]
                masks.append(m.bool().any(0).cpu().numpy() if len(m) else np.zeros(image.shape[:2], bool))
            return masks

        def ours(prompts: list[str] = prompts) -> np.ndarray:
            return vlseg.segment(model, image, prompts)

        (ref_s, ref_masks), (vl_s, our_masks) = timed(reference, repeats), timed(ours, repeats)
        agreement = float(np.mean(np.stack(ref_masks) == our_masks))
        cases.append({"name": f"k_prompts_{k}", "k": k, "reference_s": ref_s, "vlseg_s": vl_s,
                      "ratio": ref_s / vl_s, "mask_agreement": agreement})
    return cases


def bench_video(model: Any, folder: str, device: str, frames_n: int, repeats: int) -> dict[str, Any] | None:
    if model.image_encoder.video is None:
        return None
    from transformers import Sam3VideoModel, Sam3VideoProcessor

    s = model.processor.size
    frames = moving_square(frames_n, s, int(s * 1.3))
    ref = Sam3VideoModel.from_pretrained(folder).to(device).eval()
    proc = Sam3VideoProcessor.from_pretrained(folder)

    def reference() -> None:
        session = proc.init_video_session(video=list(frames), inference_device=device)
        proc.add_text_prompt(session, "white square")
        for out in ref.propagate_in_video_iterator(session):
            proc.postprocess_outputs(session, out)

    def ours() -> None:
        vlseg.segment_video(model, frames, ["white square"], progress=False)

    (ref_s, _), (vl_s, _) = timed(reference, repeats), timed(ours, repeats)
    return {"name": "video", "frames": frames_n, "reference_s": ref_s, "vlseg_s": vl_s, "ratio": ref_s / vl_s,
            "reference_fps": frames_n / ref_s, "vlseg_fps": frames_n / vl_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and frames (seconds on a CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--model", default=None, help="sam3 preset (default: tiny-test-sam3 on cpu, sam3 on cuda)")
    ap.add_argument("--pretrained", default=None, help="an upstream SAM 3 folder (default: random weights)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.model or ("sam3" if args.device.startswith("cuda") else "tiny-test-sam3")
    repeats, frames_n, ks = (1, 3, [1, 8]) if args.quick else (5, 16, [1, 8])
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.pretrained or write_upstream_folder(Path(tmp) / "upstream", preset)
        model = vlseg.create_model(preset, pretrained=folder).to(args.device)
        env = {**cpu_info(), "torch": torch.__version__, "device": args.device, "model": preset,
               "weights": "given folder" if args.pretrained else "random", "image_size": model.processor.size,
               "queries": model.decoder.detr_decoder.config.num_queries}
        print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
        cases = bench_prompts(model, folder, args.device, ks, repeats)
        video = bench_video(model, folder, args.device, frames_n, repeats)
    if video:
        cases.append(video)
    print("\n| case | reference s | vlseg s | ratio | notes |\n|---|---|---|---|---|")
    for c in cases:
        note = (f"mask agreement {c['mask_agreement']:.4f}" if "mask_agreement" in c else
                f"{c['vlseg_fps']:.1f} vs {c['reference_fps']:.1f} frames/s ({c['frames']} frames)")
        print(f"| {c['name']} | {c['reference_s']:.3f} | {c['vlseg_s']:.3f} | {c['ratio']:.2f}x | {note} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "cases": cases}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
