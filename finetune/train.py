"""Fine-tune a vlseg model: one readable accelerate loop using only vlseg's public API.

    accelerate launch finetune/train.py --config finetune/configs/offline-shared.yaml output_dir=runs/x max_steps=300

Runs on one GPU, many (DDP via accelerate), or the CPU (all its cores: accelerate's ``--cpu`` sets one thread per
process, which ``threads`` overrides; by default the cores are shared among the local processes). Options are
``vlseg.training.TrainConfig`` (YAML file plus ``key=value`` overrides; unknown keys and wrong types are errors).
Leaves ``output_dir/last/`` and ``output_dir/best/`` (``vlseg.load``-able), ``metrics.jsonl``, ``curves.png``,
``final.json``; ``resume=output_dir/last`` continues exactly where a run stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Threads that wait for work sleep instead of spinning: with batches built in a background process (and any other
# job on the machine) spinning OpenMP threads cost 2-4x per step on a 2-core CPU. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import vlseg  # noqa: E402
from vlseg import training as T  # noqa: E402


def setup_threads(cfg: T.TrainConfig, local_processes: int) -> int:
    """CPU threads for this process: ``cfg.threads``, else this machine's cores shared by the local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = cfg.threads or max(1, cores // max(1, local_processes))
    torch.set_num_threads(n)
    return n


