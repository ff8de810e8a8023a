"""Tokenizers available offline (used only to build random-weight architectures without hub files)."""

from __future__ import annotations

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
