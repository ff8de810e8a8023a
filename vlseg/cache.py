"""Frozen-feature cache: image-encoder outputs computed once per image and reused across epochs.

Valid only while the image encoder cannot change: frozen, no LoRA on it, and inputs that are identical each time
(no augmentation, or only flips, which are part of the key). Bounded in memory (LRU by bytes), optionally backed
by safetensors files on disk. Entries live under a fingerprint of the encoder (config, input size, layers read,
a checksum of its weights), so any change to the encoder invalidates them.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .features import ImageFeatures
from .lora import has_lora
from .version import __version__


def cache_blockers(model: object) -> list[str]:
    """Why the image features of ``model`` cannot be cached (empty list: they can)."""
    reasons = []
    enc = model.image_encoder  # type: ignore[attr-defined]
    if any(p.requires_grad for p in enc.parameters()):
        reasons.append("the image encoder has trainable parameters")
    if has_lora(enc):
        reasons.append("the image encoder carries LoRA adapters")
    if getattr(model.decoder, "skip_strides", ()):  # type: ignore[attr-defined]
        reasons.append("the decoder reads the image encoder's fine maps (skip connections), which the cache does "
                       "not keep")
    return reasons


def fingerprint(model: object) -> str:
    """A short hash of everything that determines the image features."""
    m = model  # type: ignore[assignment]
    cfg = m.config.to_dict()  # type: ignore[attr-defined]
    ident = {k: cfg.get(k) for k in ("family", "image_encoder", "source", "revision", "arch", "pretrained",
                                     "image_size")}
    ident["processor"] = repr(m.processor)  # type: ignore[attr-defined]
    ident["layers"] = list(m.decoder.layers)  # type: ignore[attr-defined]
    ident["version"] = __version__
    h = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in m.image_encoder.state_dict().items():  # type: ignore[attr-defined]
            if p.is_floating_point():
                h.update(name.encode())
                h.update(f"{float(p.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """Args:
        model: the VLSegModel whose (frozen) image encoder is cached.
        max_bytes: memory budget (least recently used entries are dropped).
        directory: optional folder for a disk copy (one safetensors file per image).
    """

    def __init__(self, model: object, max_bytes: int = 2 * 1024**3, directory: str | Path | None = None):
        blockers = cache_blockers(model)
        if blockers:
            raise ValueError("Image features cannot be cached: " + "; ".join(blockers))
        self.fingerprint = fingerprint(model)
        self.max_bytes = int(max_bytes)
        self.mem: OrderedDict[str, tuple[list[Tensor], Tensor | None]] = OrderedDict()
        self.bytes = 0
        self.dir = Path(directory) / self.fingerprint if directory else None
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0
        self.meta: tuple[tuple[int, int], int, tuple[int, int]] | None = None  # grid, prefix, image size
        if self.dir and (self.dir / "meta.json").is_file():
            g, p, s = json.loads((self.dir / "meta.json").read_text())
            self.meta = (tuple(g), int(p), tuple(s))  # type: ignore[assignment]

    def _file(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / (hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    def _get(self, key: str) -> list[Tensor] | None:
        if key in self.mem:
            self.mem.move_to_end(key)
            return self.mem[key][0]
        if self.dir and self._file(key).is_file() and self.meta is not None:
            from safetensors.torch import load_file

            d = load_file(str(self._file(key)))
            tokens = [d[f"t{i}"] for i in range(len(d))]
            self._put(key, tokens, write=False)
            return tokens
        return None

    def _put(self, key: str, tokens: list[Tensor], write: bool = True) -> None:
        size = sum(t.numel() * t.element_size() for t in tokens)
        if size > self.max_bytes:
            return
        self.mem[key] = (tokens, None)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (old, _) = self.mem.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)
        if write and self.dir:
            from safetensors.torch import save_file

            save_file({f"t{i}": t.contiguous() for i, t in enumerate(tokens)}, str(self._file(key)))

    def encode(self, model: object, pixel_values: Tensor, keys: Sequence[str | None]) -> ImageFeatures:
        """Features of a batch, (B, 3, H, W) + one key per image (e.g. its path and flip state); a None key is an
        image that never repeats (a composite canvas): encoded, never stored."""
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} keys for {pixel_values.shape[0]} images")
        found: list[list[Tensor] | None] = [None if k is None else self._get(k) for k in keys]
        miss = [i for i, t in enumerate(found) if t is None]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        if miss:
            with torch.no_grad():
                f = model.encode_image(pixel_values[miss])  # type: ignore[attr-defined]
            self.meta = (tuple(f.grid), int(f.num_prefix_tokens), tuple(f.image_size))  # type: ignore[assignment]
            if self.dir and not (self.dir / "meta.json").is_file():
                (self.dir / "meta.json").write_text(json.dumps(self.meta))
            for j, i in enumerate(miss):
                toks = [t[j:j + 1].detach().clone() for t in f.tokens]
                found[i] = toks
                key = keys[i]
                if key is not None:
                    self._put(key, toks)
        assert self.meta is not None
        grid, prefix, size = self.meta
        layers = len(found[0])  # type: ignore[arg-type]
        tokens = [torch.cat([t[li] for t in found]).to(pixel_values.device)  # type: ignore[index]
                  for li in range(layers)]
        return ImageFeatures(tokens=tokens, grid=grid, num_prefix_tokens=prefix, image_size=size)
