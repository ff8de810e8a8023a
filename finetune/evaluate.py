"""Evaluate a checkpoint (or a preset, zero-shot) on a dataset: the same as ``vlseg evaluate``.

    python finetune/evaluate.py --model runs/x/best --data ../shared/data/manifest_all.jsonl --split val --out runs/x/eval

Writes ``OUT/metrics.json`` (overall, per dataset, per prompt level, the empty / wrong-class / shuffled prompt
ablations and the language-use report), ``OUT/per_image.csv`` and overlay PNGs of the worst and best cases.
"""

import sys

from vlseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
