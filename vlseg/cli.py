"""The ``vlseg`` command line: ``segment``, ``models``, ``info``, ``evaluate``, ``calibrate``, ``ask``. Each command
parses its arguments, calls the public API and writes or prints the result.

    vlseg segment scans/ --prompt "polyp" --model runs/x/best --out masks/
    accelerate launch -m vlseg.cli segment scans/ --prompt "polyp" --model runs/x/best --out masks/   # shards inputs
    vlseg evaluate --model runs/x/best --data ../shared/data/manifest_all.jsonl --split val --out runs/x/eval
    vlseg calibrate --model runs/x/best --data site.jsonl --split all --out runs/x/best-site
    vlseg ask frame.png --question "Is there any grasper?" --model runs/vqa/best --out answers/

Errors are one readable line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .io import InputItem
from .precision import PRECISIONS

PRECISION_CHOICES = list(PRECISIONS)


def outputs_for(item: InputItem, names: list[str], out: Path, video_format: str = "mp4") -> list[Path]:
    """Output files of one input: one per prompt (PNG, NIfTI for volumes, a mask video or PNG-sequence folder for
    videos) and, for images and videos, an overlay."""
    if item.kind == "image":
        return [out / f"{item.stem}__{n}.png" for n in names] + [out / f"{item.stem}__overlay.png"]
    if item.kind == "video":
        suffix = ".mp4" if video_format == "mp4" else ""
        return [out / f"{item.stem}__{n}{suffix}" for n in [*names, "overlay"]]
    return [out / f"{item.stem}__{n}.nii.gz" for n in names]


def _distributed() -> Any:
    """accelerate's PartialState when launched as several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def cmd_segment(args: argparse.Namespace) -> int:
    import vlseg
    from vlseg.naming import unique_slugs

    inputs = vlseg.io.find_inputs(args.inputs)
    names = unique_slugs(args.prompt, taken={"overlay"})  # "polyp", "Polyp", "polyp!" -> polyp, polyp_2, polyp_3
    out = Path(args.out)
    clashes = [p for it in inputs for p in outputs_for(it, names, out, args.video_format) if p.exists()]
    if clashes and not args.overwrite:  # refuse before any work: never overwrite user data unasked
        raise FileExistsError(f"{len(clashes)} output file(s) already exist, e.g. {clashes[0]}; pass --overwrite")
    state = _distributed()
    model = vlseg.load_or_create(args.model, args.pretrained)
    if args.device or state is not None:
        model.to(args.device or state.device)
    mine = inputs
    if state is not None:
        with state.split_between_processes(inputs) as part:
            mine = list(part)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(threshold=args.threshold, presence_threshold=args.presence_threshold, batch_size=args.batch_size,
              precision=args.precision, flip=_FLIP[args.flip])
    # Outputs are written to a hidden staging folder inside `out` and moved into `out` only when every input of this
    # process is done: a run that fails (a corrupt input, a full disk, Ctrl-C) leaves no partial or half-written files.
    stage = Path(tempfile.mkdtemp(prefix=".vlseg-partial-", dir=out))
    try:
        written = _segment_images(model, [i for i in mine if i.kind == "image"], args, names, stage, kw, state)
        for item in (i for i in mine if i.kind == "volume"):
            vm = vlseg.segment_volume(model, item.path, args.prompt, axis=args.axis, window=args.window, **kw)
            for k, target in enumerate(outputs_for(item, names, stage)):
                vm.save(k, target, overwrite=True)
                written += 1
        written += _segment_videos(model, [i for i in mine if i.kind == "video"], args, names, stage, kw)
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    total = written
    if state is not None:
        from accelerate.utils import gather_object

        total = sum(gather_object([written]))
    if state is None or state.is_main_process:
        print(json.dumps({"inputs": len(inputs), "files_written": total, "out": str(out),
                          "processes": 1 if state is None else state.num_processes}))
    return 0


