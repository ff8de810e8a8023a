"""Fine-tune a vlseg model: one readable accelerate loop using only vlseg's public API.

    accelerate launch finetune/train.py --config finetune/configs/offline-shared.yaml output_dir=runs/x max_steps=300

Runs on one GPU, many (DDP via accelerate), or the CPU. ``key=value`` overrides (nested with dots:
``loss.dice_weight=2``) are parsed as YAML; unknown keys are errors. The resolved config is saved in the run
folder. Leaves ``output_dir/last/`` and ``output_dir/best/`` (``vlseg.load``-able), ``metrics.jsonl`` and
``curves.png``; ``resume=output_dir/last`` continues exactly where a run stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vlseg
from vlseg.cache import FeatureCache, cache_blockers
from vlseg.evaluation import evaluate_dataset
from vlseg.data import PairedAugment, PooledDataset, from_folder, from_hf, from_manifest, train_val_split
from vlseg.losses import SegmentationLoss
from vlseg.prompts import PromptSampler

REPO = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    # model
    model: str = "minilm-scratch-film"  # preset name, JSON file, or a vlseg checkpoint folder to start from
    pretrained: Any = True  # see vlseg.create_model
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {image_size: 160}
    train_parts: str = "decoder"  # decoder | lora | full
    lora: dict[str, Any] | None = None  # LoraSpec fields when train_parts == lora
    gradient_checkpointing: bool = False
    # data: a list of sources {manifest|folder+masks|hf: ..., weight, class_name, datasets, split, ...}
    data: list[dict[str, Any]] = field(default_factory=list)
    val_data: list[dict[str, Any]] | None = None  # default: a group-aware split of `data`
    val_fraction: float = 0.2
    prompt_levels: list[str] = field(default_factory=lambda: [f"p{i}" for i in range(1, 10)])
    eval_levels: list[str] = field(default_factory=lambda: ["p1", "p6"])
    negative_rate: float = 0.1
    instance_rate: float = 0.0
    augment: dict[str, Any] | None = field(default_factory=lambda: {"hflip": 0.5})
    # optimisation
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_steps: int = 300
    stop_after: int | None = None  # stop early at this step (the schedule still follows max_steps)
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    loss: dict[str, float] = field(default_factory=lambda: {"dice_weight": 1.0, "bce_weight": 1.0,
                                                             "focal_weight": 0.0, "presence_weight": 0.2})
    # frozen-feature cache: auto (when the image encoder is frozen and inputs repeat) | off | memory | disk
    cache_features: str = "auto"
    cache_max_gb: float = 2.0
    # evaluation and checkpoints
    eval_every: int = 100
    eval_max_samples: int | None = 200
    best_metric: str = "dice"
    output_dir: str = "runs/train"
    overwrite: bool = False
    resume: str | None = None
    log_tensorboard: bool = False
    threads: int | None = None
    save_rank_fingerprints: bool = False  # each process writes a hash of its weights (checks DDP consistency)


_STRING_KEYS = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("str", "str | None")}


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    import yaml

    d: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} is not key=value")
        key, value = ov.split("=", 1)
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        parsed = yaml.safe_load(value)
        # YAML 1.1 reads off/no/yes as booleans: keep the text for string options (cache_features=off)
        node[parts[-1]] = value if isinstance(parsed, bool) and parts[-1] in _STRING_KEYS else parsed
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(names)}")
    for k in _STRING_KEYS & set(d):
        if isinstance(d[k], bool):  # `cache_features: off` in a YAML file
            d[k] = {False: "off" if k == "cache_features" else "no", True: "on"}[d[k]]
    cfg = TrainConfig(**d)
    if cfg.train_parts not in ("decoder", "lora", "full"):
        raise ValueError(f"train_parts must be decoder, lora or full, got {cfg.train_parts!r}")
    if not cfg.data:
        raise ValueError("no training data: set `data` (a list of sources) in the config")
    return cfg


def resolve(p: str) -> str:
    """Paths in configs are relative to the working directory, else to the repository root."""
    return p if os.path.isabs(p) or os.path.exists(p) else str(REPO / p)


def build_source(src: dict[str, Any]):
    s = dict(src)
    s.pop("weight", None)
    name = s.pop("name", None)
    if "manifest" in s:
        return name, from_manifest(resolve(s.pop("manifest")), **s)
    if "folder" in s:
        return name, from_folder(resolve(s.pop("folder")), resolve(s.pop("masks")), **s)
    if "hf" in s:
        return name, from_hf(s.pop("hf"), **s)
    raise ValueError(f"data source {src} needs one of manifest / folder / hf")


def build_data(cfg: TrainConfig):
    parts, weights = {}, {}
    for i, src in enumerate(cfg.data):
        name, ds = build_source(src)
        key = name or f"source{i}"
        parts[key], weights[key] = ds, float(src.get("weight", 1.0))
    if cfg.val_data:
        train = PooledDataset(parts, weights)
        val = PooledDataset({f"val{i}": build_source(s)[1] for i, s in enumerate(cfg.val_data)})
        return train, val
    tr, va = {}, {}
    for k, ds in parts.items():
        tr[k], va[k] = train_val_split(ds, cfg.val_fraction, seed=cfg.seed)
    return PooledDataset(tr, weights), PooledDataset(va)


def make_model(cfg: TrainConfig):
    if os.path.isdir(resolve(cfg.model)) and os.path.isfile(os.path.join(resolve(cfg.model), "config.json")):
        model = vlseg.load(resolve(cfg.model))
    else:
        model = vlseg.create_model(cfg.model, pretrained=cfg.pretrained, **cfg.model_overrides)
    if cfg.train_parts == "lora":
        model.apply_lora(cfg.lora or {"r": 8, "image": True, "text": False})
    elif cfg.train_parts == "full":
        model.unfreeze("image")
        model.unfreeze("text")
    if cfg.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    return model


class Batcher:
    """Deterministic batches: step s draws its samples, prompts and augmentations from (seed, s) only, so an
    interrupted run resumes on exactly the batches it would have seen, and every process takes its own slice."""

    def __init__(self, ds: PooledDataset, cfg: TrainConfig, processor, rank: int, world: int):
        self.ds, self.cfg, self.proc, self.rank, self.world = ds, cfg, processor, rank, world
        w = np.asarray(ds.item_weights(), dtype=np.float64)
        self.p = w / w.sum()
        self.classes = sorted({r["class_name"] for r in ds.records})
        self.aug = cfg.augment

    def cache_compatible(self) -> bool:
        a = self.aug or {}
        return all(not a.get(k) for k in ("degrees", "translate", "scale", "brightness", "contrast", "saturation"))

    def __call__(self, step: int, device):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(self.ds), size=cfg.batch_size * self.world, p=self.p)
        idx = idx[self.rank * cfg.batch_size:(self.rank + 1) * cfg.batch_size]
        images, masks, prompts, keys = [], [], [], []
        for j, i in enumerate(idx):
            s = self.ds[int(i)]
            item_seed = int(rng.integers(2**31)) ^ j
            flips = (False, False)
            if self.aug:
                a = {"hflip": 0.0, "vflip": 0.0, "degrees": 0, "translate": 0, "scale": None, "brightness": 0,
                     "contrast": 0, "saturation": 0, **self.aug}
                s = PairedAugment(**a, seed=item_seed)(s)
                flips = s.meta.get("flipped", flips)
            present = set(s.meta.get("class_names") or [s.class_name])
            absent = [c for c in self.classes if c not in present]
            sampler = PromptSampler(tuple(cfg.prompt_levels), negative_rate=cfg.negative_rate,
                                    instance_rate=cfg.instance_rate, seed=item_seed)
            text, target, _ = sampler.sample(s.mask, s.class_name, absent=absent)
            images.append(s.image)
            masks.append(target)
            prompts.append([text])  # "" is the p0 level: the model must segment without text
            keys.append(f"{s.meta.get('image', i)}|{flips}")
        pv = self.proc(images, device=device)
        targets = self.proc.masks(masks, device=device).unsqueeze(1)  # (B, 1, S, S)
        return pv, targets, prompts, keys


def save_atomic(accelerator, model, optimizer, scheduler, state: dict, out: Path, name: str) -> None:
    """Write ``out/name`` via a temporary folder and a rename: a crash never leaves a broken checkpoint."""
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.unwrap_model(model).save_pretrained(str(tmp))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
               tmp / "trainer_state.pt")
    final = out / name
    old = out / f".{name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
            "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", np.asarray(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])


def plot_curves(log: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    tr = [r for r in rows if "loss" in r]
    ev = [r for r in rows if "val_dice" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr])
    ax[0].set_title("training loss")
    ax[0].set_xlabel("step")
    ax[1].plot([r["step"] for r in ev], [r["val_dice"] for r in ev], marker="o")
    ax[1].set_title("validation Dice")
    ax[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML TrainConfig")
    ap.add_argument("overrides", nargs="*", help="key=value")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    # Several processes on a machine without GPUs (`accelerate launch --multi_gpu --num_processes 2` there):
    # ask accelerate for MULTI_CPU (gloo); otherwise it would run each process alone.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=multi_cpu)
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        if (out / "last").exists() and not cfg.resume and not cfg.overwrite:
            raise ValueError(f"{out} already holds a run; pass resume={out}/last or overwrite=true")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        if cfg.overwrite and not cfg.resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    model = vlseg.load(cfg.resume) if cfg.resume else make_model(cfg)
    if cfg.resume and cfg.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    model.to(accelerator.device)
    train_ds, val_ds = build_data(cfg)
    batcher = Batcher(train_ds, cfg, model.processor, accelerator.process_index, accelerator.num_processes)
    cache = None
    if cfg.cache_features != "off":
        blockers = cache_blockers(model) + ([] if batcher.cache_compatible() else ["augmentation changes pixels"])
        if blockers and cfg.cache_features != "auto":
            raise ValueError(f"cache_features={cfg.cache_features} but " + "; ".join(blockers))
        if not blockers:
            cache = FeatureCache(model, max_bytes=int(cfg.cache_max_gb * 1024**3),
                                 directory=(out / "feature_cache") if cfg.cache_features == "disk" else None)
    accelerator.print(model.format_trainable_summary())
    accelerator.print(f"train samples {len(train_ds)}, val samples {len(val_ds)}, feature cache "
                      f"{'on' if cache else 'off'}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    loss_fn = SegmentationLoss(**cfg.loss)
    step, best = 0, -math.inf
    if cfg.resume:
        state = torch.load(Path(cfg.resume) / "trainer_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best = int(state["step"]), float(state["best"])
        set_rng_state(state["rng"])
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    core.train()

    log = out / "metrics.jsonl"
    tb = None
    if cfg.log_tensorboard and accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tensorboard"))
    last_step = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, cfg.stop_after)
    bar = tqdm(total=last_step, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    t0 = time.time()
    while step < last_step:
        for micro in range(cfg.grad_accum):
            pv, targets, prompts, keys = batcher(step * cfg.grad_accum + micro, accelerator.device)
            with accelerator.accumulate(model), accelerator.autocast():
                feats = cache.encode(core, pv, keys) if cache is not None else None
                out_ = model(pv, prompts, image_features=feats)
                loss, parts = loss_fn(out_.logits, targets, out_.presence)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip:
                    accelerator.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()  # accelerate skips it until the last micro-batch
                optimizer.zero_grad()
        scheduler.step()  # once per optimizer step (not prepared: the schedule counts steps, not processes)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if accelerator.is_main_process:
            rec = {"step": step, "loss": float(loss.detach()), **parts, "lr": scheduler.get_last_lr()[0],
                   "elapsed_s": round(time.time() - t0, 2)}
            if cache is not None:
                rec["cache_hits"], rec["cache_misses"] = cache.hits, cache.misses
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if tb:
                tb.add_scalar("train/loss", float(loss.detach()), step)
        if step % cfg.eval_every == 0 or step == last_step:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                summary, _ = evaluate_dataset(core, val_ds, cfg.eval_levels, cfg.eval_max_samples, cfg.seed)
                core.train()
                score = summary["all"][cfg.best_metric]
                score = -score if cfg.best_metric == "hd95" else score
                state = {"step": step, "best": max(best, score), "rng": rng_state()}
                if score > best:
                    best = score
                    save_atomic(accelerator, model, optimizer, scheduler, state, out, "best")
                save_atomic(accelerator, model, optimizer, scheduler, state, out, "last")
                with open(log, "a") as f:
                    f.write(json.dumps({"step": step, "val_dice": summary["all"]["dice"], "val": summary}) + "\n")
                if tb:
                    tb.add_scalar("val/dice", summary["all"]["dice"], step)
                bar.write(f"step {step}: val dice {summary['all']['dice']:.4f} (best {cfg.best_metric} "
                          f"{abs(best):.4f})")
            accelerator.wait_for_everyone()
    bar.close()
    if cfg.save_rank_fingerprints:
        import hashlib

        h = hashlib.sha256()
        for name, p in sorted(core.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        (out / f"weights_rank{accelerator.process_index}.sha256").write_text(h.hexdigest())
    if accelerator.is_main_process:
        plot_curves(log, out / "curves.png")
        final = {"step": step, "elapsed_s": round(time.time() - t0, 1)}
        (out / "final.json").write_text(json.dumps(final))
    accelerator.end_training()


def cli() -> int:
    """Run ``main``; bad configs, data or models end with one readable line and exit code 2."""
    from vlseg.data import DataError

    try:
        main()
    except (ValueError, KeyError, RuntimeError, FileNotFoundError, FileExistsError, DataError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
