"""What fine-tuning needs from the library (``finetune/train.py`` uses only this and the top-level API):

- ``TrainConfig`` / ``load_config``: the typed run configuration (YAML + ``key=value`` overrides).
- ``get_task(name)``: a task's datasets, deterministic batches, loss and evaluation (``segmentation``, ``vqa``).
- ``FeatureCache`` / ``cache_blockers``: frozen image features computed once per image.
- ``save_checkpoint_atomic``, ``load_train_state``, ``rng_state`` / ``set_rng_state``: exact resume without
  pickles; ``MetricsLog``, ``plot_curves``, ``weights_digest``.
- ``SegmentationLoss``: Dice + BCE (+ focal) + presence.
- ``choose_mixed_precision``: ``mixed_precision: auto``, bf16 only where it measures faster on this machine (by
  ``MIN_SPEEDUP``);
  ``choose_memory_format``: ``memory_format: auto``, channels-last convolution weights only where they measure faster.
"""

from ..cache import FeatureCache, cache_blockers
from ..losses import SegmentationLoss
from . import segmentation  # noqa: F401  (registers the segmentation task)
from .config import TrainConfig, load_config, parse_overrides
from .precision import MIN_SPEEDUP, choose_memory_format, choose_mixed_precision
from .state import (
    MetricsLog,
    load_train_state,
    plot_curves,
    recover_checkpoint,
    rng_state,
    save_checkpoint_atomic,
    save_train_state,
    set_rng_state,
    weights_digest,
)
from .tasks import TASKS, Batch, Evaluation, Task, get_task, prefetch, register_task

__all__ = [
    "MIN_SPEEDUP", "TASKS", "Batch", "Evaluation", "FeatureCache", "MetricsLog", "SegmentationLoss", "Task",
    "TrainConfig", "cache_blockers", "choose_memory_format", "choose_mixed_precision", "get_task", "load_config",
    "prefetch", "load_train_state", "parse_overrides", "plot_curves", "recover_checkpoint", "register_task",
    "rng_state", "save_checkpoint_atomic", "save_train_state", "set_rng_state", "weights_digest",
]
