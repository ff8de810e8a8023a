"""Training tasks by name. A task knows its data, its batches, its loss and its evaluation; ``finetune/train.py``
runs any of them with the same loop (accelerate, feature cache, resume, checkpoints). Segmentation is built in;
other tasks (``vqa``) register from their own modules, which model families import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..registry import Registry

if TYPE_CHECKING:
    from ..features import ImageFeatures
    from .config import TrainConfig


@dataclass
class Batch:
    """One training batch.

    Attributes:
        pixel_values: (B, 3, S, S) normalised images.
        keys: one identity per image (path + augmentation) for the frozen-feature cache; None for images that never
            repeat (composite canvases).
        inputs: task-specific inputs and targets (prompts and masks, questions and answers, ...).
    """

    pixel_values: torch.Tensor
    keys: list[str | None]
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """What an evaluation returns: ``score`` (higher is better; chooses ``best/``), a few ``headline`` numbers for
    the log, and the full ``summary`` (JSON-serialisable)."""

    score: float
    headline: dict[str, float]
    summary: dict[str, Any]


class Task:
    """Base class of training tasks (see the module docstring)."""

    name: str = ""

    def datasets(self, cfg: TrainConfig) -> tuple[Any, Any]:
        """-> (train, validation) datasets built from ``cfg.data``."""
        raise NotImplementedError

    def batcher(self, model: Any, train: Any, cfg: TrainConfig, rank: int, world: int) -> Any:
        """A callable ``(step, device) -> Batch``, deterministic in (seed, step) so resumed runs see the same
        batches, each process taking its own slice."""
        raise NotImplementedError

    def pixels_repeat(self, cfg: TrainConfig) -> bool:
        """Whether an image's pixel values repeat across epochs (no augmentation beyond flips, which are part of
        the cache key), so frozen image features may be cached."""
        a = cfg.augment or {}
        return all(not a.get(k) for k in ("degrees", "translate", "scale", "brightness", "contrast", "saturation"))

    def loss(self, model: Any, batch: Batch, image_features: ImageFeatures | None) -> tuple[torch.Tensor,
                                                                                         dict[str, float]]:
        """Forward ``model`` (possibly wrapped for data parallelism) on the batch -> (loss, parts to log)."""
        raise NotImplementedError

    def evaluate(self, model: Any, val: Any, cfg: TrainConfig) -> Evaluation:
        raise NotImplementedError

    def finish(self, model: Any, val: Any, cfg: TrainConfig) -> dict[str, Any]:
        """After training, on the best model: calibrate what needs the validation split (stored in the model's
        config) and return what to report. Default: nothing."""
        return {}


class _Steps(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, batcher: Any, start: int, stop: int):
        self.batcher, self.start, self.stop = batcher, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Batch:
        return self.batcher(self.start + i, "cpu")


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def prefetch(batcher: Any, start: int, stop: int, device: torch.device | str, workers: int = 1) -> Any:
    """Yield ``batcher(i)`` for i in [start, stop) on ``device``, built ``workers`` steps ahead in background
    processes (a DataLoader over step numbers). Batches depend on the step only, so they are the same as built in
    the loop; building them overlaps with the model's compute. ``workers=0`` builds them inline."""
    if workers <= 0:
        for i in range(start, stop):
            yield batcher(i, device)
        return
    loader = torch.utils.data.DataLoader(_Steps(batcher, start, stop), batch_size=None, num_workers=workers,
                                         prefetch_factor=2, worker_init_fn=_one_thread, persistent_workers=False)
    for b in loader:
        b.pixel_values = b.pixel_values.to(device)
        b.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.inputs.items()}
        yield b


TASKS: Registry[Task] = Registry("training task")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register one instance of a Task subclass under ``cls.name``."""
    TASKS.register(cls.name)(cls())
    return cls


def get_task(name: str) -> Task:
    from .. import families  # noqa: F401  (families register the tasks of their models)

    return TASKS.get(name)


__all__ = ["Batch", "Evaluation", "TASKS", "Task", "get_task", "prefetch", "register_task"]