def _segment_videos(model: Any, items: list[InputItem], args: argparse.Namespace, names: list[str], out: Path,
                    kw: dict[str, Any]) -> int:
    """Each video read frame by frame, its masks written as they come (objects tracked where the model can);
    -> files written."""
    import vlseg

    written = 0
    for item in items:
        written += len(vlseg.segment_video(model, item.path, args.prompt, out=out, out_format=args.video_format,
                                           names=names, stem=item.stem, smoothing=args.smoothing, **kw))
    return written


def _segment_images(model: Any, items: list[InputItem], args: argparse.Namespace, names: list[str], out: Path,
                    kw: dict[str, Any], state: Any) -> int:
    """Images in batches, decoded by background workers while the model runs; -> files written."""
    from tqdm.auto import tqdm

    import vlseg
    from vlseg.visualize import overlay_masks

    show = (state is None or state.is_local_main_process) and len(items) > 1
    written = 0
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> int:
        masks = vlseg.segment(model, [a for _, a in pending], args.prompt, **kw)
        n = 0
        for (i, arr), m in zip(pending, masks):
            targets = outputs_for(items[i], names, out)
            for mk, t in zip(m, targets):
                _write_png(t, mk.astype(np.uint8) * 255)
            _write_png(targets[-1], overlay_masks(arr, m))
            n += len(targets)
        pending.clear()
        return n

    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    for i, arr in tqdm(vlseg.io.iter_images([it.path for it in items], workers if len(items) > 2 else 0),
                       total=len(items), desc="segment", disable=not show):
        pending.append((i, arr))
        if len(pending) == args.batch_size:
            written += flush()
    if pending:
        written += flush()
    return written


