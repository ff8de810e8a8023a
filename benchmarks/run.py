"""vlseg speed and cost, side by side with the references, measured in one run.

    python benchmarks/run.py [--quick] [--json out.json] [--device cpu|cuda]

Every timing is a ratio reference_s / vlseg_s from interleaved repeats (warm-up first, median of >= 5), because
shared machines are noisy. Random weights at the real architecture sizes (speed does not depend on the values).
References: transformers' CLIPSegProcessor + CLIPSegForImageSegmentation (+ resize back), run as its docs show.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

import vlseg


# ----------------------------------------------------------------------------- timing helpers
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved A B A B ... after warm-up."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


class PeakRSS:
    """Peak resident memory (MB) while the block runs (CPU), or peak CUDA allocation (GPU)."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0.0, threading.Event()

    def _rss(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._t = threading.Thread(target=self._watch, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *a: Any) -> None:
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self._rss())


# ----------------------------------------------------------------------------- fixtures
def upstream_clipseg(folder: Path) -> str:
    """A CLIPSeg folder in the CIDAS/clipseg-rd64-refined layout (352 px, ViT-B/16, rd64, refined), random weights."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer
    from transformers import ViTImageProcessor

    from vlseg.encoders.tokenizers import write_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPSegConfig(vision_config=dict(patch_size=16), reduce_dim=64, use_complex_transposed_convolution=True)
    CLIPSegForImageSegmentation(config).eval().save_pretrained(folder)
    write_clip_tokenizer(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    img = ViTImageProcessor(do_resize=True, size={"height": 352, "width": 352}, resample=2, do_normalize=True,
                            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    CLIPSegProcessor(image_processor=img, tokenizer=tok).save_pretrained(folder)
    return str(folder)


PROMPTS = ["polyp", "surgical instrument", "the grasper's tip", "the larger lesion on the left", "liver",
           "retinal blood vessels", "skin lesion", "breast tumor", "left ventricle", "myocardium", "gallbladder",
           "mitochondria", "cell membranes", "aorta", "hook", "fat"]


class Reference:
    """transformers' CLIPSeg pipeline as documented: the image repeated once per prompt, then resized back."""

    def __init__(self, folder: str, device: str):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        self.proc = CLIPSegProcessor.from_pretrained(folder)
        self.model = CLIPSegForImageSegmentation.from_pretrained(folder).eval().to(device)
        self.device = device

    def __call__(self, image: Any, prompts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            inputs = self.proc(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")
            logits = self.model(**{k: v.to(self.device) for k, v in inputs.items()}).logits
            probs = torch.sigmoid(logits.reshape(len(prompts), 1, *logits.shape[-2:]))
            w, h = image.size
            return (F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0.5).cpu().numpy()


# ----------------------------------------------------------------------------- cases
def case_e2e_and_k(ref: Reference, model: Any, image: Any, ks: list[int], reps: int, device: str) -> list[dict]:
    out = []
    # equality first: the optimisations must not change the output
    with torch.inference_mode():
        a = vlseg.segment(model, image, PROMPTS[:2], return_probs=True)
    b = ref(image, PROMPTS[:2])
    agree = float(((a > 0.5) == b).mean())
    t = interleaved({"vlseg": lambda: vlseg.segment(model, image, [PROMPTS[0]]),
                     "ref": lambda: ref(image, [PROMPTS[0]])}, reps, 2, device)
    out.append({"name": "single_prompt_e2e", "vlseg_s": t["vlseg"], "reference": "transformers CLIPSeg pipeline",
                "reference_s": t["ref"], "ratio": t["ref"] / t["vlseg"], "mask_agreement": agree,
                "note": "PIL 512x512 in, binary mask at 512x512 out; prompt embedding cached after the first call"})
    bf = interleaved({"vlseg": lambda: vlseg.segment(model, image, [PROMPTS[0]], autocast=True),
                      "ref": lambda: ref(image, [PROMPTS[0]])}, reps, 1, device)
    with torch.inference_mode():
        c = vlseg.segment(model, image, PROMPTS[:2], return_probs=True, autocast=True)
    out.append({"name": "single_prompt_e2e_bf16", "vlseg_s": bf["vlseg"], "reference": "transformers CLIPSeg pipeline (fp32)",
                "reference_s": bf["ref"], "ratio": bf["ref"] / bf["vlseg"], "mask_agreement": float(((c > 0.5) == b).mean()),
                "max_prob_diff": float(np.abs(c - a).max()),
                "note": "opt-in vlseg.segment(..., autocast=True): bfloat16, outputs differ slightly"})
    cold = interleaved({"vlseg": lambda: (model.clear_cache(), vlseg.segment(model, image, [PROMPTS[0]])),
                        "ref": lambda: ref(image, [PROMPTS[0]])}, reps, 1, device)
    out.append({"name": "single_prompt_e2e_cold_text", "vlseg_s": cold["vlseg"],
                "reference": "transformers CLIPSeg pipeline", "reference_s": cold["ref"],
                "ratio": cold["ref"] / cold["vlseg"], "note": "text cache cleared before every call"})
    for k in ks:
        prompts = PROMPTS[:k]
        t = interleaved({"vlseg": lambda: vlseg.segment(model, image, prompts),
                         "ref": lambda: ref(image, prompts)}, reps, 1, device)
        out.append({"name": f"k_prompts_{k}", "k": k, "vlseg_s": t["vlseg"],
                    "reference": "transformers CLIPSeg pipeline (image repeated K times)", "reference_s": t["ref"],
                    "ratio": t["ref"] / t["vlseg"]})
    return out


def case_presets(ref: Reference, image: Any, presets: list[str], ks: list[int], reps: int, device: str) -> list[dict]:
    out = []
    for name in presets:
        with PeakRSS(device) as mem:
            model = vlseg.create_model(name, pretrained=False).to(device)
            s = model.trainable_summary()["total"]
            for k in ks:
                prompts = PROMPTS[:k]
                t = interleaved({"vlseg": lambda: vlseg.segment(model, image, prompts),
                                 "ref": lambda: ref(image, prompts)}, reps, 1, device)
                out.append({"name": f"preset_{name}_k{k}", "preset": name, "k": k, "vlseg_s": t["vlseg"],
                            "reference": "transformers CLIPSeg pipeline", "reference_s": t["ref"],
                            "ratio": t["ref"] / t["vlseg"], "params_total": s["total"],
                            "params_trainable": s["trainable"], "image_size": model.processor.size})
        for row in out[-len(ks):]:
            row["peak_mem_mb"] = round(mem.peak, 1)
        del model
    return out


def case_training(n_images: int, batch: int, reps: int, device: str) -> list[dict]:
    """Images/s of training steps: decoder-only, LoRA, and decoder-only with the frozen-feature cache."""
    from vlseg.cache import FeatureCache
    from vlseg.losses import SegmentationLoss

    rng = np.random.default_rng(0)
    images = [(rng.random((256, 256, 3)) * 255).astype(np.uint8) for _ in range(n_images)]
    masks = [rng.random((256, 256)) > 0.7 for _ in range(n_images)]
    loss_fn = SegmentationLoss()

    def make(lora: bool):
        torch.manual_seed(0)
        m = vlseg.create_model("clip-b16-film", pretrained=False).to(device)
        if lora:
            m.apply_lora({"r": 8, "image": True, "text": True})
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        return m, opt

    def epoch(m, opt, cache=None) -> None:
        for i in range(0, n_images, batch):
            pv = m.processor(images[i:i + batch], device=device)
            tg = m.processor.masks(masks[i:i + batch], device=device).unsqueeze(1)
            feats = cache.encode(m, pv, [str(j) for j in range(i, i + batch)]) if cache is not None else None
            o = m(pv, [["polyp"]] * pv.shape[0], image_features=feats)
            loss, _ = loss_fn(o.logits, tg, o.presence)
            loss.backward()
            opt.step()
            opt.zero_grad()

    dec, dec_opt = make(False)
    lora, lora_opt = make(True)
    cached, cached_opt = make(False)
    cache = FeatureCache(cached)
    t0 = time.perf_counter()
    epoch(cached, cached_opt, cache)  # epoch 1 fills the cache
    first = time.perf_counter() - t0
    t = interleaved({"uncached": lambda: epoch(dec, dec_opt), "lora": lambda: epoch(lora, lora_opt),
                     "cached": lambda: epoch(cached, cached_opt, cache)}, reps, 0, device)
    ips = {k: n_images / v for k, v in t.items()}
    return [
        {"name": "train_decoder_only", "vlseg_s": t["uncached"], "images_per_s": ips["uncached"],
         "reference": "same epoch with LoRA r=8 (image+text)", "reference_s": t["lora"],
         "ratio": t["lora"] / t["uncached"]},
        {"name": "train_lora", "vlseg_s": t["lora"], "images_per_s": ips["lora"],
         "reference": "decoder-only epoch", "reference_s": t["uncached"], "ratio": t["uncached"] / t["lora"]},
        {"name": "cached_epoch", "vlseg_s": t["cached"], "images_per_s": ips["cached"],
         "reference": "uncached epoch (decoder-only)", "reference_s": t["uncached"],
         "ratio": t["uncached"] / t["cached"], "epoch1_fill_s": first, "epoch1_vs_cached": first / t["cached"],
         "images_per_epoch": n_images, "batch": batch},
    ]


def case_batch(model: Any, batches: list[int], reps: int, device: str) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(1)
    pool = [Image.fromarray((rng.random((512, 512, 3)) * 255).astype(np.uint8)) for _ in range(max(batches))]
    per_image = {}
    for b in batches:
        t = interleaved({"b": lambda: vlseg.segment(model, pool[:b], [PROMPTS[0]], batch_size=b)}, reps, 1, device)
        per_image[b] = t["b"] / b
    base = per_image[batches[0]]
    return [{"name": f"batch_{b}", "batch": b, "vlseg_s": per_image[b] * b, "images_per_s": 1 / per_image[b],
             "reference": f"vlseg at batch {batches[0]} (per image)", "reference_s": base * b,
             "ratio": base / per_image[b]} for b in batches]


# ----------------------------------------------------------------------------- main
def environment(device: str) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers

    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": device,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None, "cpu": cpu,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "vlseg": vlseg.__version__, "python": platform.python_version(), "image_size": "512x512 input"}


def table(result: dict[str, Any]) -> str:
    e = result["env"]
    lines = [f"Measured {e['date']} on {e['device']} ({e['gpu'] or e['cpu']}), {e['threads']} threads, torch "
             f"{e['torch']}, transformers {e['transformers']}; {e['image_size']}.", "",
             "| case | vlseg (s) | reference | reference (s) | ratio (ref / vlseg) | extra |",
             "|---|---:|---|---:|---:|---|"]
    for c in result["cases"]:
        extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()
                          if k not in ("name", "vlseg_s", "reference", "reference_s", "ratio", "note"))
        lines.append(f"| {c['name']} | {c['vlseg_s']:.3f} | {c['reference']} | {c['reference_s']:.3f} | "
                     f"{c['ratio']:.2f}x | {extra} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer presets/sizes: under 3 minutes on 2 CPU cores")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5 (medians of fewer are too noisy)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from PIL import Image

    device = args.device
    reps = args.repeats
    image = Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8))
    result: dict[str, Any] = {"env": environment(device), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = upstream_clipseg(Path(tmp) / "clipseg")
        ref = Reference(folder, device)
        model = vlseg.create_model("clipseg-rd64-refined", pretrained=folder).to(device)
        steps = [
            ("K prompts", lambda: case_e2e_and_k(ref, model, image, [1, 4, 8, 16], reps, device)),
            ("presets", lambda: case_presets(ref, image, ["clip-b16-film", "biomedclip-xattn"] if args.quick else
                                             ["biomedclip-film", "biomedclip-xattn", "clip-b16-film", "clip-b16-xattn"],
                                             [1] if args.quick else [1, 8], reps, device)),
            ("training", lambda: case_training(8 if args.quick else 16, 4, reps, device)),
            ("batch scaling", lambda: case_batch(model, [1, 4] if args.quick else [1, 4, 16], reps, device)),
        ]
        for label, fn in steps:
            t = time.perf_counter()
            result["cases"] += fn()
            print(f"[{label}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
