"""ONNX Runtime for frozen image encoders: export once per machine and model, run in onnxruntime.

Two precision modes build on it (``vlseg.precision``, CPU only, ``pip install 'vlseg[onnx]'``):

- ``onnx``: the image encoder exported as it is (fp32 maths, ONNX Runtime's kernels; on CPUs where torch's fp32
  GEMM is slow, e.g. MKL on AMD, this alone is ~2x) and the text encoder unchanged;
- ``onnx-int8``: the export quantised with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, dynamic
  int8 activations) and the text encoder in torch's dynamic int8.

Only the layers the decoder reads are exported (the encoder stops there), at the input size of the first call, with
a dynamic batch axis. Any other call (other layers, the pooled embedding, autograd, another device) runs the fp32
encoder. Exports are cached under ``$VLSEG_CACHE/onnx`` (default ``~/.cache/vlseg/onnx``) by model fingerprint,
layers, size, mode and library versions, written atomically. They are ONNX protobuf files written by vlseg itself,
never a pickle, and only read from that cache.

``export_image_encoder(model, path)`` writes the same export for deployment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import Tensor, nn

from .encoders.base import ImageEncoder
from .features import ImageEncoderInfo, ImageFeatures
from .sources import cache_root

logger = logging.getLogger(__name__)

ORT_MODES = ("onnx", "onnx-int8")
OPSET = 17


def available() -> bool:
    """Whether onnxruntime and onnx are installed (the ``onnx`` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def _require() -> None:
    if not available():
        raise ImportError("The onnx precision modes need onnxruntime and onnx: pip install 'vlseg[onnx]'")


def cache_dir() -> Path:
    """``$VLSEG_CACHE/onnx`` or ``~/.cache/vlseg/onnx``."""
    return cache_root() / "onnx"


class _Export(nn.Module):
    """pixel_values (B, 3, H, W) -> one (B, P + N, C) tensor per layer, then the encoder's fine maps (B, C_s, H/s,
    W/s) if it gives any (a CNN trunk): what is traced into the ONNX graph."""

    def __init__(self, encoder: nn.Module, layers: Sequence[int]):
        super().__init__()
        self.encoder = encoder
        self.layers = list(layers)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        f = self.encoder(pixel_values, self.layers)
        return (*f.tokens, *f.fine)


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "consider to run pre-processing" not in record.getMessage()


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".onnx")
    os.close(fd)
    return Path(tmp)


def export_encoder(encoder: nn.Module, layers: Sequence[int], size: tuple[int, int], path: str | os.PathLike[str],
                   int8: bool = False) -> Path:
    """Export ``encoder`` (an image encoder of the vlseg contract, fp32, on the CPU) to ONNX at ``path``.

    Args:
        encoder: the image encoder (LoRA already merged).
        layers: block indices whose tokens are the outputs, in order (then the encoder's fine maps, if any).
        size: (H, W) of the input; the batch axis is dynamic.
        path: the .onnx file to write (atomically).
        int8: quantise it (``quantize_dynamic``, int8 weights).
    Returns:
        the path written.
    """
    _require()
    path = Path(path)
    x = torch.zeros(1, 3, *size)
    info = cast(ImageEncoderInfo, encoder.info)
    n_fine = len(info.fine_strides)  # the fine maps its forward gives after the tokens
    names = [f"layer{i}" for i in layers] + [f"fine{j}" for j in range(n_fine)]
    tmp = _atomic_target(path)
    fp32 = tmp.with_name(tmp.stem + "-fp32.onnx") if int8 else tmp
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's inference fast path is one fused op ONNX has no symbol for; trace the plain path
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
            torch.onnx.export(_Export(encoder, layers).eval(), (x,), str(fp32), input_names=["pixel_values"],
                              output_names=names, opset_version=OPSET, dynamo=False,
                              dynamic_axes={"pixel_values": {0: "batch"}, **{n: {0: "batch"} for n in names}})
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            root = logging.getLogger()
            advice = _DropAdvice()
            root.addFilter(advice)  # quantize_dynamic logs generic advice at WARNING on the root logger
            try:
                quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
            finally:
                root.removeFilter(advice)
        os.replace(tmp, path)
    except Exception as e:  # a full disk surfaces as a protobuf decode error deep inside onnxruntime: say what to check
        import shutil

        where = path.parent if path.parent.exists() else Path.cwd()
        free, temp_free = shutil.disk_usage(where).free / 2**30, shutil.disk_usage(tempfile.gettempdir()).free / 2**30
        raise RuntimeError(
            f"ONNX{' int8' if int8 else ''} export of the image encoder to {path} failed ({type(e).__name__}: {e}). "
            f"Free space: {free:.1f} GiB in {where}, {temp_free:.1f} GiB in {tempfile.gettempdir()} (a ViT-B/16 "
            f"export needs about 1-2 GB while it is written). Nothing was cached; precision 'fp32' or 'int8' do not "
            f"need the export.") from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for p in {tmp, fp32}:
            p.unlink(missing_ok=True)
    return path


