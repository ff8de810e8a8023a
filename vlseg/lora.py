"""LoRA on the frozen encoders through peft's functional API (STYLE P7). The whole model is never wrapped in a
PeftModel, so attribute paths (``model.decoder``) stay stable and checkpoints stay small."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .config import LoraSpec


_BLOCK = re.compile(r"(?:^|\.)(?:blocks|resblocks|layers|layer)\.(\d+)\.")


def select_targets(module: nn.Module, targets: tuple[str, ...], max_block: int | None) -> list[str]:
    """Full module names matching ``targets`` (exact or dotted suffix), skipping blocks deeper than ``max_block``
    (they never run when the decoder reads shallower layers, so adapters there would be dead weight)."""
    names = []
    for name, _ in module.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        m = _BLOCK.search(name)
        if max_block is not None and m is not None and int(m.group(1)) > max_block:
            continue
        names.append(name)
    return names


def inject_lora(module: nn.Module, targets: tuple[str, ...], spec: LoraSpec, where: str,
                max_block: int | None = None) -> int:
    """Add LoRA adapters to ``module``'s Linear/Conv/MHA layers named ``targets`` (in blocks up to ``max_block``);
    returns how many were wrapped."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not targets:
        raise ValueError(f"No LoRA target modules known for the {where} encoder; set lora.{where}_targets")
    names = select_targets(module, targets, max_block)
    if not names:
        raise ValueError(f"LoRA targets {list(targets)} match no module of the {where} encoder")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names)
    inject_adapter_in_model(config, module)
    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter in ``module`` into its base weight and remove the adapter; returns the count."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    tops: list[tuple[str, Any]] = []  # peft tuner layers (nn.Modules with merge / get_base_layer)
    for name, child in module.named_modules():
        # LoRA on nn.MultiheadAttention nests a LoRA out_proj inside; the outer layer merges both.
        if isinstance(child, BaseTunerLayer) and not any(name.startswith(t + ".") for t, _ in tops):
            tops.append((name, child))
    for name, child in tops:
        child.merge()
        base = child.get_base_layer()
        inner = getattr(base, "out_proj", None)
        if isinstance(inner, BaseTunerLayer):
            base.out_proj = inner.get_base_layer()
        _restore_parameters(base)
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(parent, name.rsplit(".", 1)[-1], base)
        merged += 1
    return merged


def _restore_parameters(module: nn.Module) -> None:
    """peft merges LoRA on nn.MultiheadAttention by replacing ``in_proj_weight`` / ``out_proj.weight`` with plain
    tensors, which then drop out of ``state_dict()`` (a merged model saved with its encoders would lose them): make
    them frozen parameters again."""
    import torch

    for m in module.modules():
        for attr, value in list(vars(m).items()):
            if (isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
                    and attr.endswith(("weight", "bias")) and attr not in m._buffers):
                delattr(m, attr)
                setattr(m, attr, nn.Parameter(value.detach(), requires_grad=False))


def has_lora(module: nn.Module) -> bool:
    """True if any LoRA adapter is injected in ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())
