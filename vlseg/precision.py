"""Precision modes, per machine: ``fp32``, ``bf16`` and ``int8`` copies of a model's encoders, and ``auto``, which
measures them once on this machine and keeps the fastest one whose masks stay faithful to fp32.

    from vlseg.precision import resolve, variant
    fast = variant(model, resolve(model, "auto"))   # a VLSegModel; use it wherever `model` is used
    masks = vlseg.segment(fast, "scan.png", ["polyp"])

Modes (all convert *copies* of the encoders' layers, sharing the tensors they leave alone; the fp32 model, its
weights and its checkpoints are never touched):

- ``fp32``: the model itself.
- ``bf16``: every Linear layer of both encoders holds bfloat16 weights and runs in bfloat16; its output returns to
  fp32, so the residual stream, LayerNorm, softmax/attention and the decoder stay fp32. Offered where bf16 is
  native (CPU: AMX-BF16 or AVX512-BF16; CUDA: ``torch.cuda.is_bf16_supported()``); elsewhere it is emulated and
  slower (4-5x on AVX2-only CPUs), so ``auto`` never considers it there.
- ``int8``: dynamic int8 quantisation of every Linear layer of both encoders (int8 weights per tensor, activations
  quantised per call; ``torch.ao.quantization.quantize_dynamic`` on the ``x86``/``fbgemm``/``onednn`` engine,
  which uses VNNI where the CPU has it). CPU only. The decoder stays fp32.
- In ``bf16`` and ``int8`` on a CPU where bf16 is native, the image encoder's attention (towers built on
  transformers; open_clip/timm attention stays fp32) also runs in bf16 (``_bf16_attention``): on a ViT-B/16 at
  352 px transformers' fp32 SDPA was over a third of the int8 encoder's time. It is part of the mode, so the
  fidelity bar and ``auto``'s timing measure it.
- ``onnx`` / ``onnx-int8`` (``vlseg.ort``; CPU, where onnxruntime is installed: the ``onnx`` extra): the image
  encoder exported to ONNX once per machine and model and run by ONNX Runtime, as is (fp32 maths) or dynamically
  quantised to int8 (then the text encoder is torch int8 too).

LoRA adapters are merged into the copies (same function, no adapter overhead). A copy is a snapshot: it is rebuilt
when the model's encoder weights change (training steps, ``load_state_dict``) or the model moves to another
device. Variants are for inference (no gradients flow through converted encoders).

The fidelity bar (``FidelityBar``): per (image, prompt) mask IoU against fp32, mean >= 0.98 and every pair
>= 0.95. ``calibrate`` times each available mode on this machine (median of interleaved repeats) and checks the
bar; the result is cached as JSON under ``$VLSEG_CACHE/precision/`` (default ``~/.cache/vlseg/precision/``), keyed
by CPU model + flags + torch version + device + a fingerprint of the model's weights, so it runs once.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import inspect
import json
import logging
import os
import statistics
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from . import ort
from .sources import cache_root

if TYPE_CHECKING:
    from .model import VLSegModel

logger = logging.getLogger(__name__)

MODES = ("fp32", "bf16", "int8", "onnx", "onnx-int8")  # onnx*: ONNX Runtime (vlseg.ort), CPU, the onnx extra
PRECISIONS = ("auto", *MODES)
#: /proc/cpuinfo flags that decide which modes are native (the rest are not recorded)
RELEVANT_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f",
                  "avx2", "fma", "asimd", "bf16", "i8mm", "sve")
#: a mode must be this much faster than fp32 (median ratio) for ``auto`` to pick it over fp32: below that the
#: difference is timing noise and fp32 is exact
MIN_SPEEDUP = 1.05
#: bump when what a mode computes changes (2: bf16 attention in bf16/int8 where bf16 is native), so calibrations
#: cached by an older vlseg are measured again instead of trusted
CACHE_FORMAT = 2


# ----------------------------------------------------------------------------- the machine
@dataclass(frozen=True)
class MachineInfo:
    """What decides which precision modes run fast here.

    Attributes:
        cpu_model: ``model name`` from /proc/cpuinfo (or ``platform.processor()``).
        flags: the relevant CPU flags present (a subset of ``RELEVANT_FLAGS``).
        cpu_capability: ``torch.backends.cpu.get_cpu_capability()`` (the vector ISA torch's kernels use).
        threads: ``torch.get_num_threads()``.
        torch_version: ``torch.__version__``.
        quantized_engines: ``torch.backends.quantized.supported_engines`` (int8 kernels torch ships here).
        cuda_name, cuda_capability, cuda_bf16: the current CUDA device, or None / False without one.
    """

    cpu_model: str
    flags: frozenset[str]
    cpu_capability: str
    threads: int
    torch_version: str
    quantized_engines: tuple[str, ...] = ()
    cuda_name: str | None = None
    cuda_capability: tuple[int, int] | None = None
    cuda_bf16: bool = False

    @property
    def cpu_bf16(self) -> bool:
        """bf16 matrix multiplies run natively (AMX-BF16 tiles or AVX512-BF16 dot products; Arm BF16)."""
        return bool({"amx_bf16", "avx512_bf16", "bf16"} & self.flags)

    @property
    def cpu_int8(self) -> bool:
        """torch ships dynamic-int8 kernels usable on this CPU (fbgemm / onednn need AVX2 at least on x86)."""
        engines = set(self.quantized_engines) - {"none", "qnnpack"}
        if "asimd" in self.flags:  # Arm: qnnpack
            return "qnnpack" in self.quantized_engines
        return bool(engines) and bool({"avx2", "avx512f"} & self.flags)

    def describe(self, device: str | torch.device = "cpu") -> str:
        """One line for benchmark headers and logs."""
        if torch.device(device).type == "cuda" and self.cuda_name:
            cap = ".".join(map(str, self.cuda_capability or ()))
            return f"{self.cuda_name} (sm {cap}, bf16 {'yes' if self.cuda_bf16 else 'no'}), torch {self.torch_version}"
        flags = " ".join(f for f in RELEVANT_FLAGS if f in self.flags) or "none"
        return (f"{self.cpu_model} [{flags}; torch ISA {self.cpu_capability}], {self.threads} threads, "
                f"torch {self.torch_version}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = sorted(self.flags)
        return d


def _cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    import platform

    model = platform.processor() or platform.machine()
    flags: frozenset[str] = frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags & frozenset(RELEVANT_FLAGS)


@lru_cache(maxsize=1)
def _static_info() -> tuple[str, frozenset[str], str, tuple[str, ...]]:
    model, flags = _cpu_model_and_flags()
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # very old / exotic builds
        capability = "unknown"
    return model, flags, capability, tuple(torch.backends.quantized.supported_engines)


def machine_info(device: str | torch.device | None = None) -> MachineInfo:
    """Describe this machine (CPU model and flags, torch's CPU ISA, threads; the CUDA device when ``device`` is a
    CUDA device, or the current one when ``device`` is None and CUDA is available)."""
    cpu_model, flags, capability, engines = _static_info()
    dev = torch.device(device) if device is not None else None
    cuda_name = cuda_cap = None
    cuda_bf16 = False
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        index = dev.index if dev is not None and dev.index is not None else torch.cuda.current_device()
        cuda_name = torch.cuda.get_device_name(index)
        cuda_cap = tuple(torch.cuda.get_device_capability(index))
        with torch.cuda.device(index):
            cuda_bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False)) \
                if "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters \
                else bool(torch.cuda.is_bf16_supported())
    return MachineInfo(cpu_model=cpu_model, flags=flags, cpu_capability=capability, threads=torch.get_num_threads(),
                       torch_version=torch.__version__, quantized_engines=engines, cuda_name=cuda_name,
                       cuda_capability=cuda_cap, cuda_bf16=cuda_bf16)  # type: ignore[arg-type]


def available_modes(device: str | torch.device = "cpu", info: MachineInfo | None = None) -> list[str]:
    """Modes that run natively (fast) on ``device``: fp32 always; bf16 where bf16 is native; int8 on CPUs with
    torch's dynamic-int8 kernels."""
    dev = torch.device(device)
    info = info or machine_info(dev)
    modes = ["fp32"]
    if dev.type == "cuda":
        if info.cuda_bf16:
            modes.append("bf16")
    elif dev.type == "cpu":
        if info.cpu_bf16:
            modes.append("bf16")
        if info.cpu_int8:
            modes.append("int8")
        if ort.available():
            modes += ["onnx", "onnx-int8"] if info.cpu_int8 else ["onnx"]
    return modes


def runnable_modes(device: str | torch.device = "cpu") -> list[str]:
    """Modes that run at all on ``device`` (bf16 runs emulated where it is not native; int8 and the ONNX Runtime
    modes are CPU only, the latter where onnxruntime is installed)."""
    if torch.device(device).type != "cpu":
        return ["fp32", "bf16"]
    return ["fp32", "bf16", "int8", *(ort.ORT_MODES if ort.available() else ())]


# ----------------------------------------------------------------------------- converted encoder copies
class _Bf16(nn.Module):
    """Runs ``inner`` (already bf16) on bf16 copies of the floating-point inputs and returns fp32 outputs, so only
    the wrapped layer computes in bf16 and the residual stream stays fp32."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_cast(a, torch.bfloat16) for a in args)
        kwargs = {k: _cast(v, torch.bfloat16) for k, v in kwargs.items()}
        return _as_float(self.inner(*args, **kwargs))


def _cast(x: Any, dtype: torch.dtype) -> Any:
    return x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x


def _as_float(x: Any) -> Any:
    """Floating tensors in ``x`` (a tensor, a tuple/list, or a dataclass such as ImageFeatures) back to fp32."""
    import dataclasses

    if isinstance(x, Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    if isinstance(x, (list, tuple)):
        return type(x)(_as_float(v) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _as_float(getattr(x, f.name)) for f in dataclasses.fields(x)
                                         if f.init})
    return x


def _to_bf16(module: nn.Module) -> int:
    """Replace, in place, every Linear (and every nn.MultiheadAttention, whose fused in-projection is not a
    Linear) by a bf16 copy wrapped in ``_Bf16``. Returns how many were replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Linear, nn.MultiheadAttention)):
            # a copy of the layer: its tensors may be shared with the fp32 model, and .to() converts in place
            converted = copy.deepcopy(child).to(torch.bfloat16).requires_grad_(False)
            setattr(module, name, _Bf16(converted))
            n += 1
        else:
            n += _to_bf16(child)
    return n


