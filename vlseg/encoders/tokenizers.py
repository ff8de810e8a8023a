"""Tokenizers available offline (used only to build random-weight architectures without hub files)."""

from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from torch import Tensor


class SimpleClipTokenizer:
    """CLIP's BPE from the vocabulary open_clip ships, called like a transformers tokenizer.

    Returns {"input_ids": (K, L), "attention_mask": (K, L)} cut to the longest prompt.
    """

    def __init__(self, max_length: int = 77):
        import open_clip

        self.tok = open_clip.SimpleTokenizer(context_length=max_length)

    def __call__(self, texts: list[str], **_: Any) -> dict[str, Tensor]:
        ids = self.tok(texts)
        mask = (ids != 0).long()
        n = int(mask.sum(1).max())
        return {"input_ids": ids[:, :n], "attention_mask": mask[:, :n]}


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` before any truncation (start/end tokens included), for the tokenizers vlseg uses:
    transformers tokenizers, open_clip's ``SimpleTokenizer`` / ``HFTokenizer`` and ``SimpleClipTokenizer``."""
    inner = getattr(tokenizer, "tok", None) or getattr(tokenizer, "tokenizer", None)
    if inner is not None and inner is not tokenizer:
        return count_tokens(inner, text)
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "convert_tokens_to_ids"):  # open_clip SimpleTokenizer
        return len(tokenizer.encode(text)) + 2
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "longer than the maximum" is what we are measuring
    try:
        return len(tokenizer(text)["input_ids"])
    finally:
        transformers.logging.set_verbosity(verbosity)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(out: str | os.PathLike) -> str:
    """Write transformers CLIPTokenizer files (vocab.json, merges.txt, tokenizer config) rebuilt from the BPE
    vocabulary open_clip ships: the same tokenizer as openai/clip-* and CIDAS/clipseg-*, offline."""
    from transformers import CLIPTokenizer

    bpe = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with bpe.open("rb") as f:
        merges = gzip.open(f).read().decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(folder)
    return str(folder)
