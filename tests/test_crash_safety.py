"""Crash safety of fine-tuning: a run killed with SIGKILL (no chance to clean up) resumes from ``last/`` to the same
weights as a run that was never interrupted; ``last/`` is loadable whenever the process dies, also in the middle of
writing it; ``metrics.jsonl`` holds each step once after the resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_finetune import ROOT, TRAIN, base_args, losses, run, synthetic_manifest

import vlseg
from vlseg.training import MetricsLog, load_train_state, save_checkpoint_atomic
from vlseg.training import state as state_module

STEPS, EVERY = 8, 2
EXTRA = ["cache_features=off", f"eval_every={EVERY}"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", str(TRAIN), *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group: the kill reaches the trainer too


def kill_when(proc: subprocess.Popen, out: Path, timeout: float = 600) -> str:
    """SIGKILL the run's process group while it writes its second ``last/`` (when caught in the act), else once a
    step after the second checkpoint is logged. Returns which moment it was."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        if (out / "last").is_dir() and (out / ".last.tmp").exists():
            moment = "while writing last/"
            break
        log = out / "metrics.jsonl"
        if log.is_file() and any(r.get("step", 0) > 2 * EVERY and "loss" in r for r in metrics_safe(log)):
            moment = "between checkpoints"
            break
        time.sleep(0.005)
    else:
        pytest.fail("the run did not reach the kill point in time")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return moment


def metrics_safe(log: Path) -> list[dict]:
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


@pytest.fixture(scope="module")
def mf(tmp_path_factory):
    return synthetic_manifest(tmp_path_factory.mktemp("synth"))


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(mf, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(base_args(mf, a, STEPS, EXTRA))
    proc = launch(base_args(mf, b, STEPS, EXTRA))
    moment = kill_when(proc, b)
    assert not (b / "final.json").exists(), "killed after the run had finished"
    # last/ is a complete checkpoint with a readable, pickle-free training state
    resumed_from = load_train_state(b / "last")["step"]
    assert resumed_from % EVERY == 0 and 0 < resumed_from < STEPS, (moment, resumed_from)
    assert vlseg.load(b / "last") is not None
    logged = [r["step"] for r in metrics_safe(b / "metrics.jsonl") if "loss" in r]
    print(f"killed {moment}; last/ at step {resumed_from}; steps logged before the kill: {logged}")
    run(base_args(mf, b, STEPS, EXTRA + [f"resume={b}/last"]))
    # the same weights and losses as the run that was never interrupted
    wa, wb = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), (moment, k)
    assert np.allclose(losses(a), losses(b), atol=1e-6), moment
    # each step logged once, although steps after the checkpoint had been logged before the kill
    rows = metrics(b)
    train_steps = [r["step"] for r in rows if "loss" in r]
    val_steps = [r["step"] for r in rows if "val_score" in r]
    assert train_steps == list(range(1, STEPS + 1)), (moment, logged, train_steps)
    assert len(val_steps) == len(set(val_steps)) and val_steps[-1] == STEPS
    assert not list(b.glob(".last.*")) and not list(b.glob(".best.*")), "temporary checkpoint folders left behind"


_SAVER = """
import sys, torch, vlseg
from vlseg.training import save_checkpoint_atomic
torch.manual_seed(0)
m = vlseg.create_model("tiny-test", pretrained=False)
step = 0
while True:
    step += 1
    with torch.no_grad():
        next(m.decoder.parameters()).add_(1.0)
    save_checkpoint_atomic(m, sys.argv[1], "last", {"step": step})
    print(step, flush=True)
"""


@pytest.mark.slow
def test_last_is_loadable_whenever_the_writer_is_killed(tmp_path):
    """A process that rewrites last/ in a loop, SIGKILLed at different moments: last/ always loads, with a training
    state that matches its weights."""
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        for _ in range(2):  # at least two complete saves, then die at some point of a later one
            assert proc.stdout.readline(), "the saver died"
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=60)
        step = load_train_state(tmp_path / "last")["step"]
        m = vlseg.load(tmp_path / "last")
        first = next(m.decoder.parameters())
        torch.manual_seed(0)
        ref = next(vlseg.create_model("tiny-test", pretrained=False).decoder.parameters())
        assert torch.allclose(first, ref + step), f"weights of another step than the saved state ({step})"


def test_failed_save_keeps_the_previous_last(tmp_path, tiny, monkeypatch):
    save_checkpoint_atomic(tiny, tmp_path, "last", {"step": 1})

    def broken(folder, state):
        raise OSError("disk full")

    monkeypatch.setattr(state_module, "save_train_state", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomic(tiny, tmp_path, "last", {"step": 2})
    assert load_train_state(tmp_path / "last")["step"] == 1 and vlseg.load(tmp_path / "last") is not None
    monkeypatch.undo()
    save_checkpoint_atomic(tiny, tmp_path, "last", {"step": 3})
    assert load_train_state(tmp_path / "last")["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_crash_between_the_two_renames_keeps_a_loadable_last(tmp_path, tiny, monkeypatch):
    """last/ is swapped in atomically (renameat2 RENAME_EXCHANGE): no rename of last/ away happens, so a process
    dying at any point leaves a complete last/. (Without atomic exchange the fallback is recovered on the next save
    or resume: tests/test_training.py.)"""
    save_checkpoint_atomic(tiny, tmp_path, "last", {"step": 1})
    if not state_module._exchange(tmp_path / "last", tmp_path / "last"):
        pytest.skip("this system has no atomic folder exchange")
    real = os.replace

    def dying_replace(src, dst):  # any rename of last/ would be where a process could die
        if Path(dst) == tmp_path / "last" or Path(src) == tmp_path / "last":
            raise KeyboardInterrupt("killed between the renames")
        real(src, dst)

    monkeypatch.setattr(state_module.os, "replace", dying_replace)
    save_checkpoint_atomic(tiny, tmp_path, "last", {"step": 2})
    monkeypatch.undo()
    assert load_train_state(tmp_path / "last")["step"] == 2 and vlseg.load(tmp_path / "last") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_metrics_truncate_drops_steps_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for s in range(1, 6):
        log.write({"step": s, "loss": float(s)})
    log.write({"step": 4, "val_score": 0.5})
    log.truncate(3)
    assert [r["step"] for r in log.records()] == [1, 2, 3]


def test_metrics_truncate_survives_a_torn_last_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for s in range(1, 4):
        log.write({"step": s, "loss": float(s)})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        log.truncate(3)
    assert [r["step"] for r in log.records()] == [1, 2, 3]
