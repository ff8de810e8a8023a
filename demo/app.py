"""vlseg demo: upload an image (PNG, JPEG, DICOM), type prompts, see one coloured mask per prompt.

    python demo/app.py [--model clipseg-rd64-refined | CHECKPOINT_DIR] [--host 127.0.0.1] [--port 7860] [--share]

    python demo/app.py --model CHECKPOINT_DIR --vqa-model VQA_CHECKPOINT_DIR

Tabs: "Segment" (masks per prompt, drawn translucent with outlines so overlapping masks stay visible) and "Ask"
(surgical VQA: the answer with its top-k scores and the mask of what it refers to). The "pretrained" box shows only
while a preset (not a checkpoint folder) is chosen. The demo holds no model code: it calls vlseg's public API.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

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
EXAMPLE_QUESTIONS = [["Is there any grasper in the image?"], ["Where is the hook located in the image?"],
                     ["How many separate grasper regions can be seen?"],
                     ["Which is larger, the grasper or the hook?"]]
MASK_ALPHA = 0.45  # mask layers: translucent inside, opaque outline
_lock = threading.Lock()


def checkpoint_choices(folder: str | None) -> list[str]:
    """Preset names plus vlseg checkpoint folders found (one level deep) under ``folder``."""
    out = vlseg.list_models()
    if folder and os.path.isdir(folder):
        for cfg in sorted(Path(folder).glob("*/config.json")) + sorted(Path(folder).glob("config.json")):
            out.append(str(cfg.parent))
    return out


def is_preset(name: str | None) -> bool:
    """A preset name or preset JSON (which take ``pretrained``), not a checkpoint folder or ``hf-hub:`` id."""
    name = (name or "").strip()
    return name in vlseg.list_models() or (name.endswith(".json") and os.path.isfile(name))


def vqa_choices(folder: str | None) -> list[str]:
    """VQA presets (families whose task is "vqa") plus the checkpoint folders found under ``folder``."""
    from vlseg.families import get_family

    presets = [n for n in vlseg.list_models()
               if get_family(vlseg.get_model_config(n).family).capabilities.task == "vqa"]
    return presets + [c for c in checkpoint_choices(folder) if c not in vlseg.list_models()]


def mask_layer(mask: np.ndarray, alpha: float = MASK_ALPHA) -> np.ndarray:
    """(H, W) bool -> float32 opacity for an AnnotatedImage layer: ``alpha`` inside, 1 on the outline, so several
    masks over one image stay visible (an opaque layer would hide the ones under it)."""
    m = np.asarray(mask, bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    out = np.where(m, alpha, 0.0).astype(np.float32)
    out[m & ~inner] = 1.0
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
        pred = vlseg.predict(model, image, prompts, threshold=float(threshold), precision="auto")
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
    annotated = (image, [(mask_layer(m), p) for p, m in zip(prompts, pred.masks)])
    colours = {p: "#%02x%02x%02x" % colour(k) for k, p in enumerate(prompts)}
    return gr.AnnotatedImage(value=annotated, color_map=colours), table, str(out / "overlay.png"), str(out / "masks.zip"), f"<div id='legend'>{legend}</div>"


def ask_question(file: str | None, question: str, model_name: str, pretrained: str = "true", top_k: float = 5):
    """-> (annotated image with the answer's mask, top-k table, answer HTML)."""
    import html

    import gradio as gr

    question = (question or "").strip()
    if not question:
        raise gr.Error("Type a question, e.g. 'Is there any grasper in the image?'")
    image = read_upload(file)
    model = load_model_or_explain(model_name, pretrained)
    if getattr(model.family.capabilities, "task", "") != "vqa":
        raise gr.Error(f"{model_name!r} is a segmentation model; choose a VQA model (a '*-vqa' preset or a VQA "
                       "checkpoint) in the Ask tab")
    with _lock:
        r = vlseg.answer(model, image, question, top_k=int(top_k))
    table = [[a, round(float(p), 3)] for a, p in r["top_k"]]
    region = (f"refers to the region shown (region score {r['region_score']:.2f})" if r["mask"] is not None else
              f"refers to no region (region score {r['region_score']:.2f})")
    answer_html = (f"<div id='vqa-answer-text'><b>{html.escape(r['answer'])}</b> "
                   f"(score {r['score']:.2f}); {region}</div>")
    layers = [(mask_layer(r["mask"]), r["answer"])] if r["mask"] is not None else []
    hex_colour = "#{:02x}{:02x}{:02x}".format(*colour(0))
    annotated = gr.AnnotatedImage(value=(image, layers), color_map={r["answer"]: hex_colour})
    return annotated, table, answer_html


def model_picker(choices: list[str], default: str, pretrained: str, label: str, box_id: str | None,
                 pretrained_id: str) -> tuple[Any, Any]:
    """A model dropdown (presets and checkpoint folders, free text allowed) and its "pretrained" box, which shows
    only while a preset is chosen. Call inside a layout block (e.g. a Row)."""
    import gradio as gr

    box = gr.Dropdown(choices + [default], value=default, allow_custom_value=True, label=label, elem_id=box_id)
    pre = gr.Textbox(value=pretrained, label="pretrained (presets: true / false / local folder)",
                     visible=is_preset(default), elem_id=pretrained_id)
    box.change(lambda name: gr.update(visible=is_preset(name)), inputs=[box], outputs=[pre])
    return box, pre


def image_upload(elem_id: str) -> Any:
    import gradio as gr

    return gr.File(label="Image (PNG, JPEG, TIFF, DICOM)", type="filepath",
                   file_types=[".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"], elem_id=elem_id)


def build_demo(default_model: str, pretrained: str = "true", checkpoints: str | None = None,
               vqa_model: str | None = None):
    import gradio as gr

    with gr.Blocks(title="vlseg") as demo:
        gr.Markdown("# vlseg: text-prompted medical image segmentation\nUpload an image, type what to segment "
                    "(Segment), or ask a question about it (Ask).")
        with gr.Row():
            model_box, pre_box = model_picker(checkpoint_choices(checkpoints), default_model, pretrained,
                                              "Model (preset or checkpoint folder)", None, "pretrained")
        with gr.Tabs():
            with gr.Tab("Segment", id="segment"):
                with gr.Row():
                    with gr.Column():
                        file = image_upload("upload")
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
            with gr.Tab("Ask (VQA)", id="vqa"):
                vqa_default = vqa_model or "biomedclip-vqa"
                with gr.Row():
                    vqa_box, vqa_pre = model_picker(vqa_choices(checkpoints), vqa_default, pretrained,
                                                    "VQA model (preset or checkpoint folder)", "vqa-model",
                                                    "vqa-pretrained")
                with gr.Row():
                    with gr.Column():
                        vqa_file = image_upload("vqa-upload")
                        question = gr.Textbox(label="Question", lines=1, value="Is there any grasper in the image?",
                                              elem_id="vqa-question")
                        top_k = gr.Slider(1, 10, value=5, step=1, label="Answers to list")
                        ask = gr.Button("Ask", variant="primary", elem_id="ask")
                        gr.Examples(EXAMPLE_QUESTIONS, inputs=[question], label="Question examples")
                    with gr.Column():
                        answer_html = gr.HTML(elem_id="vqa-answer")
                        vqa_annotated = gr.AnnotatedImage(label="What the answer refers to", elem_id="vqa-annotated")
                        vqa_table = gr.Dataframe(headers=["answer", "score"], label="Top answers", interactive=False,
                                                 elem_id="vqa-topk")
                ask.click(ask_question, inputs=[vqa_file, question, vqa_box, vqa_pre, top_k],
                          outputs=[vqa_annotated, vqa_table, answer_html], api_name="ask")
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("VLSEG_MODEL", "clipseg-rd64-refined"))
    ap.add_argument("--pretrained", default="true", help="for presets: true, false, or a local upstream folder")
    ap.add_argument("--vqa-model", default=os.environ.get("VLSEG_VQA_MODEL", "biomedclip-vqa"),
                    help="VQA preset or checkpoint for the Ask tab")
    ap.add_argument("--checkpoints", default=None, help="folder whose checkpoint subfolders are offered")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true")
    args = ap.parse_args(argv)
    build_demo(args.model, args.pretrained, args.checkpoints, args.vqa_model).launch(
        server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