def cmd_models(args: argparse.Namespace) -> int:
    import vlseg
    from vlseg.families import get_family

    for name in vlseg.list_models(args.pattern):
        c = vlseg.get_model_config(name)
        print(f"{name:24s} {c.family:9s} {get_family(c.family).describe(c)}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import vlseg
    from vlseg.checkpoint import checkpoint_folder, read_meta

    folder = checkpoint_folder(args.path)
    print(json.dumps(read_meta(folder), indent=2))
    print(vlseg.load(str(folder)).format_trainable_summary())
    return 0


def _split_dataset(args: argparse.Namespace) -> Any:
    """``--data`` read, then ``--split`` of it: the reproducible group split that finetune/train.py uses."""
    from vlseg.data import from_spec, train_val_split

    _, ds = from_spec(args.data)
    if args.split != "all":
        split_seed = args.seed if args.split_seed is None else args.split_seed
        train, val = train_val_split(ds, args.val_fraction, seed=split_seed)
        ds = val if args.split == "val" else train
    return ds


def cmd_evaluate(args: argparse.Namespace) -> int:
    import vlseg
    from vlseg.evaluation import evaluate, report_lines

    model = vlseg.load_or_create(args.model, args.pretrained)
    ds = _split_dataset(args)
    summary = evaluate(model, ds, args.out, levels=args.levels, max_samples=args.max_samples, seed=args.seed,
                       ablations=not args.no_ablations, language_use=not args.no_language_use,
                       language_use_images=args.language_use_images, overlays=args.overlays,
                       precision=args.precision)
    print("\n".join(report_lines(summary)))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Choose a checkpoint's presence threshold on labelled images and write a copy of the checkpoint carrying it
    (the source folder is never changed)."""
    import vlseg
    from vlseg.language_use import presence_calibration

    src, out = Path(args.model), Path(args.out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"--model {src}: not a vlseg checkpoint folder (no config.json)")
    if out.exists() and (out.resolve() == src.resolve() or not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists; give a new folder (the calibrated copy never replaces "
                              "a checkpoint or other files)")
    model = vlseg.load(src)
    if not model.config.presence:
        raise ValueError(f"{src} has no presence head: there is no presence threshold to calibrate")
    ds = _split_dataset(args)
    minimums = {k: v for k, v in (("min_specificity", args.min_specificity), ("min_sensitivity", args.min_sensitivity))
                if v is not None}  # unset: the library's defaults, the rule training uses
    cal = presence_calibration(model, ds, seed=args.seed, max_images=args.max_images, progress=True, **minimums)
    before = model.config.presence_threshold
    model.config.presence_threshold = float(cal["threshold"])
    model.save_pretrained(out, overwrite=False)
    (out / "calibration.json").write_text(json.dumps({"source": str(src), "data": args.data, "split": args.split,
                                                       "previous_threshold": before, **cal}, indent=2))
    auc = "n/a" if cal["auroc"] is None else f"{cal['auroc']:.3f}"
    print(f"presence threshold {'unset (0.5)' if before is None else f'{before:.4f}'} -> {cal['threshold']:.4f}: "
          f"true masks kept {cal['tpr']:.1%}, negatives emptied {cal['tnr']:.1%} ({cal['n_positive']} true, "
          f"{cal['n_negative']} absent or wrong-class prompts; presence AUROC {auc}); {cal['criterion']}")
    print(f"wrote {out}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer questions about one image; print the answers, write each grounding mask (and an overlay) to --out."""
    import vlseg
    from vlseg.vqa.inference import answer_masks_overlay

    image, _ = vlseg.read_image(args.image)
    stem = Path(args.image).name.split(".")[0] or "image"
    out = Path(args.out) if args.out else None
    targets = [out / f"{stem}__q{k + 1}.png" for k in range(len(args.question))] if out else []
    overlay = out / f"{stem}__answers_overlay.png" if out else None
    clashes = [p for p in targets + ([overlay] if overlay else []) if p.exists()]
    if clashes and not args.overwrite:  # refuse before any work
        raise FileExistsError(f"{len(clashes)} output file(s) already exist, e.g. {clashes[0]}; pass --overwrite")
    model = vlseg.load_or_create(args.model, args.pretrained)
    from vlseg.vqa.model import VQAModel

    if not isinstance(model, VQAModel):
        raise ValueError(f"{args.model} is a {model.config.family!r} model; vlseg ask needs a VQA model "
                         "(e.g. minilm-scratch-vqa or a checkpoint trained with task: vqa)")
    if args.device:
        model.to(args.device)
    results = vlseg.answer(model, image, list(args.question), top_k=args.top_k, candidates=args.candidate or None,
                           mode=args.mode, threshold=args.threshold, region_threshold=args.region_threshold)
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for k, r in enumerate(results):
        written = None
        if out and r["mask"] is not None:
            _write_png(targets[k], r["mask"].astype(np.uint8) * 255)
            written = str(targets[k])
        if args.json:
            print(json.dumps({"question": r["question"], "answer": r["answer"], "score": r["score"],
                              "top_k": r["top_k"], "region_score": r["region_score"], "box": r["box"],
                              "mask": written}))
        else:
            top = ", ".join(f"{a} {p:.2f}" for a, p in r["top_k"])
            where = "no region" if r["mask"] is None else (f"mask {written}" if written else
                                                           f"mask of {int(r['mask'].sum())} pixels")
            print(f"Q: {r['question']}\nA: {r['answer']} ({r['score']:.2f})   top: {top}   "
                  f"[region {r['region_score']:.2f}: {where}]")
    if overlay is not None and any(r["mask"] is not None for r in results):
        _write_png(overlay, answer_masks_overlay(image, results))
    return 0


_FLIP: dict[str, bool | str] = {"model": "model", "on": True, "off": False}


def _presence(text: str) -> float | None | str:
    if text in ("model", "none"):
        return None if text == "none" else text
    return float(text)


def _add_data_args(p: argparse.ArgumentParser, default_split: str, seed_also: str) -> None:
    """--data and the split options that ``_split_dataset`` reads."""
    p.add_argument("--data", required=True, help="manifest (.jsonl/.csv), HF dataset, or IMAGES:MASKS folders")
    p.add_argument("--split", choices=["all", "train", "val"], default=default_split,
                   help=f"the reproducible group split that finetune/train.py uses (default: {default_split})")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help=f"the split's seed (the run's `seed`) and {seed_also}")
    p.add_argument("--split-seed", type=int, default=None,
                   help="the split's seed when the run set `split_seed` (default: --seed)")


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
    s.add_argument("--presence-threshold", type=_presence, default="model",
                   help="'model' (the checkpoint's calibrated threshold), a number, or 'none'")
    s.add_argument("--flip", choices=list(_FLIP), default="model",
                   help="left-right mirror test-time augmentation: 'model' (the checkpoint's setting), on or off")
    s.add_argument("--device", default=None)
    s.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto: the fastest mode whose masks pass the fidelity bar on this machine (vlseg.precision)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--workers", type=int, default=None, help="image-decoding processes (default: cores - 1)")
    s.add_argument("--axis", type=int, default=2, help="slicing axis for volumes")
    s.add_argument("--window", default=None, help="CT window preset for volumes (abdomen, lung, bone, ...)")
    s.add_argument("--video-format", choices=["mp4", "png"], default="mp4",
                   help="videos: lossless mask videos (mp4) or PNG sequences, plus an overlay")
    s.add_argument("--smoothing", type=float, default=0.0,
                   help="videos, frame-by-frame models: temporal smoothing of probabilities in [0, 1)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_segment)
    m = sub.add_parser("models", help="list presets")
    m.add_argument("pattern", nargs="?", default="*")
    m.set_defaults(func=cmd_models)
    i = sub.add_parser("info", help="print a checkpoint's config and trainable summary")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)
    e = sub.add_parser("evaluate", help="metrics, language use and overlays of a model on a dataset")
    e.add_argument("--model", required=True, help="vlseg checkpoint folder, hf-hub:org/repo, or preset name")
    e.add_argument("--pretrained", default="true", help="for a preset: true, false, or a local upstream folder")
    _add_data_args(e, "all", "the report's picks")
    e.add_argument("--out", required=True)
    e.add_argument("--levels", nargs="+", default=["p1", "p6"], help="prompt levels (the first for ablations)")
    e.add_argument("--max-samples", type=int, default=None)
    e.add_argument("--no-ablations", action="store_true")
    e.add_argument("--no-language-use", action="store_true")
    e.add_argument("--language-use-images", type=int, default=200, help="images for the language-use report")
    e.add_argument("--overlays", type=int, default=4, help="worst and best cases saved as PNG")
    e.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                   help="fp32 (default): the model as trained; auto: what `segment --precision auto` runs here")
    e.set_defaults(func=cmd_evaluate)
    c = sub.add_parser("calibrate", help="choose a checkpoint's presence threshold on labelled images; writes a "
                       "calibrated copy")
    c.add_argument("--model", required=True, help="vlseg checkpoint folder (left unchanged)")
    _add_data_args(c, "val", "the wrong-class draw")
    c.add_argument("--out", required=True, help="new folder for the calibrated checkpoint (must not exist)")
    c.add_argument("--max-images", type=int, default=200)
    c.add_argument("--min-specificity", type=float, default=None,
                   help="share of absent / wrong-class prompts the gate must empty (default: training's, 0.95)")
    c.add_argument("--min-sensitivity", type=float, default=None,
                   help="below this share of true masks kept, use balanced accuracy (default: training's, 0.9)")
    c.set_defaults(func=cmd_calibrate)
    q = sub.add_parser("ask", help="answer questions about an image (a VQA model) and write the answer masks")
    q.add_argument("image", help="PNG/JPEG/TIFF/DICOM image")
    q.add_argument("--question", "-q", action="append", required=True, help="repeat for several questions")
    q.add_argument("--model", "-m", default="biomedclip-vqa", help="VQA preset, checkpoint folder or hf-hub:")
    q.add_argument("--pretrained", default="true", help="for presets: true, false or an upstream folder")
    q.add_argument("--out", "-o", default=None, help="folder for the answer masks (PNG) and an overlay")
    q.add_argument("--candidate", "-c", action="append", default=None,
                   help="restrict answers to these (repeat; scored by the open-vocabulary head)")
    q.add_argument("--mode", choices=["auto", "closed", "open"], default="auto", help="answer head")
    q.add_argument("--top-k", type=int, default=3)
    q.add_argument("--threshold", type=float, default=0.5, help="mask pixel threshold")
    q.add_argument("--region-threshold", type=_presence, default="model",
                   help="'refers to a region' cut-off: 'model', a number, or 'none' (always a mask)")
    q.add_argument("--device", default=None)
    q.add_argument("--json", action="store_true", help="print one JSON line per question")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_ask)
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