def _to_int8(module: nn.Module) -> int:
    """Dynamic int8 quantisation of every Linear in ``module`` (in place). Returns how many were quantised."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao; its dynamic int8 Linear (fbgemm / onednn
        # kernels) is what torch still ships for CPUs, and torchao's eager int8 path is slower on CPU (see
        # benchmarks/README.md).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return sum("quantized" in type(m).__module__ and type(m).__name__ == "Linear" for m in module.modules())


BF16_ATTENTION = "vlseg_bf16"  # the name our attention function is registered under in transformers


def _bf16_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function (``AttentionInterface``) for converted image encoders where bf16 is native:
    scores, softmax and the weighted sum in bf16 (torch's CPU softmax accumulates in fp32), the rest of the
    encoder untouched.

    Measured on an AMD EPYC (Zen 5, AVX512-BF16) with 2 threads, ViT-B/16 at 352 px with int8 Linear layers: 17%
    less encoder time than transformers' fp32 SDPA (whose CPU flash kernel was 38% of that encoder's time), and no
    gain with the softmax kept in fp32 (the conversions cost what the bf16 matmuls save).

    Args:
        query, key, value: (B, H, N, D) fp32.
    Returns:
        ((B, N, H, D) fp32 attention output, None), as transformers' attention functions return. Masked or causal
        attention (text towers), and training, fall back to transformers' fp32 SDPA.
    """
    causal = kwargs.get("is_causal")
    if attention_mask is not None or (causal if causal is not None else getattr(module, "is_causal", False)) \
            or module.training:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = (query * scale).to(torch.bfloat16)
    weights = torch.softmax(torch.matmul(q, key.to(torch.bfloat16).transpose(-1, -2)), dim=-1)
    out = torch.matmul(weights, value.to(torch.bfloat16))
    return out.transpose(1, 2).float(), None


