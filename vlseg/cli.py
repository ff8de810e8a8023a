"""The ``vlseg`` command line: ``segment``, ``models``, ``info``, ``evaluate``.

    vlseg segment scans/ --prompt "polyp" --model runs/x/best --out masks/
    accelerate launch -m vlseg.cli segment scans/ --prompt "polyp" --model runs/x/best --out masks/   # shards inputs

Errors are one readable line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm")


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text.strip()).strip("_").lower()
    return s[:60] or "prompt"


def collect_inputs(paths: list[str]) -> list[tuple[str, Path, str]]:
    """-> [(kind, path, output stem)] with kind in image | volume | series."""
    out: list[tuple[str, Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            dicoms = [f for f in files if f.suffix.lower() == ".dcm"]
            if dicoms and len(dicoms) == len([f for f in files if f.suffix.lower() in IMAGE_EXTS]) and len(dicoms) > 1:
                out.append(("series", p, p.name))
                continue
            found = False
            for f in files:
                rel = f.relative_to(p)
                if str(f).lower().endswith((".nii", ".nii.gz")):
                    out.append(("volume", f, "__".join(rel.parts).replace(".nii.gz", "").replace(".nii", "")))
                    found = True
                elif f.suffix.lower() in IMAGE_EXTS:
                    out.append(("image", f, "__".join(rel.with_suffix("").parts)))
                    found = True
            if not found:
                raise ValueError(f"no images, DICOM or NIfTI files in {p}")
        elif str(p).lower().endswith((".nii", ".nii.gz")):
            out.append(("volume", p, p.name.replace(".nii.gz", "").replace(".nii", "")))
        elif p.suffix.lower() in IMAGE_EXTS:
            out.append(("image", p, p.stem))
        else:
            raise ValueError(f"unsupported input {p} (images: {', '.join(IMAGE_EXTS)}, NIfTI .nii/.nii.gz)")
    return out


def outputs_for(kind: str, stem: str, prompts: list[str], out: Path) -> list[Path]:
    if kind == "image":
        return [out / f"{stem}__{slug(p)}.png" for p in prompts] + [out / f"{stem}__overlay.png"]
    return [out / f"{stem}__{slug(p)}.nii.gz" for p in prompts]


def load_model(name: str, pretrained: str, device: str | None) -> Any:
    import vlseg

    model = vlseg.load_or_create(name, pretrained)
    if device:
        model.to(device)
    return model


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    import vlseg
    from vlseg.data import clinical
    from vlseg.io import read_image
    from vlseg.visualize import overlay_masks

    prompts = args.prompt
    inputs = collect_inputs(args.inputs)
    out = Path(args.out)
    # refuse before any work if outputs exist (never overwrite user data without --overwrite)
    clashes = [p for kind, _, stem in inputs for p in outputs_for(kind, stem, prompts, out) if p.exists()]
    if clashes and not args.overwrite:
        raise FileExistsError(f"{len(clashes)} output file(s) already exist, e.g. {clashes[0]}; pass --overwrite")
    stems = [stem for _, _, stem in inputs]
    if len(set(stems)) != len(stems):
        raise ValueError("two inputs would write the same output names; give them different names")

    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
    device = args.device or (str(state.device) if state is not None else None)
    model = load_model(args.model, args.pretrained, device)
    mine = inputs
    if state is not None:
        with state.split_between_processes(inputs) as part:
            mine = list(part)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    main = state is None or state.is_main_process
    for kind, path, stem in tqdm(mine, desc="segment", disable=not main or len(mine) < 2):
        targets = outputs_for(kind, stem, prompts, out)
        if kind == "image":
            arr, _ = read_image(path)
            masks = vlseg.segment(model, arr, prompts, threshold=args.threshold, batch_size=args.batch_size)
            for m, t in zip(masks, targets):
                Image.fromarray(m.astype(np.uint8) * 255).save(t)
            Image.fromarray(overlay_masks(arr, masks)).save(targets[-1])
        else:
            if kind == "volume":
                vol = clinical.read_nifti(path)
                masks = vlseg.segment(model, str(path), prompts, threshold=args.threshold,
                                      batch_size=args.batch_size, volume_axis=args.axis, window=args.window)
            else:
                vol = clinical.read_dicom_series(path)
                vol.affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine  # DICOM LPS -> NIfTI RAS
                slices = clinical.volume_slices(vol, axis=2, win=args.window)
                masks = np.stack(vlseg.segment(model, slices, prompts, threshold=args.threshold,
                                               batch_size=args.batch_size), axis=-1)
            for m, t in zip(masks, targets):
                clinical.write_nifti(m, vol, t, overwrite=True)
        written += len(targets)
    total = written
    if state is not None:
        from accelerate.utils import gather_object

        total = sum(gather_object([written]))
    if main:
        print(json.dumps({"inputs": len(inputs), "files_written": total, "out": str(out),
                          "processes": 1 if state is None else state.num_processes}))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import vlseg

    for name in vlseg.list_models(args.pattern):
        c = vlseg.get_model_config(name)
        parts = (f"{c.image_encoder.type}:{c.image_encoder.name}", c.decoder.name) if c.family == "composed" \
            else (c.source, "upstream")
        print(f"{name:24s} {c.family:9s} {parts[0]}  decoder={parts[1]}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from vlseg.checkpoint import CONFIG_NAME, CheckpointError, resolve_source

    folder = resolve_source(args.path)
    cfg = folder / CONFIG_NAME
    if not cfg.is_file():
        raise CheckpointError(f"{folder} is not a vlseg checkpoint (no {CONFIG_NAME})")
    meta = json.loads(cfg.read_text())
    print(json.dumps(meta, indent=2))
    import vlseg

    model = vlseg.load(str(folder))
    print(model.format_trainable_summary())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "finetune" / "evaluate.py"
    if not script.is_file():
        raise FileNotFoundError("vlseg evaluate runs finetune/evaluate.py from a source checkout; it is not installed")
    return subprocess.call([sys.executable, str(script), *args.rest])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vlseg", description="Text-prompted medical image segmentation.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="write one mask per prompt (PNG, or NIfTI for volumes) and an overlay")
    s.add_argument("inputs", nargs="+", help="images, folders, DICOM files/series folders, NIfTI volumes")
    s.add_argument("--prompt", "-p", action="append", required=True, help="repeat for several prompts")
    s.add_argument("--model", "-m", default="clipseg-rd64-refined", help="preset, checkpoint folder or hf-hub:")
    s.add_argument("--pretrained", default="true", help="for presets: true, false or an upstream folder")
    s.add_argument("--out", "-o", required=True)
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--device", default=None)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--axis", type=int, default=2, help="slicing axis for NIfTI volumes")
    s.add_argument("--window", default=None, help="CT window preset for volumes (abdomen, lung, bone, ...)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_segment)
    m = sub.add_parser("models", help="list presets")
    m.add_argument("pattern", nargs="?", default="*")
    m.set_defaults(func=cmd_models)
    i = sub.add_parser("info", help="print a checkpoint's config and trainable summary")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)
    e = sub.add_parser("evaluate", help="run finetune/evaluate.py (source checkout)")
    e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_evaluate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, RuntimeError, OSError,
            ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {str(msg).splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
