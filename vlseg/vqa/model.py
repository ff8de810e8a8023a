"""``VQAModel``: visual question answering on the same stages as segmentation (DESIGN.md, "VQA on the same stages").

::

    question ──► text tokens (Q, L, Dt)              image ──► ImageFeatures (frozen encoder, feature cache)
       └─ fusion: a learned [ANS] query + question tokens ⇄ patch tokens of the deepest layer the decoder reads
            ──► fused question (Q, d), fused question tokens (Q, 1 + L, d), fused patches (Q, N, d)
            ├─ closed head: MLP(d) ──► logits over the answer vocabulary (+ <unk> under policy "unknown")
            ├─ open head:   cos(W_q q, W_a mean(answer tokens)) * scale ──► logits over any candidate answers
            └─ grounding: the FusionDecoder, conditioned on (fused question, answer embedding) and fed the fused
               patches (residual, zero-initialised) ──► mask logits (Q, H, W) + "refers to a region" logit (Q,)

Q = B * K: B images, K questions per image (the image encoder runs once per image). Grounding is conditioned on
the answer: the ground-truth answer in training (teacher forcing), the predicted one at inference.

The answer vocabulary is data (``vlseg.vqa.AnswerVocab``); it is stored, answers and all, in the model config
(``family_options["vocab"]``), so a checkpoint is self-contained. Answers outside it can be scored by the open
head without retraining (``add_answers`` or ``candidates=``): answer text embeddings come from the model's own
frozen text encoder (``encode_text``: cached per string while the text tower is frozen, in training too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..decoders.blocks import masked_mean, repeat_k
from ..features import ImageFeatures, TextFeatures
from ..model import SegOutput, VLSegModel, normalize_prompts
from .vocab import UNK, AnswerVocab, normalize_answer

Mode = Literal["auto", "closed", "open"]
MODES = ("auto", "closed", "open")

#: family_options keys of a ``vqa`` model and their defaults (``fusion`` is merged key by key)
FAMILY_OPTIONS: dict[str, Any] = {
    "vocab": "engine",  # a packaged vocabulary name, or the vocabulary itself (AnswerVocab.to_json as a dict)
    "extra_answers": [],  # open-vocabulary answers added after training (scored by the open head only)
    "fusion": {"dim": 128, "layers": 2, "heads": 4, "mlp_ratio": 2.0},
    "answer_dim": 256,  # width of the open-vocabulary answer space
}
_FUSION_KEYS = set(FAMILY_OPTIONS["fusion"])


def check_family_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate a ``vqa`` model's ``family_options``; -> the options with defaults filled in.

    Raises:
        ValueError: unknown keys, wrong types, or a vocabulary that cannot be read (naming the key).
    """
    if not isinstance(options, dict):
        kind = type(options).__name__
        raise ValueError(f"family_options of a 'vqa' model must be a mapping, got {kind}")  # noqa: TRY004
    unknown = sorted(set(options) - set(FAMILY_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown 'vqa' family option(s) {unknown}; valid: {sorted(FAMILY_OPTIONS)}")
    fusion = dict(options.get("fusion") or {})
    bad = sorted(set(fusion) - _FUSION_KEYS)
    if bad:
        raise ValueError(f"Unknown 'vqa' fusion option(s) {bad}; valid: {sorted(_FUSION_KEYS)}")
    out = {**FAMILY_OPTIONS, **options, "fusion": {**FAMILY_OPTIONS["fusion"], **fusion}}
    f = out["fusion"]
    for key in ("dim", "layers", "heads"):
        if not isinstance(f[key], int) or isinstance(f[key], bool) or f[key] < (0 if key == "layers" else 1):
            raise ValueError(f"'vqa' fusion option {key!r} must be a positive integer, got {f[key]!r}")
    if f["dim"] % f["heads"]:
        raise ValueError(f"'vqa' fusion dim {f['dim']} must be divisible by heads {f['heads']}")
    if not isinstance(out["answer_dim"], int) or out["answer_dim"] < 1:
        raise ValueError(f"'vqa' option 'answer_dim' must be a positive integer, got {out['answer_dim']!r}")
    extra = out["extra_answers"]
    if not isinstance(extra, (list, tuple)) or not all(isinstance(a, str) and normalize_answer(a) for a in extra):
        raise ValueError(f"'vqa' option 'extra_answers' must be a list of non-empty strings, got {extra!r}")
    vocab_of(out)  # readable?
    return out


def vocab_of(options: dict[str, Any]) -> AnswerVocab:
    """The AnswerVocab a ``vqa`` config names (a packaged name) or holds (a dict)."""
    v = options.get("vocab", FAMILY_OPTIONS["vocab"])
    try:
        if isinstance(v, str):
            return AnswerVocab.load(v)
        if isinstance(v, dict):
            return AnswerVocab.from_json(v)
    except (KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ValueError(f"'vqa' option 'vocab': {msg}") from e
    raise ValueError(f"'vqa' option 'vocab' must be a packaged vocabulary name or a vocabulary dict, got {v!r}")


def vocab_dict(vocab: AnswerVocab) -> dict[str, Any]:
    """A vocabulary as the JSON dict stored in the config (answers, aliases, policy, provenance)."""
    import json

    return json.loads(vocab.to_json())


# ------------------------------------------------------------------------------------------------------ blocks
def sincos_2d(grid: tuple[int, int], dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (N, dim) for a (gh, gw) grid (row-major), any grid size."""
    gh, gw = grid
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys, xs = torch.meshgrid(torch.arange(gh, device=device, dtype=torch.float32),
                            torch.arange(gw, device=device, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        a = coord[:, None] * omega[None]
        parts += [a.sin(), a.cos()]
    pe = torch.cat(parts, 1)  # (N, 4 * quarter)
    return F.pad(pe, (0, dim - pe.shape[1]))


class FusionBlock(nn.Module):
    """One token-level fusion layer (pre-norm, residual):

    1. question tokens attend to each other (masked self-attention),
    2. question tokens attend to patch tokens,
    3. patch tokens attend to question tokens,
    4. an MLP on each.

    q: (Q, Lq, d); q_mask: (Q, Lq) bool (True = real token); p: (Q, N, d).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.nq1, self.nq2, self.nq3, self.nq4 = (nn.LayerNorm(dim) for _ in range(4))
        self.np1, self.np2, self.np3 = (nn.LayerNorm(dim) for _ in range(3))
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.q2p = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.p2q = nn.MultiheadAttention(dim, heads, batch_first=True)
        hidden = int(dim * mlp_ratio)
        self.mlp_q = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.mlp_p = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: Tensor, q_mask: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        pad = ~q_mask
        h = self.nq1(q)
        q = q + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        pn = self.np1(p)
        q = q + self.q2p(self.nq2(q), pn, pn, need_weights=False)[0]
        qn = self.nq3(q)
        p = p + self.p2q(self.np2(p), qn, qn, key_padding_mask=pad, need_weights=False)[0]
        q = q + self.mlp_q(self.nq4(q))
        p = p + self.mlp_p(self.np3(p))
        return q, p


class QuestionImageFusion(nn.Module):
    """Question tokens ⇄ patch tokens.

    Args (keyword-only): vision_width C, text_width Dt, dim d, layers, heads, mlp_ratio.
    Forward: patches (B, N, C) with their grid, question tokens (B * K, L, Dt) + mask (B * K, L), k ->
        fused question (B * K, d) (the [ANS] query), fused tokens (B * K, 1 + L, d) + mask, fused patches
        (B * K, N, d). Patches are projected once per image, then repeated for its K questions.
    """

    def __init__(self, *, vision_width: int, text_width: int, dim: int, layers: int, heads: int,
                 mlp_ratio: float = 2.0):
        super().__init__()
        self.patch_proj = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, dim))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, dim))
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(FusionBlock(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm_q = nn.LayerNorm(dim)
        self.norm_p = nn.LayerNorm(dim)

    def forward(self, patches: Tensor, grid: tuple[int, int], tokens: Tensor, mask: Tensor, k: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        p = self.patch_proj(patches)  # (B, N, d), per image
        p = p + sincos_2d(grid, p.shape[-1], p.device).to(p.dtype)
        p = repeat_k(p, k)  # (BK, N, d)
        q = torch.cat([self.query.expand(tokens.shape[0], -1, -1).to(p.dtype), self.text_proj(tokens)], 1)
        q_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        for blk in self.blocks:
            q, p = blk(q, q_mask, p)
        q = self.norm_q(q)
        return q[:, 0], q, q_mask, self.norm_p(p)


@dataclass
class VQAOutput(SegOutput):
    """What ``VQAModel.forward`` returns (B images, K questions each). A SegOutput, so ``vlseg.segment`` works on a
    VQA model too (questions as prompts, masks of what the answers refer to).

    Attributes:
        logits: (B, K, H, W) grounding mask logits at the pixel-value size.
        presence: (B, K) "the answer refers to a region" logits.
        answer_logits: (B, K, A) closed-vocabulary logits; ``closed_labels`` names the A classes.
        open_logits: (B, K, M) open-vocabulary logits over ``candidates``.
        closed_labels: the vocabulary answers (+ "<unk>" under policy "unknown").
        candidates: the M answers the open head scored.
        answers: the B * K answers that conditioned the grounding (given, or predicted under ``mode``).
        mode: the head the predictions come from ("closed" or "open"; "auto" resolved).
    """

    answer_logits: Tensor | None = None
    open_logits: Tensor | None = None
    closed_labels: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    mode: str = "closed"

    def probs(self) -> tuple[list[str], Tensor]:
        """-> (labels, (B, K, n) probabilities) of the head named by ``mode``."""
        if self.mode == "open":
            assert self.open_logits is not None
            return self.candidates, self.open_logits.float().softmax(-1)
        assert self.answer_logits is not None
        return self.closed_labels, self.answer_logits.float().softmax(-1)


class VQAModel(VLSegModel):
    """A VLSegModel that also answers questions (see the module docstring for the data flow).

    Build it with ``vlseg.create_model("tiny-test-vqa" | "minilm-scratch-vqa" | "biomedclip-vqa" | ...)``; the
    ``vqa`` family wraps the encoders and the grounding decoder a composed model would have.

    Args:
        config, image_encoder, text_encoder, decoder, processor, family: as ``VLSegModel``; the decoder is the
            grounding decoder (any registered FusionDecoder with a presence head).
    """

    cache_frozen_prompts = True  # a few questions and answers, asked again and again: encoded once each

    def __init__(self, config: Any, image_encoder: Any, text_encoder: Any, decoder: Any, processor: Any, *,
                 family: Any):
        super().__init__(config, image_encoder, text_encoder, decoder, processor, family=family)
        opts = check_family_options(config.family_options)
        self.vocab = vocab_of(opts)
        config.family_options = {**opts, "vocab": vocab_dict(self.vocab),
                                 "extra_answers": [normalize_answer(a) for a in opts["extra_answers"]]}
        f = opts["fusion"]
        d, e = f["dim"], opts["answer_dim"]
        c, dt = image_encoder.info.width, text_encoder.info.width
        self.fusion_layer = max(range(len(decoder.layers)), key=lambda i: decoder.layers[i])  # deepest read
        self.fusion = QuestionImageFusion(vision_width=c, text_width=dt, dim=d, layers=f["layers"],
                                          heads=f["heads"], mlp_ratio=float(f["mlp_ratio"]))
        self.answer_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, len(self.vocab)))
        self.open_query = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, e))
        self.answer_proj = nn.Sequential(nn.LayerNorm(dt), nn.Linear(dt, e))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.ground_pool = nn.Sequential(nn.LayerNorm(d + e), nn.Linear(d + e, text_encoder.info.embed_dim))
        self.ground_tokens = nn.Linear(d, dt)
        self.patch_back = nn.Linear(d, c)
        nn.init.zeros_(self.patch_back.weight)  # grounding starts from the plain image features
        nn.init.zeros_(self.patch_back.bias)
        self.freeze_encoders()

    # ---------------------------------------------------------------- freezing
    def freeze_encoders(self) -> None:
        """As VLSegModel, and the text tower's own trainable head is frozen too: VQA reads text token states only
        (questions and answers get their own projections), so it would receive no gradient."""
        super().freeze_encoders()
        if self.config.freeze_text:
            for name, p in self.text_encoder.named_parameters():
                if name.startswith(self.text_encoder.trainable_prefixes):
                    p.requires_grad_(False)

    # ---------------------------------------------------------------- answers
    @property
    def closed_labels(self) -> list[str]:
        """The closed head's classes: the vocabulary answers, plus "<unk>" under policy "unknown"."""
        return list(self.vocab.answers) + ([UNK] if self.vocab.unk_index is not None else [])

    @property
    def extra_answers(self) -> list[str]:
        return list(self.config.family_options.get("extra_answers", []))

    def answer_list(self) -> list[str]:
        """Every answer the model offers by default: the vocabulary, then the answers added with ``add_answers``."""
        return list(self.vocab.answers) + [a for a in self.extra_answers if a not in self.vocab]

    def add_answers(self, answers: Sequence[str]) -> list[str]:
        """Offer more answers without retraining: they are scored by the open-vocabulary head (text embeddings of
        the answers), recorded in the config and saved with the checkpoint. Returns the answers added."""
        if isinstance(answers, str):
            answers = [answers]
        known = set(self.answer_list())
        added = []
        for a in answers:
            n = self.vocab.normalize(a)
            if not n:
                raise ValueError(f"add_answers: empty answer {a!r}")
            if n not in known:
                known.add(n)
                added.append(n)
        self.config.family_options["extra_answers"] = self.extra_answers + added
        return added

    def set_vocab(self, vocab: AnswerVocab) -> bool:
        """Fit the closed head to ``vocab`` (training data decides the answers). Rows of answers the head already
        has keep their weights; new rows are freshly initialised. Returns whether anything changed."""
        old = self.closed_labels
        if vocab_dict(vocab) == self.config.family_options["vocab"]:
            return False
        self.vocab = vocab
        self.config.family_options["vocab"] = vocab_dict(vocab)
        new = self.closed_labels
        head: Any = self.answer_head[-1]
        lin = nn.Linear(head.in_features, len(new)).to(device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            for i, a in enumerate(new):
                if a in old:
                    j = old.index(a)
                    lin.weight[i] = head.weight[j]
                    lin.bias[i] = head.bias[j]
        self.answer_head[-1] = lin
        self.config.family_options["extra_answers"] = [a for a in self.extra_answers if a not in vocab]
        return True

    def embed_answers(self, answers: Sequence[str]) -> tuple[Tensor, TextFeatures]:
        """Answers -> (open-vocabulary embeddings (M, e), their text token states). "<unk>" embeds to zeros."""
        texts = [a if a != UNK else "" for a in answers]
        feats = self.encode_text(texts)  # token states, cached per string while the text tower is frozen
        tokens = feats.tokens.to(self.dtype)
        emb = self.answer_proj(masked_mean(tokens, feats.mask))
        unk = torch.tensor([a == UNK for a in answers], device=emb.device)
        if unk.any():
            emb = emb.masked_fill(unk[:, None], 0.0)
        return emb, feats

    def resolve_mode(self, mode: str, candidates: Sequence[str] | None) -> str:
        """"auto": the closed head when the answers are the vocabulary's, the open head when answers were added
        (``add_answers``) or ``candidates`` are given."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "auto":
            return mode
        return "open" if candidates is not None or self.extra_answers else "closed"

    # ---------------------------------------------------------------- forward
    def forward(  # type: ignore[override]  # a VQA model answers: its output adds answer scores to the masks
            self, pixel_values: Tensor, prompts: Any, image_features: ImageFeatures | None = None, *,
            answers: Sequence[str] | None = None, candidates: Sequence[str] | None = None,
            mode: Mode = "auto", boxes: Any = None) -> VQAOutput:
        """Answer K questions about each of B images and ground the answers.

        Args:
            pixel_values: (B, 3, S, S) normalised images (``self.processor``).
            prompts: the questions: K strings shared by the batch, or B lists of K strings ("" = no question,
                the question-blind ablation).
            image_features: precomputed ``encode_image(pixel_values)`` (e.g. from a FeatureCache).
            answers: B * K answers (grouped by image) to condition the grounding on (teacher forcing); default:
                the predicted answers.
            candidates: answers the open head scores (default ``answer_list()``).
            mode: which head predicts ("auto", "closed", "open"; see ``resolve_mode``).
            boxes: not supported (VQA models take questions, not box prompts).
        Returns:
            VQAOutput (shapes in its docstring).
        """
        if boxes is not None:
            raise ValueError("'vqa' models take no box prompts; ask a question instead")
        b = pixel_values.shape[0]
        flat, k, _ = normalize_prompts(prompts, b, allow_empty=True)
        mode = self.resolve_mode(mode, candidates)  # type: ignore[assignment]
        cands = [self.vocab.normalize(c) for c in candidates] if candidates is not None else self.answer_list()
        if not cands:
            raise ValueError("candidates is empty: give at least one answer to score")
        image = self.encode_image(pixel_values) if image_features is None else image_features
        q = self.encode_text(flat)
        deep = image.layers[self.fusion_layer]  # (B, N, C)
        dtype = self.dtype
        q_vec, q_tok, q_mask, fused = self.fusion(deep.to(dtype), image.grid, q.tokens.to(dtype), q.mask, k)
        answer_logits = self.answer_head(q_vec)  # (BK, A)
        cand_emb, _ = self.embed_answers(cands)
        scale = self.logit_scale.exp().clamp(max=100.0)
        open_logits = scale * F.normalize(self.open_query(q_vec), dim=-1) @ F.normalize(cand_emb, dim=-1).T
        closed = self.closed_labels
        if answers is None:
            logits, labels = (open_logits, cands) if mode == "open" else (answer_logits, closed)
            answers = [labels[i] for i in logits.argmax(-1).tolist()]
        elif len(answers) != b * k:
            raise ValueError(f"answers: got {len(answers)} for {b} images x {k} questions")
        a_emb, a_feats = self.embed_answers(list(answers))
        text = TextFeatures(
            tokens=torch.cat([self.ground_tokens(q_tok), a_feats.tokens.to(dtype)], 1),
            mask=torch.cat([q_mask, a_feats.mask], 1),
            pooled=self.ground_pool(torch.cat([q_vec, a_emb], -1)),
        )
        toks = [repeat_k(t, k) for t in image.tokens]
        p = image.num_prefix_tokens
        t = toks[self.fusion_layer]
        toks[self.fusion_layer] = torch.cat([t[:, :p], t[:, p:] + self.patch_back(fused).to(t.dtype)], 1)
        per_question = ImageFeatures(tokens=toks, grid=image.grid, num_prefix_tokens=p,
                                     image_size=image.image_size)
        out = self.decoder(per_question, text, repeat_k(pixel_values, k), 1)
        h, w = out.logits.shape[-2:]
        return VQAOutput(
            logits=out.logits.reshape(b, k, h, w),
            presence=out.presence.reshape(b, k) if out.presence is not None else None,
            answer_logits=answer_logits.reshape(b, k, -1), open_logits=open_logits.reshape(b, k, -1),
            closed_labels=closed, candidates=cands, answers=list(answers), mode=mode,
        )


__all__ = ["FAMILY_OPTIONS", "MODES", "FusionBlock", "QuestionImageFusion", "VQAModel", "VQAOutput",
           "check_family_options", "sincos_2d", "vocab_dict", "vocab_of"]