def _use_bf16_attention(module: nn.Module) -> int:
    """Point every transformers attention config inside ``module`` (a converted *copy*: its configs are its own)
    at ``_bf16_attention``. Returns how many configs were switched (0 for towers that are not transformers
    models: open_clip / timm attention stays as it is)."""
    configs = {id(c): c for m in module.modules()
               if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")}
    if not configs:
        return 0
    from transformers import AttentionInterface

    AttentionInterface.register(BF16_ATTENTION, _bf16_attention)
    for c in configs.values():
        c._attn_implementation = BF16_ATTENTION
    return len(configs)


class _QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), as transformers' QuickGELUActivation, with one (B, N, 4C) temporary fewer: the same
    numbers, less memory traffic in the MLP of CLIP-style towers."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x * 1.702).mul_(x)


def _lighter_activations(module: nn.Module) -> int:
    """Replace transformers' QuickGELUActivation modules in ``module`` (a copy) by ``_QuickGELU``."""
    n = 0
    for name, child in list(module.named_children()):
        if type(child).__name__ == "QuickGELUActivation":
            setattr(module, name, _QuickGELU())
            n += 1
        else:
            n += _lighter_activations(child)
    return n


_M = TypeVar("_M", bound=nn.Module)


def _encoder_copy(encoder: _M, mode: str, bf16_attention: bool = False) -> _M:
    """A converted copy of one encoder. The modules are copied; the tensors the mode does not convert (LayerNorm,
    embeddings, convolutions) are shared with the fp32 model rather than duplicated, and the converted layers get
    new tensors, so the copy costs only the converted weights and the fp32 model is never written to. With LoRA,
    everything is copied and the adapters are merged in the copy. The tokenizer is shared.

    ``bf16_attention`` (image encoders in bf16/int8 mode, where bf16 is native on the CPU): attention in bf16
    (``_bf16_attention``) and the lighter QuickGELU."""
    from .lora import has_lora, merge_lora

    memo: dict[int, Any] = {}
    tok = getattr(encoder, "tokenizer", None)
    if tok is not None:
        memo[id(tok)] = tok
    lora = has_lora(getattr(encoder, "backbone", encoder))
    if not lora:
        for t in (*encoder.parameters(), *encoder.buffers()):
            memo[id(t)] = t
    enc = copy.deepcopy(encoder, memo)
    enc.eval()
    if lora:  # merging writes into the weights: only on a full copy
        enc.requires_grad_(False)
        merge_lora(getattr(enc, "backbone", enc))
        _restore_parameters(enc)
    if mode == "bf16":
        _to_bf16(enc)
    elif mode == "int8":
        _to_int8(enc)
    if bf16_attention and mode in ("bf16", "int8"):
        _use_bf16_attention(enc)
        _lighter_activations(enc)
    return enc


