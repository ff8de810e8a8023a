"""Mixed precision for training, chosen per machine: ``mixed_precision: auto`` times a few training steps in fp32
and under bf16 autocast (only where bf16 is native: a CUDA device that supports it, or a CPU with AVX512-BF16 /
AMX) and keeps bf16 only if it is measurably faster. CPUs differ: bf16 autocast has been seen 3x faster on one
AVX512-BF16 CPU, slower on another, and 5x slower on an AVX2-only CPU.

``memory_format: auto`` then times the chosen precision's step with the model's convolution weights in
channels-last layout against the default one, and keeps channels-last only if it is measurably faster (oneDNN's
convolutions run faster in it on some CPUs, while GroupNorm's backward runs slower: only a measurement says which
wins for a given model and machine)."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from ..precision import machine_info

#: bf16 must beat fp32 by this factor to be chosen (below it, timing noise could pick the wrong one)
MIN_SPEEDUP = 1.15


#: channels-last must beat the default layout by this factor (median of paired rounds) to be chosen. The probe reads
#: below the training loop's gain (on the main job, 1.03-1.06x measured where the loop ran 6% faster); at a 1.03x bar
#: one run in six read 1.028x, kept the default layout and ran its loop in 603 s instead of ~527 s
MIN_LAYOUT_SPEEDUP = 1.02


def _step_seconds(model: Any, task: Any, batch: Any, bf16: bool, device: torch.device) -> float:
    """Seconds of one forward + backward of ``task.loss`` (fp32, or under bf16 autocast)."""
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = task.loss(model, batch, None)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def choose_mixed_precision(model: Any, task: Any, batch: Any, device: torch.device | str,
                           repeats: int = 3) -> tuple[str, dict[str, Any]]:
    """-> ("bf16" or "no", a report with the machine, the timings and the reason).

    Times forward + backward of ``task.loss`` on a copy of ``model`` (its weights and the caller's RNG untouched):
    one warm-up step each, then ``repeats`` rounds of one fp32 and one bf16 step, keeping each one's fastest. Taking
    turns matters: timed one after the other, a burst of other work on the machine during one side's steps once
    made bf16 look 1.04x (not the 2.6x it is there) and sent a whole run to fp32, 50% slower.
    """
    device = torch.device(device)
    info = machine_info(device)
    native = info.cuda_bf16 if device.type == "cuda" else info.cpu_bf16
    report: dict[str, Any] = {"machine": info.describe(device), "bf16_native": native}
    if not native:
        report["reason"] = "bf16 is not native on this device"
        return "no", report
    probe = copy.deepcopy(model).to(device)
    probe.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(repeats + 1):  # round 0 warms up
            for flag in (False, True):
                t = _step_seconds(probe, task, batch, flag, device)
                if r:
                    times[flag].append(t)
        fp32, bf16 = min(times[False]), min(times[True])
    del probe
    report.update(fp32_step_s=round(fp32, 4), bf16_step_s=round(bf16, 4), speedup=round(fp32 / bf16, 3))
    choice = "bf16" if fp32 / bf16 >= MIN_SPEEDUP else "no"
    report["reason"] = (f"bf16 autocast measured {fp32 / bf16:.2f}x the fp32 step speed "
                        f"({'>=' if choice == 'bf16' else '<'} {MIN_SPEEDUP}x needed)")
    return choice, report


def has_convolutions(model: torch.nn.Module) -> bool:
    """Whether any trainable or frozen 2-D convolution is in ``model`` (the only layers a memory format changes)."""
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def choose_memory_format(model: Any, task: Any, batches: Any, device: torch.device | str, bf16: bool,
                         repeats: int = 5) -> tuple[str, dict[str, Any]]:
    """-> ("channels_last" or "contiguous", a report with the timings and the reason).

    Times forward + backward of ``task.loss`` (under bf16 autocast if ``bf16``) on two copies of ``model``, one with
    its 4-D weights in channels-last layout (``model`` itself, its layout and the caller's RNG are untouched): a
    warm-up round, then ``repeats`` rounds, each timing both copies on the same batch (``batches``: one batch or a
    list, taken in turn), in alternating order. The speed-up is the median of the rounds' ratios: step times move
    by +-5% from batch to batch, more than the layout's effect here (~6%), so each round compares like with like,
    and a median is not fooled by one slow step. A model without 2-D convolutions keeps the default layout.
    """
    device = torch.device(device)
    if not has_convolutions(model):
        return "contiguous", {"reason": "the model has no 2-D convolutions"}
    batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
    probes = {}
    for fmt in ("contiguous", "channels_last"):
        probe = copy.deepcopy(model).to(device)
        if fmt == "channels_last":
            probe.to(memory_format=torch.channels_last)
        probe.train()
        probes[fmt] = probe
    rounds: list[dict[str, float]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for r in range(repeats + 1):  # round 0 warms up
            order = list(probes) if r % 2 else list(probes)[::-1]
            t = {fmt: _step_seconds(probes[fmt], task, batches[r % len(batches)], bf16, device) for fmt in order}
            if r:
                rounds.append(t)
    del probes
    speedup = statistics.median(t["contiguous"] / t["channels_last"] for t in rounds)
    choice = "channels_last" if speedup >= MIN_LAYOUT_SPEEDUP else "contiguous"
    return choice, {"contiguous_step_s": [round(t["contiguous"], 4) for t in rounds],
                    "channels_last_step_s": [round(t["channels_last"], 4) for t in rounds],
                    "speedup": round(speedup, 3),
                    "reason": f"channels-last measured {speedup:.2f}x the default layout's step speed (median of "
                              f"{len(rounds)} paired steps; {'>=' if choice == 'channels_last' else '<'} "
                              f"{MIN_LAYOUT_SPEEDUP}x needed)"}


__all__ = ["MIN_LAYOUT_SPEEDUP", "MIN_SPEEDUP", "choose_memory_format", "choose_mixed_precision", "has_convolutions"]
