"""Run state without pickles: optimizer, scheduler and RNG states saved as safetensors (tensors) + JSON (the rest),
checkpoints written atomically (a crash never leaves a broken ``last/``), and a metrics log that stays free of
duplicated steps after a resume."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Nested dicts/lists/tuples of tensors and JSON scalars -> a JSON skeleton; tensors go to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": _flatten(torch.from_numpy(np.ascontiguousarray(obj)), tensors)}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): keep their type
        return {"__items__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot save a {type(obj).__name__} in the training state")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return _unflatten(obj["__ndarray__"], tensors).numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__items__"]}
    return obj


def save_train_state(folder: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (optimizer/scheduler state dicts, RNG states, counters) as safetensors + JSON."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors)
    save_file(tensors, str(Path(folder) / STATE_TENSORS))
    (Path(folder) / STATE_JSON).write_text(json.dumps(skeleton), encoding="utf-8")


def load_train_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read what ``save_train_state`` wrote. Raises ValueError naming the folder when it is missing or broken."""
    from safetensors.torch import load_file

    f = Path(folder)
    if not (f / STATE_JSON).is_file() or not (f / STATE_TENSORS).is_file():
        raise ValueError(f"{f} holds no training state ({STATE_JSON} + {STATE_TENSORS}); resume from a run's "
                         "last/ folder")
    try:
        return _unflatten(json.loads((f / STATE_JSON).read_text(encoding="utf-8")), load_file(str(f / STATE_TENSORS)))
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{f}: unreadable training state: {e}") from e


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states."""
    py = random.getstate()
    npst: Any = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]], "numpy": [npst[0], npst[1], int(npst[2]), int(npst[3]),
                                                             float(npst[4])],
            "torch": torch.get_rng_state()}


def set_rng_state(s: dict[str, Any]) -> None:
    v, st, gauss = s["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system has no such call."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM):  # no kernel or filesystem support: rename instead
        return False
    raise OSError(err, os.strerror(err), str(b))


def recover_checkpoint(folder: str | os.PathLike[str]) -> Path:
    """``folder`` (e.g. ``runs/x/last``), restored from ``.last.old`` if a crash on a system without atomic exchange
    left only that (with a warning)."""
    import warnings

    final = Path(folder)
    old = final.parent / f".{final.name}.old"
    if not final.exists() and old.is_dir():
        warnings.warn(f"{final} was missing after an interrupted save; restored the previous {final.name}/ from "
                      f"{old.name}", stacklevel=2)
        os.replace(old, final)
    return final


def save_checkpoint_atomic(model: Any, out: str | os.PathLike[str], name: str, state: dict[str, Any]) -> Path:
    """Write ``out/name`` (a ``vlseg.load``-able checkpoint plus the training state) into a temporary folder and
    swap it in atomically, so ``out/name`` is always either the previous complete checkpoint or the new one
    (where the system cannot swap atomically, a crash between two renames is recovered by ``recover_checkpoint``)."""
    out = Path(out)
    tmp, old, final = out / f".{name}.tmp", out / f".{name}.old", out / name
    recover_checkpoint(final)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    save_train_state(tmp, state)
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous checkpoint
        return final
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, each with a ``step``. ``truncate(step)`` drops records after a
    step (called on resume, so steps replayed after a crash are not logged twice)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """The records; a torn last line (the process was killed while writing it) is dropped with a warning."""
        if not self.path.is_file():
            return []
        lines = [x for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]
        out = []
        for n, line in enumerate(lines, 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if n < len(lines):
                    raise ValueError(f"{self.path}:{n} is not a JSON record") from None
                import warnings

                warnings.warn(f"{self.path}: dropped a torn last line (the run was interrupted while logging)",
                              stacklevel=2)
        return out

    def truncate(self, step: int) -> None:
        keep = [r for r in self.records() if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, self.path)


def plot_curves(log: str | os.PathLike[str], out: str | os.PathLike[str], metric: str = "val_score") -> None:
    """Training loss and the validation score over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog(log).records()
    tr = [r for r in rows if "loss" in r]
    ev = [r for r in rows if metric in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr])
    ax[0].set_title("training loss")
    ax[0].set_xlabel("step")
    ax[1].plot([r["step"] for r in ev], [r[metric] for r in ev], marker="o")
    ax[1].set_title(f"validation {metric}")
    ax[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters and buffers (to check that data-parallel processes hold identical weights)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


__all__ = ["MetricsLog", "load_train_state", "plot_curves", "recover_checkpoint", "rng_state", "save_checkpoint_atomic",
           "save_train_state", "set_rng_state", "weights_digest"]