def _restore_parameters(module: nn.Module) -> None:
    """peft's merge of LoRA on nn.MultiheadAttention leaves ``in_proj_weight`` and ``out_proj.weight`` plain tensor
    attributes; make them Parameters again so ``.to()`` converts them."""
    names = ("weight", "bias", "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    for m in module.modules():
        for name in names:
            value = m.__dict__.get(name)
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                del m.__dict__[name]
                m.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))


def _weights_signature(model: VLSegModel) -> tuple:
    """Changes when any encoder tensor is replaced or updated in place, or the model moves to another device."""
    sig: list[Any] = [str(model.device)]
    for enc in (model.image_encoder, model.text_encoder):
        for t in enc.parameters():
            sig.append((t.data_ptr(), t._version))
        for b in enc.buffers():
            sig.append((b.data_ptr(), b._version))
    return tuple(sig)


_VARIANTS: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple, VLSegModel]]] = weakref.WeakKeyDictionary()
_RESOLVED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


def _build_variant(model: VLSegModel, mode: str) -> VLSegModel:
    if mode in ort.ORT_MODES:
        image: Any = ort.OrtImageEncoder(model.image_encoder, model.decoder.layers, model_fingerprint(model),
                                               int8=mode == "onnx-int8")
        text = _encoder_copy(model.text_encoder, "int8" if mode == "onnx-int8" else "fp32")
    else:
        device = model.device
        native = machine_info(device).cpu_bf16 if device.type == "cpu" else False  # CUDA keeps its flash SDPA
        image = _encoder_copy(model.image_encoder, mode, bf16_attention=native)
        text = _encoder_copy(model.text_encoder, mode)
    cls = type(model)
    kwargs = {}
    if "family" in inspect.signature(cls.__init__).parameters:
        kwargs["family"] = model.family
    flags = [(p, p.requires_grad) for p in model.parameters()]
    v = cls(model.config, image, text, model.decoder, model.processor, **kwargs)
    for p, flag in flags:  # the constructor's freeze_encoders touched tensors shared with the fp32 model
        p.requires_grad_(flag)
    v.training = False  # not v.eval(): that would also switch the shared decoder of a model being trained
    setattr(v, "precision", mode)  # noqa: B010  (read by benchmarks and logs; not a Module attribute mypy knows)
    return v