def make_model(cfg: T.TrainConfig) -> vlseg.VLSegModel:
    if cfg.resume:
        return vlseg.load(T.recover_checkpoint(cfg.resume))
    model = vlseg.load_or_create(cfg.model, cfg.pretrained) if not cfg.model_overrides else \
        vlseg.create_model(cfg.model, pretrained=cfg.pretrained, **cfg.model_overrides)
    if cfg.train_parts == "lora":
        model.apply_lora(cfg.lora or {"r": 8, "image": True, "text": False})
    elif cfg.train_parts == "full":
        model.unfreeze("image")
        model.unfreeze("text")
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="YAML TrainConfig")
    ap.add_argument("overrides", nargs="*", help="key=value")
    args = ap.parse_args(argv)
    cfg = T.load_config(args.config, args.overrides)

    from accelerate import Accelerator, PartialState
    from accelerate.utils import broadcast_object_list, gather_object, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    # Several processes on a machine without GPUs (`accelerate launch --multi_gpu --num_processes 2` there):
    # ask accelerate for MULTI_CPU (gloo); otherwise it would run each process alone.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    state = PartialState(cpu=multi_cpu)
    threads = setup_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if state.device.type == "cpu" else None
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    log = T.MetricsLog(out / "metrics.jsonl")
    if state.is_main_process:
        if (out / "last").exists() and not cfg.resume and not cfg.overwrite:
            raise ValueError(f"{out} already holds a run; pass resume={out}/last or overwrite=true")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        if cfg.overwrite and not cfg.resume:
            log.path.unlink(missing_ok=True)
    state.wait_for_everyone()

    model = make_model(cfg)
    if cfg.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    model.to(state.device)
    task = T.get_task(cfg.task or model.family.capabilities.task)
    train_ds, val_ds = task.datasets(cfg)
    batcher = task.batcher(model, train_ds, cfg, state.process_index, state.num_processes)
    # batches for the speed measurements, built once on the main process: the layout's takes three, bf16's the first
    probes = 3 if cfg.memory_format == "auto" else 1 if cfg.mixed_precision == "auto" else 0
    probe_batches = [batcher(i, state.device) for i in range(probes)] if state.is_main_process else []
    precision, precision_report = cfg.mixed_precision, None
    if precision == "auto":  # measured here, on the main process, and the same choice for every process
        choice = [T.choose_mixed_precision(model, task, probe_batches[0], state.device)
                  if state.is_main_process else None]
        precision, precision_report = broadcast_object_list(choice)[0] if state.num_processes > 1 else choice[0]
    layout, layout_report = cfg.memory_format, None
    if layout == "auto":  # measured under the chosen precision, on the main process, the same for every process
        choice = [T.choose_memory_format(model, task, probe_batches, state.device, precision == "bf16")
                  if state.is_main_process else None]
        layout, layout_report = broadcast_object_list(choice)[0] if state.num_processes > 1 else choice[0]
    del probe_batches
    if layout == "channels_last":  # 4-D weights (and so the convolutions' activations) in NHWC; saved contiguous
        model.to(memory_format=torch.channels_last)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum, cpu=multi_cpu)
    cache = None
    if cfg.cache_features != "off":
        blockers = T.cache_blockers(model) + ([] if task.pixels_repeat(cfg) else ["augmentation changes pixels"])
        if blockers and cfg.cache_features != "auto":
            raise ValueError(f"cache_features={cfg.cache_features} but " + "; ".join(blockers))
        if not blockers:
            cache = T.FeatureCache(model, directory=(out / "feature_cache") if cfg.cache_features == "disk" else None)
    accelerator.print(model.format_trainable_summary())
    accelerator.print(f"task {task.name}: train samples {len(train_ds)}, val samples {len(val_ds)}, feature cache "
                      f"{'on' if cache else 'off'}, {threads or 'GPU'} CPU thread(s) per process, mixed precision "
                      f"{precision}" + (f" ({precision_report['reason']})" if precision_report else "") +
                      f", memory format {layout}" + (f" ({layout_report['reason']})" if layout_report else ""))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    step, best = 0, -math.inf
    if cfg.resume:
        state = T.load_train_state(cfg.resume)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best = int(state["step"]), float(state["best"])
        T.set_rng_state(state["rng"])
        if accelerator.is_main_process:
            log.truncate(step)  # steps after the checkpoint will be logged again
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    core.train()

    tb = None
    if cfg.log_tensorboard and accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tensorboard"))
    last_step = cfg.max_steps if cfg.stop_after is None else min(cfg.max_steps, cfg.stop_after)
    bar = tqdm(total=last_step, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    t0 = time.time()
    workers = cfg.data_workers if cfg.data_workers is not None else int((os.cpu_count() or 1) >= 2)
    batches = T.prefetch(batcher, step * cfg.grad_accum, last_step * cfg.grad_accum, accelerator.device, workers)
    while step < last_step:
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(model), accelerator.autocast():
                feats = cache.encode(core, batch.pixel_values, batch.keys) if cache is not None else None
                loss, parts = task.loss(model, batch, feats)
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
            log.write(rec)
            if tb:
                tb.add_scalar("train/loss", rec["loss"], step)
        if step % cfg.eval_every == 0 or step == last_step:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                ev = task.evaluate(core, val_ds, cfg)
                core.train()
                state = {"step": step, "best": max(best, ev.score), "rng": T.rng_state(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                if ev.score > best:
                    best = ev.score
                    T.save_checkpoint_atomic(core, out, "best", state)
                T.save_checkpoint_atomic(core, out, "last", state)
                log.write({"step": step, "val_score": ev.score, **{f"val_{k}": v for k, v in ev.headline.items()},
                           "val": ev.summary})
                if tb:
                    tb.add_scalar("val/score", ev.score, step)
                bar.write(f"step {step}: " + ", ".join(f"val {k} {v:.4f}" for k, v in ev.headline.items()) +
                          f" (best {cfg.best_metric} {abs(best):.4f})")
            accelerator.wait_for_everyone()
    bar.close()
    digests = gather_object([T.weights_digest(core)])  # every process must end with the same weights
    if accelerator.is_main_process:
        T.plot_curves(log.path, out / "curves.png")
        final = {"step": step, "elapsed_s": round(time.time() - t0, 1), "threads_per_process": threads,
                 "processes": accelerator.num_processes, "mixed_precision": precision,
                 "mixed_precision_choice": precision_report,
                 "memory_format": layout, "memory_format_choice": layout_report, "weights_sha256_per_process": digests}
        if step == cfg.max_steps and (out / "best").is_dir():  # calibrate on the validation split, keep it
            best_model = vlseg.load(out / "best", device=accelerator.device)
            report = task.finish(best_model, val_ds, cfg)
            if report:
                best_model.save_pretrained(str(out / "best"))
                final["finish"] = report
        (out / "final.json").write_text(json.dumps(final, indent=2))
    accelerator.end_training()


def cli() -> int:
    """Run ``main``; bad configs, data or models end with one readable line and exit code 2."""
    try:
        main()
    except (ValueError, KeyError, RuntimeError, FileNotFoundError, FileExistsError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