def export_image_encoder(model: Any, path: str | os.PathLike[str], size: int | tuple[int, int] | None = None,
                         int8: bool = False) -> Path:
    """Export ``model``'s image encoder, as far as its decoder reads it, to an ONNX file (for deployment).

    Args:
        model: a VLSegModel whose image encoder follows the vlseg contract (composed presets, CLIPSeg).
        path: the .onnx file to write.
        size: input side or (H, W); default the encoder's native size.
        int8: write the dynamically quantised graph instead.
    Returns:
        the path; inputs ``pixel_values`` (B, 3, H, W) normalised as ``model.processor`` does, outputs
        ``layer<i>`` (B, P + N, C) for each layer the decoder reads.
    """
    side = size if size is not None else model.image_encoder.info.image_size
    hw = (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))
    return export_encoder(_fp32_copy(model.image_encoder), list(model.decoder.layers), hw, path, int8=int8)


def _fp32_copy(encoder: Any) -> Any:
    from .precision import _encoder_copy

    return _encoder_copy(encoder, "fp32")  # LoRA merged in a copy; otherwise shares the tensors


class OrtImageEncoder(ImageEncoder):
    """An image encoder that runs ONNX Runtime for the calls inference makes and the fp32 encoder for the rest.

    Sessions are built lazily per input size (export cached on disk), under a lock; ``InferenceSession.run`` is
    safe to call from several threads.
    """

    def __init__(self, fallback: ImageEncoder, layers: Sequence[int], key: str, int8: bool):
        super().__init__()
        _require()
        self.fallback: ImageEncoder = _fp32_copy(fallback)
        self.info = self.fallback.info
        self.layers = list(layers)
        self.key = key
        self.int8 = int8
        self._sessions: dict[tuple[int, int], tuple[Any, int, tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self.stats = {"ort_calls": 0, "fallback_calls": 0, "exports": 0}

    def __getattr__(self, name: str) -> Any:  # backbone, ... as the fp32 encoder has them
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("fallback"), name)

    def _file(self, size: tuple[int, int]) -> Path:
        import onnxruntime

        layers = "-".join(map(str, self.layers))
        mode = "int8" if self.int8 else "fp32"
        tag = f"{self.key}-l{layers}-fine-{size[0]}x{size[1]}-{mode}-ort{onnxruntime.__version__}-torch{torch.__version__}"
        return cache_dir() / f"{tag.replace('+', '_')}.onnx"

    def _session(self, size: tuple[int, int]) -> tuple[Any, int, tuple[int, int]]:
        with self._lock:
            hit = self._sessions.get(size)
            if hit is not None:
                return hit
            import onnxruntime as ort

            path = self._file(size)
            if not path.is_file():
                logger.info("exporting the image encoder to ONNX (%s, once per machine and model): %s",
                            "int8" if self.int8 else "fp32", path)
                export_encoder(self.fallback, self.layers, size, path, int8=self.int8)
                self.stats["exports"] += 1
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            with torch.no_grad():  # the token layout (prefix tokens, grid) from one fp32 call
                probe = self.fallback(torch.zeros(1, 3, *size), self.layers)
            hit = (session, probe.num_prefix_tokens, probe.grid)
            self._sessions[size] = hit
            return hit

    def forward(self, pixel_values: Tensor, layers: Sequence[int], pooled: bool = False) -> ImageFeatures:
        """(B, 3, H, W) -> ImageFeatures, as the fp32 encoder gives them (see ``ImageEncoder.forward``)."""
        if (pooled or list(layers) != self.layers or pixel_values.device.type != "cpu"
                or (torch.is_grad_enabled() and pixel_values.requires_grad)):
            self.stats["fallback_calls"] += 1
            return self.fallback(pixel_values, layers, pooled)
        size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        session, prefix, grid = self._session(size)
        outs = session.run(None, {"pixel_values": pixel_values.detach().float().contiguous().numpy()})
        self.stats["ort_calls"] += 1
        maps = [torch.from_numpy(o) for o in outs]
        n = len(self.layers)
        return ImageFeatures(tokens=maps[:n], grid=grid, num_prefix_tokens=prefix, pooled=None, image_size=size,
                             fine=maps[n:])


__all__ = ["ORT_MODES", "OrtImageEncoder", "available", "cache_dir", "export_encoder", "export_image_encoder"]