def variant(model: VLSegModel, mode: str) -> VLSegModel:
    """The model in precision ``mode``: ``model`` itself for fp32, else a VLSegModel built once per (model, mode)
    and cached (weakly, so it goes when the model goes).

    The variant shares the decoder, processor and config with ``model`` and holds converted copies of the encoders
    (LoRA merged). It has its own prompt cache. It is rebuilt when the encoder weights change or the model moves to
    another device. Safe to call, and to use the result, from several threads. It is for inference: running it
    (``vlseg.segment``) puts the shared decoder in eval mode, as running the model does; call ``model.train()``
    to resume training.

    Args:
        model: a VLSegModel.
        mode: ``fp32``, ``bf16`` or ``int8`` (``resolve`` turns ``auto`` into one of these).
    Raises:
        ValueError: unknown mode, or a mode that cannot run on the model's device (int8 on CUDA).
    """
    if mode not in MODES:
        hint = " (call resolve(model, 'auto') first)" if mode == "auto" else ""
        raise ValueError(f"Unknown precision mode {mode!r}{hint}; choose one of {list(MODES)}")
    if mode == "fp32":
        return model
    device = model.device
    if mode not in runnable_modes(device):
        raise ValueError(f"Precision {mode!r} cannot run on {device.type}; choose one of {runnable_modes(device)}")
    sig = _weights_signature(model)
    with _LOCK:
        per_model = _VARIANTS.setdefault(model, {})
        hit = per_model.get(mode)
        if hit is not None and hit[0] == sig:
            return hit[1]
        v = _build_variant(model, mode)
        per_model[mode] = (sig, v)
        return v


def drop_variants(model: VLSegModel, keep: Sequence[str] = ()) -> None:
    """Free the cached variants of ``model`` except the modes in ``keep``."""
    with _LOCK:
        per_model = _VARIANTS.get(model, {})
        for mode in [m for m in per_model if m not in keep]:
            del per_model[mode]


# ----------------------------------------------------------------------------- fidelity
@dataclass(frozen=True)
class FidelityBar:
    """What a non-fp32 mode must keep: mean per-(image, prompt) mask IoU against fp32 >= ``mean_iou`` and every
    pair >= ``min_iou``. Use ``FidelityBar(mean_iou=0.95, min_iou=0.0)`` for random weights, whose many pixels
    near the threshold make IoU a noisy measure."""

    mean_iou: float = 0.98
    min_iou: float = 0.95


DEFAULT_BAR = FidelityBar()


