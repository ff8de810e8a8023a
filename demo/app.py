"""vlseg demo: upload an image (PNG, JPEG, DICOM), type prompts, see one coloured mask per prompt.

    python demo/app.py [--model clipseg-rd64-refined | CHECKPOINT_DIR] [--host 127.0.0.1] [--port 7860] [--share]

Tabs: "Segment" now; a surgical VQA tab joins later. The demo holds no model code: it calls vlseg's public API.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

import vlseg
from vlseg.naming import unique_slugs
from vlseg.visualize import colour, overlay_masks

MAX_FILE_MB = 25
MAX_SIDE = 8192
EXAMPLE_PROMPTS = [
    ["polyp"],  # class name
    ["a small round pink polyp"],  # descriptive
    ["the polyp in the upper left"],  # position-based
    ["surgical instrument\ngrasper"],  # several prompts, one per line
]
_lock = threading.Lock()


def checkpoint_choices(folder: str | None) -> list[str]:
    """Preset names plus vlseg checkpoint folders found (one level deep) under ``folder``."""
    out = vlseg.list_models()
    if folder and os.path.isdir(folder):
        for cfg in sorted(Path(folder).glob("*/config.json")) + sorted(Path(folder).glob("config.json")):
            out.append(str(cfg.parent))
    return out


@lru_cache(maxsize=3)
def get_model(name: str, pretrained: str = "true"):
    """Load once, then reuse (cached per name)."""
    return vlseg.load_or_create(name, pretrained)


def load_model_or_explain(name: str, pretrained: str):
    import gradio as gr

    try:
        with _lock:
            return get_model(name.strip(), pretrained)
    except RuntimeError as e:
        raise gr.Error(f"Could not load weights for {name!r} (offline?). Point the model box at a local "
                       f"checkpoint folder (saved with save_pretrained), or start the demo with --model "
                       f"/path/to/checkpoint. Details: {str(e).splitlines()[0]}") from e
    except (ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise gr.Error(f"Could not load model {name!r}: {msg}") from e


def read_upload(path: str | None) -> np.ndarray:
    import gradio as gr

    if not path:
        raise gr.Error("Upload an image first (PNG, JPEG or DICOM).")
    size = os.path.getsize(path)
    if size > MAX_FILE_MB * 1024**2:
        raise gr.Error(f"The file is {size / 1024**2:.1f} MB; the limit is {MAX_FILE_MB} MB.")
    try:
        image, _ = vlseg.read_image(path)
    except ValueError as e:
        raise gr.Error(f"Could not read {Path(path).name}: {e}") from e
    if max(image.shape[:2]) > MAX_SIDE:
        raise gr.Error(f"The image is {image.shape[1]}x{image.shape[0]}; the limit is {MAX_SIDE} px a side.")
    return image


def segment_image(file: str | None, prompts_text: str, threshold: float, model_name: str,
                  pretrained: str = "true"):
    """-> (annotated image, presence table, overlay PNG path, masks ZIP path, legend HTML)."""
    import gradio as gr
    from PIL import Image

    prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]
    if not prompts:
        raise gr.Error("Type at least one prompt (one per line), e.g. 'polyp'.")
    image = read_upload(file)
    model = load_model_or_explain(model_name, pretrained)
    with _lock:  # one inference at a time per process; the queue orders users
        pred = vlseg.predict(model, image, prompts, threshold=float(threshold))
    out = Path(tempfile.mkdtemp(prefix="vlseg-demo-"))
    overlay = overlay_masks(image, pred.masks)
    Image.fromarray(overlay).save(out / "overlay.png")
    with zipfile.ZipFile(out / "masks.zip", "w") as z:
        for k, (name, m) in enumerate(zip(unique_slugs(prompts), pred.masks)):
            tmp = out / f"mask_{k}.png"
            Image.fromarray(m.astype(np.uint8) * 255).save(tmp)
            z.write(tmp, f"{k:02d}_{name}.png")
    kind = "presence" if pred.has_presence_head else "max probability"
    table = [[p, round(float(s), 3), int(m.sum()), kind] for p, s, m in zip(prompts, pred.presence, pred.masks)]
    legend = "".join(
        f'<span style="display:inline-block;margin-right:14px"><span style="display:inline-block;width:14px;'
        f'height:14px;background:rgb{colour(k)};margin-right:4px;vertical-align:middle"></span>{p}</span>'
        for k, p in enumerate(prompts))
    annotated = (image, [(m.astype(np.float32), p) for p, m in zip(prompts, pred.masks)])
    colours = {p: "#%02x%02x%02x" % colour(k) for k, p in enumerate(prompts)}
    return gr.AnnotatedImage(value=annotated, color_map=colours), table, str(out / "overlay.png"), str(out / "masks.zip"), f"<div id='legend'>{legend}</div>"


def build_demo(default_model: str, pretrained: str = "true", checkpoints: str | None = None):
    import gradio as gr

    with gr.Blocks(title="vlseg") as demo:
        gr.Markdown("# vlseg: text-prompted medical image segmentation\nUpload an image, type what to segment.")
        with gr.Row():
            model_box = gr.Dropdown(checkpoint_choices(checkpoints) + [default_model], value=default_model,
                                    allow_custom_value=True, label="Model (preset or checkpoint folder)")
            pre_box = gr.Textbox(value=pretrained, label="pretrained (presets: true / false / local folder)")
        with gr.Tabs():
            with gr.Tab("Segment", id="segment"):
                with gr.Row():
                    with gr.Column():
                        file = gr.File(label="Image (PNG, JPEG, TIFF, DICOM)", type="filepath",
                                       file_types=[".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"],
                                       elem_id="upload")
                        prompts = gr.Textbox(label="Prompts, one per line", lines=3, value="polyp",
                                             elem_id="prompts")
                        threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Threshold")
                        run = gr.Button("Segment", variant="primary", elem_id="run")
                        gr.Examples(EXAMPLE_PROMPTS, inputs=[prompts], label="Prompt examples")
                    with gr.Column():
                        annotated = gr.AnnotatedImage(label="Masks", elem_id="annotated")
                        legend = gr.HTML()
                        table = gr.Dataframe(headers=["prompt", "score", "pixels", "score kind"],
                                             label="Per-prompt presence", interactive=False)
                        overlay_file = gr.File(label="Overlay PNG")
                        masks_file = gr.File(label="Masks (ZIP of PNGs)")
                run.click(segment_image, inputs=[file, prompts, threshold, model_box, pre_box],
                          outputs=[annotated, table, overlay_file, masks_file, legend], api_name="segment")
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("VLSEG_MODEL", "clipseg-rd64-refined"))
    ap.add_argument("--pretrained", default="true", help="for presets: true, false, or a local upstream folder")
    ap.add_argument("--checkpoints", default=None, help="folder whose checkpoint subfolders are offered")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true")
    args = ap.parse_args(argv)
    build_demo(args.model, args.pretrained, args.checkpoints).launch(
        server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
