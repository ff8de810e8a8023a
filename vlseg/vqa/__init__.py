"""Visual question answering data for surgical and medical images (``vlseg.vqa``).

Two sources of (image, question, answer) samples, one sample schema (``VQASample``):

* ``from_published(root, format, split)`` reads the published surgical VQA releases exactly as they lie on disk
  (EndoVis-18-VQA, EndoVis-18-VQLA, Cholec80-VQA, PSI-AVA-VQA, SSG-VQA) and JSONL manifests;
* ``from_segmentation(dataset)`` generates questions from any vlseg segmentation dataset: the masks of each image
  become a scene graph (``build_scene_graph``) and templated, answer-balanced, seeded questions (``generate_qa``)
  about existence, counts, location, relative position, size comparison and size, each with the mask it refers to.

Answers are closed vocabularies kept as data (``AnswerVocab``, ``vocabularies/*.json``) with explicit normalisation
and an unknown-answer policy. Boxes follow one convention (``vlseg.vqa.boxes``: pixel edges, normalised to [0, 1]).

    import vlseg.vqa as vqa
    ds = vqa.from_published("EndoVis-18-VQA", "endovis18-vqa", split="val")
    s = ds[0]; s.question, s.answer, s.answer_index, ds.report.summary()

The model side: ``VQAModel`` (the ``vqa`` family: ``vlseg.create_model("minilm-scratch-vqa")``), ``answer`` (also
``vlseg.answer``) and ``evaluate`` (accuracy, macro F1, balanced accuracy per question type beside majority and
question-blind baselines, grounding Dice / IoU); the ``vqa`` training task is ``vlseg.vqa.task``.

    model = vlseg.create_model("tiny-test-vqa", pretrained=False)
    r = vlseg.answer(model, "frame.png", "Is there any grasper?")   # {"answer", "score", "top_k", "mask", ...}
"""

from .boxes import box_iou, denormalize_box, mask_to_box, normalize_box
from .engine import (
    TEMPLATES,
    TYPES,
    ClassNode,
    QARecord,
    Relation,
    SceneGraph,
    SceneObject,
    build_scene_graph,
    generate_qa,
)
from .evaluation import answer_metrics, balanced_accuracy, evaluate, macro_f1, report_lines
from .inference import answer
from .loaders import FORMATS, SPLITS, from_published, from_segmentation
from .model import VQAModel, VQAOutput
from .schema import (
    FileVQADataset,
    LoadReport,
    SegmentationVQADataset,
    VQADataError,
    VQADataset,
    VQADataWarning,
    VQASample,
    VQASubset,
)
from .vocab import AnswerVocab, UnknownAnswerError, list_vocabularies, normalize_answer

__all__ = [
    "FORMATS", "SPLITS", "TEMPLATES", "TYPES",
    "AnswerVocab", "ClassNode", "FileVQADataset", "LoadReport", "QARecord", "Relation", "SceneGraph", "SceneObject",
    "SegmentationVQADataset", "UnknownAnswerError", "VQADataError", "VQADataWarning", "VQADataset", "VQAModel",
    "VQAOutput", "VQASample", "VQASubset",
    "answer", "answer_metrics", "balanced_accuracy", "box_iou", "build_scene_graph", "denormalize_box", "evaluate",
    "from_published", "from_segmentation", "generate_qa", "list_vocabularies", "macro_f1", "mask_to_box",
    "normalize_answer", "normalize_box", "report_lines",
]
