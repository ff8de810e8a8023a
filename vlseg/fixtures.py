"""Model folders in upstream layouts with random weights, written offline (tests, benchmarks, examples).

Loading such a folder runs the same code path as the hub's weights (``from_pretrained`` on a local folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from .encoders.tokenizers import write_clip_tokenizer


def write_upstream_clipseg(folder: str | os.PathLike, tiny: bool = False, seed: int = 0) -> str:
    """A CLIPSeg folder in the ``CIDAS/clipseg-rd64-refined`` layout: config, safetensors, CLIP tokenizer, processor.

    The default is the real architecture (352 px, ViT-B/16, rd64, refined); ``tiny`` the same layout with a 64 px,
    6-block, 32-wide refined model (the layout ../shared/tools/make_upstream_clipseg.py --tiny writes; its tiny
    model has 4 blocks and no refined convolution). Weights are random (``seed``).
    Returns the folder as a string.
    """
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    folder = Path(folder)
    torch.manual_seed(seed)
    if tiny:
        layers = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
        config = CLIPSegConfig(text_config={**layers, "num_hidden_layers": 4},
                               vision_config={**layers, "num_hidden_layers": 6, "image_size": 64, "patch_size": 16},
                               projection_dim=32, reduce_dim=16, extract_layers=(1, 2, 3),
                               decoder_num_attention_heads=2, decoder_intermediate_size=64,
                               use_complex_transposed_convolution=True)
    else:
        config = CLIPSegConfig(vision_config={"patch_size": 16}, reduce_dim=64, use_complex_transposed_convolution=True)
    CLIPSegForImageSegmentation(config).eval().save_pretrained(folder)
    write_clip_tokenizer(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    size = 64 if tiny else 352
    img = ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=2, do_normalize=True,
                            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    CLIPSegProcessor(image_processor=img, tokenizer=tok).save_pretrained(folder)
    return str(folder)


__all__ = ["write_upstream_clipseg"]