@dataclass
class Fidelity:
    """How far a mode's output is from fp32 on a sample.

    Attributes:
        mode: the precision mode.
        mean_iou, min_iou: mask IoU against fp32 over the informative (image, prompt) pairs.
        mean_prob_diff, max_prob_diff: absolute probability differences over all pixels.
        pairs: how many (image, prompt) pairs were compared.
        threshold: the mask threshold.
        informative: pairs where fp32 or the mode gives a non-empty mask. Two empty masks agree trivially (a
            trained model's presence head empties its masks on images unlike its data), so they are left out of
            the IoUs, and a sample without any informative pair proves nothing: it does not pass.
    """

    mode: str
    mean_iou: float
    min_iou: float
    mean_prob_diff: float
    max_prob_diff: float
    pairs: int
    threshold: float = 0.5
    informative: int = -1  # -1: not counted (results written before the field existed)

    def passes(self, bar: FidelityBar = DEFAULT_BAR) -> bool:
        return self.informative != 0 and self.mean_iou >= bar.mean_iou and self.min_iou >= bar.min_iou

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def sample_images(n: int = 3, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Deterministic synthetic RGB images (smooth blobs on textured backgrounds) for calibration when no real
    images are given. Real images of your own domain make a stricter check: pass ``images=``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = rng.normal(0.35, 0.08, (size, size, 3))
        for _ in range(int(rng.integers(2, 5))):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img += blob * rng.uniform(0.2, 0.6, 3)
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


DEFAULT_PROMPTS = ("polyp", "liver", "skin lesion")


def _probs(model: VLSegModel, images: Sequence[Any], prompts: Sequence[str]) -> list[np.ndarray]:
    from .inference import segment

    return segment(model, list(images), list(prompts), return_probs=True, batch_size=1)


def fidelity(model: VLSegModel, mode: str, images: Sequence[Any] | None = None,
             prompts: Sequence[str] | None = None, threshold: float = 0.5,
             reference: list[np.ndarray] | None = None) -> Fidelity:
    """Compare ``variant(model, mode)`` with the fp32 model on ``images`` x ``prompts``.

    Args:
        model: the fp32 VLSegModel.
        mode: a precision mode.
        images: what ``vlseg.segment`` takes (paths, PIL, arrays); default ``sample_images()``.
        prompts: K strings; default ``DEFAULT_PROMPTS``.
        threshold: mask threshold.
        reference: the fp32 probabilities, if already computed (one (K, H, W) array per image).
    Returns:
        Fidelity (IoU per (image, prompt) pair and probability differences).
    """
    images = list(images) if images is not None else sample_images()
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    ref = reference if reference is not None else _probs(model, images, prompts)
    got = _probs(variant(model, mode), images, prompts)
    ious, diffs, maxd, pairs = [], [], 0.0, 0
    for r, g in zip(ref, got):
        for k in range(r.shape[0]):
            a, b = r[k] > threshold, g[k] > threshold
            pairs += 1
            if a.any() or b.any():
                ious.append(mask_iou(a, b))
        d = np.abs(r - g)
        diffs.append(float(d.mean()))
        maxd = max(maxd, float(d.max()))
    return Fidelity(mode=mode, mean_iou=float(np.mean(ious)) if ious else 1.0,
                    min_iou=float(np.min(ious)) if ious else 1.0, mean_prob_diff=float(np.mean(diffs)),
                    max_prob_diff=maxd, pairs=pairs, threshold=threshold, informative=len(ious))


# ----------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """The result of timing and checking every available mode on this machine for one model.

    Attributes:
        chosen: the fastest mode that passes the fidelity bar (fp32 when none is faster by ``MIN_SPEEDUP``).
        seconds: median seconds of one ``segment`` call (one image, one prompt, warm prompt cache) per mode.
        fidelity: per non-fp32 mode, ``Fidelity.to_dict()``.
        passed: per mode, whether it met the bar (fp32 always does).
        bar: the FidelityBar used.
        device, machine: where it was measured (``MachineInfo.describe()``).
        key: the cache key; created: ISO timestamp.
    """

    chosen: str
    seconds: dict[str, float]
    fidelity: dict[str, dict[str, Any]]
    passed: dict[str, bool]
    bar: dict[str, float]
    device: str
    machine: str
    key: str
    created: str = ""
    format: int = CACHE_FORMAT
    notes: list[str] = field(default_factory=list)

    def speedup(self, mode: str) -> float:
        return self.seconds["fp32"] / self.seconds[mode]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def cache_dir() -> Path:
    """``$VLSEG_CACHE/precision`` or ``~/.cache/vlseg/precision``."""
    return cache_root() / "precision"


def model_fingerprint(model: VLSegModel) -> str:
    """A short hash of the model's architecture and weights (names, shapes, dtypes and a strided sample of the
    values of every tensor), so a fine-tuned model is calibrated anew."""
    h = hashlib.sha1()
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else repr(model.config)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel() and t.is_floating_point():
                flat = t.detach().reshape(-1)
                h.update(flat[:: max(1, flat.numel() // 16)][:16].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def calibration_key(model: VLSegModel, device: str | torch.device, info: MachineInfo | None = None,
                    bar: FidelityBar = DEFAULT_BAR) -> str:
    dev = torch.device(device)
    info = info or machine_info(dev)
    parts = [info.cpu_model, ",".join(sorted(info.flags)), info.cpu_capability, str(info.threads),
             info.torch_version, dev.type, str(info.cuda_name if dev.type == "cuda" else ""),
             str(info.cuda_capability if dev.type == "cuda" else ""), model_fingerprint(model),
             f"{bar.mean_iou}/{bar.min_iou}", str(CACHE_FORMAT)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


def _timings(fns: dict[str, Any], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each fn, interleaved A B C A B C ... after one warm-up each."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


_CALIBRATING: dict[str, threading.Lock] = {}


def calibrate(model: VLSegModel, images: Sequence[Any] | None = None, prompts: Sequence[str] | None = None,
              device: str | torch.device | None = None, cache: bool = True, bar: FidelityBar = DEFAULT_BAR,
              repeats: int = 5, modes: Sequence[str] | None = None) -> Calibration:
    """Time every available mode on this machine and check it against the fidelity bar; pick the fastest that
    passes. Cached (JSON) per machine + torch version + device + model fingerprint: a second call reads the file.

    Args:
        model: the fp32 VLSegModel, on the device to calibrate for.
        images, prompts: the fidelity sample (default: ``sample_images()`` and ``DEFAULT_PROMPTS``); the first image
            and first prompt are also what is timed.
        device: where to measure; must be the model's device (default: it).
        cache: read and write the cache file.
        bar: the FidelityBar.
        repeats: timed repeats per mode (median).
        modes: modes to consider (default: ``available_modes(device)``).
    Returns:
        Calibration.
    """
    dev = model.device
    if device is not None and torch.device(device).type != dev.type:
        raise ValueError(f"The model is on {dev}, not {device}: move it first (model.to({str(device)!r}))")
    info = machine_info(dev)
    key = calibration_key(model, dev, info, bar)
    path = cache_dir() / f"{key}.json"
    with _LOCK:
        lock = _CALIBRATING.setdefault(key, threading.Lock())
    with lock:
        if cache and path.is_file():
            try:
                return Calibration.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError) as e:
                logger.warning("ignoring unreadable precision cache %s (%s)", path, e)
        candidates = [m for m in (modes or available_modes(dev, info)) if m in MODES]
        if "fp32" not in candidates:
            candidates.insert(0, "fp32")
        images = list(images) if images is not None else sample_images()
        prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
        logger.info("calibrating precision modes %s on %s (once; cached in %s)", candidates, info.describe(dev),
                    path)
        from .inference import segment

        reference = _probs(model, images, prompts)
        fid: dict[str, dict[str, Any]] = {}
        passed = {"fp32": True}
        notes = []
        runners = {"fp32": model}
        for mode in candidates[1:]:
            try:
                f = fidelity(model, mode, images, prompts, reference=reference)
            except Exception as e:  # noqa: BLE001  (a mode that fails to build or run here is never chosen)
                notes.append(f"{mode}: {type(e).__name__}: {e}")
                passed[mode] = False
                continue
            fid[mode] = f.to_dict()
            passed[mode] = f.passes(bar)
            if f.informative == 0:
                notes.append(f"{mode}: not verified: fp32 and {mode} give only empty masks on this sample")
            runners[mode] = variant(model, mode)
        verified = any(f["informative"] != 0 for f in fid.values())
        first, prompt = images[:1], [prompts[0]]
        seconds = _timings({m: (lambda r=r: segment(r, first[0], prompt)) for m, r in runners.items()}, repeats, dev)
        chosen = "fp32"
        for mode, s in sorted(seconds.items(), key=lambda kv: kv[1]):
            if passed.get(mode) and (mode == "fp32" or seconds["fp32"] / s >= MIN_SPEEDUP):
                chosen = mode
                break
        drop_variants(model, keep=[chosen])
        result = Calibration(chosen=chosen, seconds=seconds, fidelity=fid, passed=passed, bar=asdict(bar),
                             device=str(dev), machine=info.describe(dev), key=key, notes=notes,
                             created=dt.datetime.now().isoformat(timespec="seconds"))
        if cache and (verified or not fid):
            _write_json(path, result.to_dict())
        elif cache:
            logger.warning("precision='auto': the calibration images gave no masks to compare, so no faster mode "
                           "could be checked against fp32; using fp32 (not cached on disk: the next run tries its own images)")
        return result


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write (several processes may calibrate the same model at once)."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home is no reason to fail inference
        logger.warning("could not write the precision cache %s (%s)", path, e)


def resolve(model: VLSegModel, precision: str = "auto", device: str | torch.device | None = None,
            images: Sequence[Any] | None = None, prompts: Sequence[str] | None = None) -> str:
    """The mode ``precision`` means for ``model`` on ``device`` (default: the model's device).

    ``auto`` calibrates once per machine and model (cached; see ``calibrate``) and returns the fastest mode that
    passes the fidelity bar, or ``fp32``; it never raises (any failure logs a warning and gives ``fp32``).
    ``images`` / ``prompts`` are the calibration sample: ``segment``, ``predict``, the CLI and the demo pass the
    first images and the prompts they are asked to segment, so a trained model is checked on images like its own
    (on ``sample_images()``, synthetic, a trained model's masks are often all empty and prove nothing). An
    explicit mode is returned as asked when it can run on the device; a bf16 request where bf16 is not native
    warns that it will be slower.

    Raises:
        ValueError: an unknown precision, or a mode that cannot run on the device (int8 on CUDA).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    dev = torch.device(device) if device is not None else model.device
    if precision != "auto":
        if precision not in runnable_modes(dev):
            raise ValueError(f"Precision {precision!r} cannot run on {dev.type}; choose one of "
                             f"{['auto', *runnable_modes(dev)]}")
        if precision not in available_modes(dev):
            warnings.warn(f"{precision} is not native on this {dev.type} ({machine_info(dev).describe(dev)}): it "
                          "runs emulated and is likely slower than fp32", stacklevel=2)
        return precision
    # remembered per model until its weights change, so calling resolve before every segment() costs nothing
    sig = (str(dev), _weights_signature(model), tuple((p.data_ptr(), p._version) for p in model.decoder.parameters()))
    with _LOCK:
        memo = _RESOLVED.get(model)
    if memo is not None and memo[0] == sig:
        return memo[1]
    try:
        family_modes = getattr(getattr(model, "family", None), "precision_modes", None)
        modes = [m for m in available_modes(dev) if family_modes is None or m in family_modes]
        sample = list(images)[:3] if images else None
        words = [p for p in (prompts or []) if p.strip()][:3] or None
        chosen = "fp32" if modes == ["fp32"] else calibrate(model, images=sample, prompts=words, device=dev,
                                                            modes=modes).chosen
    except Exception as e:  # noqa: BLE001  (auto must never break inference)
        logger.warning("precision='auto' fell back to fp32: %s: %s", type(e).__name__, e)
        return "fp32"
    with _LOCK:
        _RESOLVED[model] = (sig, chosen)
    return chosen


__all__ = [
    "MODES",
    "PRECISIONS",
    "Calibration",
    "Fidelity",
    "FidelityBar",
    "MachineInfo",
    "available_modes",
    "cache_dir",
    "calibrate",
    "drop_variants",
    "fidelity",
    "machine_info",
    "mask_iou",
    "model_fingerprint",
    "resolve",
    "runnable_modes",
    "sample_images",
    "variant",
]
