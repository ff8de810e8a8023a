"""Question engine: the masks of one image -> a scene graph -> templated, answer-balanced, seeded QA records.

Scene graph (``build_scene_graph``). For every class mask:

* objects are its connected components (``scipy.ndimage.label``; 4-connectivity by default, 8 with
  ``connectivity=8``). Components smaller than ``min_area_fraction`` of the image (default 0.05 %, e.g. 62 px at
  352 x 352) are *specks*: they still make the class present and belong to its mask and centroid, but they are not
  objects: they are not counted (and a class with specks gets no counting question) and do not vote in relations;
* facts: present (``mask.any()``), area, area fraction, object count, centroid (x = column, y = row, pixel-index
  coordinates of the whole class mask), position word (3 x 3 grid: "upper left", "upper center", ..., "center", ...,
  "lower right"), size word (area fraction < 1 %: "small", < 10 %: "medium", else "large");
* relations between two present classes: "left of"/"right of" when *every* object centroid of one is left of
  *every* object centroid of the other by more than ``margin`` (5 % of the width) and the class centroids agree,
  likewise "above"/"below";
  "overlaps" (a shared pixel) and "touches" (a pixel of one within one pixel of the other, overlap included).
  No relation is made between a union class and its parts (``parts={"surgical instrument": ["grasper", "hook"]}``).

Questions (``generate_qa``): every question the scene graph answers truthfully is a candidate; per type, an answer
group is drawn uniformly (yes / no, each count, each position word, "a class name") and then a candidate, so
answers stay balanced. Questions are asked only where the answer is unambiguous: counting only for classes with no
specks and at most ``max_count`` objects, "where is X" only when X's objects and its centroid share one grid
cell, "what is in the upper left part?" only when one class alone is there, comparisons only when the areas differ
by 25 % or more, size words only away from the thresholds (10 % either side).

Every record's ``mask`` is the region the answer refers to: the class mask ("yes, there is a grasper", "2"), the
union of both classes for yes/no relations, the named class for "which" questions, and None when the answer refers
to no region ("no" to an existence question, "0" to a counting question).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np

TYPES: tuple[str, ...] = ("existence", "counting", "location", "relative position", "size comparison", "attribute")
ROWS, COLS = ("upper", "center", "lower"), ("left", "center", "right")
SIZE_THRESHOLDS = (0.01, 0.10)  # area fraction: small < 1 % <= medium < 10 % <= large
SIZE_WORDS = ("small", "medium", "large")

# Question templates as data: kind -> phrasings. ``{a}``/``{b}`` are class names, ``{pos}`` a position word.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "existence": ("Is there any {a} in the image?", "Is {a} visible in this image?", "Can you see any {a}?",
                  "Does the image contain {a}?"),
    "counting": ("How many {a} regions are there?", "How many separate {a} regions can be seen?",
                 "Count the distinct {a} regions in the image.", "What is the number of separate {a} regions?"),
    "location": ("Where is the {a}?", "Where is the {a} located in the image?", "In which part of the image is the {a}?"),
    "location_query": ("What is in the {pos} part of the image?", "Which structure is found in the {pos} of the image?"),
    "left_of": ("Is the {a} to the left of the {b}?", "Is the {a} left of the {b}?",
                "Does the {a} lie to the left of the {b}?"),
    "right_of": ("Is the {a} to the right of the {b}?", "Is the {a} right of the {b}?",
                 "Does the {a} lie to the right of the {b}?"),
    "above": ("Is the {a} above the {b}?", "Is the {a} higher in the image than the {b}?"),
    "below": ("Is the {a} below the {b}?", "Is the {a} lower in the image than the {b}?"),
    "which_left": ("Which is further left, the {a} or the {b}?", "Which one is on the left, the {a} or the {b}?"),
    "which_above": ("Which is higher in the image, the {a} or the {b}?", "Which one is on top, the {a} or the {b}?"),
    "touching": ("Does the {a} touch the {b}?", "Are the {a} and the {b} in contact?"),
    "overlap": ("Does the {a} overlap the {b}?", "Do the {a} and the {b} overlap?"),
    "larger": ("Is the {a} larger than the {b}?", "Does the {a} cover more area than the {b}?"),
    "smaller": ("Is the {a} smaller than the {b}?", "Does the {a} cover less area than the {b}?"),
    "which_larger": ("Which is larger, the {a} or the {b}?", "Which covers more of the image, the {a} or the {b}?"),
    "largest": ("Which structure covers the largest area?", "What is the largest structure in the image?"),
    "size": ("How large is the {a}?", "What is the size of the {a} relative to the image?",
             "Is the {a} small, medium or large?"),
}
KIND_TYPE: dict[str, str] = {
    "existence": "existence", "counting": "counting", "location": "location", "location_query": "location",
    "left_of": "relative position", "right_of": "relative position", "above": "relative position",
    "below": "relative position", "which_left": "relative position", "which_above": "relative position",
    "touching": "relative position", "overlap": "relative position", "larger": "size comparison",
    "smaller": "size comparison", "which_larger": "size comparison", "largest": "size comparison",
    "size": "attribute",
}
_KIND_FIELDS: dict[str, set[str]] = {k: ({"pos"} if k == "location_query" else set() if k == "largest"
                                         else {"a"} if KIND_TYPE[k] in ("existence", "counting", "location",
                                                                         "attribute") else {"a", "b"})
                                     for k in KIND_TYPE}


def position_word(x: float, y: float, width: int, height: int) -> str:
    """3 x 3 grid word for the pixel-index point (x = column, y = row): "upper left" ... "center" ... "lower right"."""
    col = min(int((x + 0.5) / width * 3), 2)
    row = min(int((y + 0.5) / height * 3), 2)
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return f"center {COLS[col]}"
    if col == 1:
        return f"{ROWS[row]} center"
    return f"{ROWS[row]} {COLS[col]}"


POSITIONS: tuple[str, ...] = tuple(position_word(c * 10 + 5, r * 10 + 5, 30, 30) for r in range(3) for c in range(3))


@dataclass(frozen=True)
class SceneObject:
    """One connected component of a class mask.

    Attributes:
        class_name: its class.   label: its component id in ``ClassNode.labels`` (1-based).
        area: pixels.            centroid: (x, y) pixel-index coordinates (x = column).
        box: (x1, y1, x2, y2) pixel edges (see ``vlseg.vqa.boxes``).   position: 3 x 3 grid word of the centroid.
        speck: smaller than the scene's ``min_area_fraction`` (not an object; still part of the class).
    """

    class_name: str
    label: int
    area: int
    centroid: tuple[float, float]
    box: tuple[float, float, float, float]
    position: str
    speck: bool


@dataclass(frozen=True, eq=False)
class ClassNode:
    """Facts about one class in one image.

    Attributes:
        name: class name.   present: any foreground pixel.   area / area_fraction: foreground pixels (/ image).
        count: objects (components that are not specks).   specks: speck components.
        centroid: (x, y) of the whole class mask, or None when absent.   position: its grid word, or None.
        spread: the components' centroids fall in more than one grid cell.
        size: "small" / "medium" / "large" by ``area_fraction``, or None when absent.
        components: all components (objects and specks).   mask: (H, W) bool.   labels: (H, W) component ids.
    """

    name: str
    present: bool
    area: int
    area_fraction: float
    count: int
    specks: int
    centroid: tuple[float, float] | None
    position: str | None
    spread: bool
    size: str | None
    components: tuple[SceneObject, ...] = field(repr=False)
    mask: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    @property
    def objects(self) -> tuple[SceneObject, ...]:
        return tuple(o for o in self.components if not o.speck)

    @property
    def countable(self) -> bool:
        """Every component is an object, so "how many" has one honest answer (``count``)."""
        return self.specks == 0


@dataclass(frozen=True)
class Relation:
    subject: str
    predicate: str  # "left of", "right of", "above", "below", "overlaps", "touches"
    object: str


@dataclass(frozen=True, eq=False)
class SceneGraph:
    """The facts of one image that questions are answered from (``build_scene_graph``).

    Attributes:
        height, width: image size.
        classes: class name -> ``ClassNode`` (absent classes included, with ``present=False``).
        relations: directed relations between present classes ("a left of b" and "b right of a" both listed).
        parts: union class -> its part classes; no relation links a union and its parts.
        min_area_fraction, connectivity, margin: the settings it was built with.
    """

    height: int
    width: int
    classes: dict[str, ClassNode]
    relations: tuple[Relation, ...]
    parts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    min_area_fraction: float = 0.0005
    connectivity: int = 4
    margin: float = 0.05

    def present(self) -> list[str]:
        return [n for n, c in self.classes.items() if c.present]

    def absent(self) -> list[str]:
        return [n for n, c in self.classes.items() if not c.present]

    def holds(self, subject: str, predicate: str, obj: str) -> bool:
        """Whether the relation ``subject predicate obj`` ("grasper", "left of", "hook") is in the graph."""
        return Relation(subject, predicate, obj) in self._relation_set

    @cached_property
    def _relation_set(self) -> frozenset[Relation]:
        return frozenset(self.relations)

    def related_as_parts(self, a: str, b: str) -> bool:
        """``a`` is a union of ``b`` (or the reverse): comparing them would be contradictory or trivial."""
        return b in self.parts.get(a, ()) or a in self.parts.get(b, ())


def _check_masks(masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty mapping {class name: (H, W) mask}")
    out: dict[str, np.ndarray] = {}
    shape = None
    for name, m in masks.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
        arr = np.asarray(m)
        if arr.ndim != 2:
            raise ValueError(f"mask of class {name!r} must be (H, W), got shape {arr.shape}")
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise ValueError(f"mask of class {name!r} is {arr.shape} but the first mask is {shape}; all masks of one "
                             "image must have the same size")
        out[name] = arr > 0
    return out


def build_scene_graph(masks: Mapping[str, Any], *, absent: Sequence[str] = (),
                      parts: Mapping[str, Sequence[str]] | None = None, min_area_fraction: float = 0.0005,
                      connectivity: int = 4, margin: float = 0.05) -> SceneGraph:
    """Scene graph of one image from its class masks.

    Args:
        masks: class name -> (H, W) binary mask (bool, 0/1 or 0/255) of ONE image. Empty masks are absent classes.
        absent: further class names known to be absent (no mask needed).
        parts: union class -> its part classes (cholec "surgical instrument" = grasper + hook).
        min_area_fraction: components smaller than this fraction of the image are specks.
        connectivity: 4 or 8 (pixel neighbourhood of a component).
        margin: relative-position margin as a fraction of the width / height.

    Raises:
        ValueError: empty or mismatched masks, an absent class whose mask is not empty, bad settings.
    """
    from scipy import ndimage

    m = _check_masks(masks)
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if not 0 <= min_area_fraction < 1 or not 0 <= margin < 0.5:
        raise ValueError(f"min_area_fraction must be in [0, 1) and margin in [0, 0.5), got {min_area_fraction}, "
                         f"{margin}")
    h, w = next(iter(m.values())).shape
    for name in absent:
        if name in m and m[name].any():
            raise ValueError(f"class {name!r} is listed as absent but its mask has {int(m[name].sum())} pixels")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    min_area = min_area_fraction * h * w
    nodes: dict[str, ClassNode] = {}
    for name in list(m) + [a for a in absent if a not in m]:
        mask = m.get(name, np.zeros((h, w), bool))
        labels, n = ndimage.label(mask, structure=structure)
        comps: list[SceneObject] = []
        if n:
            areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
            centers = ndimage.center_of_mass(mask, labels, range(1, n + 1))
            slices = ndimage.find_objects(labels)
            for k in range(n):
                cy, cx = (float(v) for v in centers[k])
                sl = slices[k]
                comps.append(SceneObject(name, k + 1, int(areas[k]), (cx, cy),
                                         (float(sl[1].start), float(sl[0].start), float(sl[1].stop),
                                          float(sl[0].stop)),
                                         position_word(cx, cy, w, h), bool(areas[k] < min_area)))
        area = int(mask.sum())
        frac = area / (h * w)
        centroid = None
        if area:
            rows, cols = np.nonzero(mask)
            centroid = (float(cols.mean()), float(rows.mean()))
        size = None if not area else SIZE_WORDS[int(np.searchsorted(SIZE_THRESHOLDS, frac, side="right"))]
        nodes[name] = ClassNode(
            name=name, present=bool(area), area=area, area_fraction=frac,
            count=sum(not c.speck for c in comps), specks=sum(c.speck for c in comps), centroid=centroid,
            position=position_word(*centroid, w, h) if centroid else None,
            spread=_spread(comps, position_word(*centroid, w, h) if centroid else None), size=size,
            components=tuple(comps), mask=mask,
            labels=labels)
    part_map = {u: tuple(p) for u, p in (parts or {}).items()}
    sg = SceneGraph(h, w, nodes, (), part_map, min_area_fraction, connectivity, margin)
    return SceneGraph(h, w, nodes, _relations(sg, structure), part_map, min_area_fraction, connectivity, margin)


def _spread(comps: list[SceneObject], position: str | None) -> bool:
    """The objects (or, with none, the specks) lie in several grid cells, or not in the class centroid's cell."""
    objects = [c for c in comps if not c.speck] or comps
    cells = {c.position for c in objects}
    return len(cells) > 1 or (position is not None and position not in cells)


def _relations(sg: SceneGraph, structure: np.ndarray) -> tuple[Relation, ...]:
    from scipy import ndimage

    present = [n for n in sg.classes if sg.classes[n].present]
    grown = {n: ndimage.binary_dilation(sg.classes[n].mask, structure=structure) for n in present}
    mx, my = sg.margin * sg.width, sg.margin * sg.height
    out: list[Relation] = []
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            if sg.related_as_parts(a, b):
                continue
            na, nb = sg.classes[a], sg.classes[b]
            ca, cb = na.objects or na.components, nb.objects or nb.components  # specks do not vote
            (cax, cay), (cbx, cby) = na.centroid, nb.centroid  # type: ignore[misc]
            ax, ay = [c.centroid[0] for c in ca], [c.centroid[1] for c in ca]
            bx, by = [c.centroid[0] for c in cb], [c.centroid[1] for c in cb]
            # every object of one beyond every object of the other by the margin, and the class centroids agree
            if max(ax) + mx < min(bx) and cax < cbx:
                out += [Relation(a, "left of", b), Relation(b, "right of", a)]
            elif max(bx) + mx < min(ax) and cbx < cax:
                out += [Relation(b, "left of", a), Relation(a, "right of", b)]
            if max(ay) + my < min(by) and cay < cby:
                out += [Relation(a, "above", b), Relation(b, "below", a)]
            elif max(by) + my < min(ay) and cby < cay:
                out += [Relation(b, "above", a), Relation(a, "below", b)]
            if (sg.classes[a].mask & sg.classes[b].mask).any():
                out += [Relation(a, "overlaps", b), Relation(b, "overlaps", a)]
            if (grown[a] & sg.classes[b].mask).any():
                out += [Relation(a, "touches", b), Relation(b, "touches", a)]
    return tuple(out)


@dataclass(frozen=True, eq=False)
class QARecord:
    """One generated question. Frozen; also readable as a mapping (``rec["question"]``, ``rec.to_dict()``).

    Attributes:
        question: the question text.
        answer: the answer ("yes", "no", "2", "upper left", "small", or a class name).
        type: one of ``TYPES``.
        mask: (H, W) bool region the answer refers to, or None when it refers to no region.
        classes: the classes the question mentions (or whose region the answer is).
        kind: the template kind (``TEMPLATES`` key) it was phrased from.
    """

    question: str
    answer: str
    type: str
    mask: np.ndarray | None = field(default=None, repr=False)
    classes: tuple[str, ...] = ()
    kind: str = ""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(f"QARecord has no field {key!r}; fields: {self.keys()}")
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    @staticmethod
    def keys() -> list[str]:
        return [f.name for f in fields(QARecord)]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; ``mask`` stays an array (or None)."""
        return {k: getattr(self, k) for k in self.keys()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QARecord):
            return NotImplemented
        same_mask = (self.mask is None and other.mask is None) or (
            self.mask is not None and other.mask is not None and np.array_equal(self.mask, other.mask))
        return same_mask and (self.question, self.answer, self.type, self.classes, self.kind) == (
            other.question, other.answer, other.type, other.classes, other.kind)

    def __hash__(self) -> int:
        return hash((self.question, self.answer, self.type, self.classes, self.kind))


@dataclass(frozen=True)
class _Candidate:
    kind: str
    answer: str
    classes: tuple[str, ...]        # mentioned, in order ({a}, {b})
    region: tuple[str, ...] | None  # classes whose union is the answer mask; None = no region
    fact: tuple[Any, ...]           # one question per fact and image
    pos: str = ""


_FIXED_ANSWERS = {"yes", "no", *POSITIONS, *SIZE_WORDS}


def _balance_key(answer: str) -> str:
    return answer if answer in _FIXED_ANSWERS or answer.isdigit() else "<class name>"


def _near_threshold(frac: float) -> bool:
    return any(abs(frac - t) < 0.1 * t for t in SIZE_THRESHOLDS)


def _candidates(sg: SceneGraph, max_count: int) -> dict[str, list[_Candidate]]:
    out: dict[str, list[_Candidate]] = {t: [] for t in TYPES}
    names = sorted(sg.classes)
    present = [n for n in names if sg.classes[n].present]
    for n in names:
        c = sg.classes[n]
        out["existence"].append(_Candidate("existence", "yes" if c.present else "no", (n,), (n,) if c.present else None,
                                           ("exist", n)))
        if c.countable and c.count <= max_count:
            out["counting"].append(_Candidate("counting", str(c.count), (n,), (n,) if c.count else None, ("count", n)))
        if c.present and not c.spread:
            out["location"].append(_Candidate("location", str(c.position), (n,), (n,), ("where", n)))
        if c.present and not _near_threshold(c.area_fraction):
            out["attribute"].append(_Candidate("size", str(c.size), (n,), (n,), ("size", n)))
    for pos in POSITIONS:  # "what is in the upper left part?" only when one class alone is there (>= 5 % of the cell)
        inside = [n for n in present if _cell_cover(sg, n, pos) > 0]
        if len(inside) == 1 and _cell_cover(sg, inside[0], pos) >= 0.05:
            out["location"].append(_Candidate("location_query", inside[0], (), (inside[0],), ("what at", pos), pos))
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            if sg.related_as_parts(a, b):
                continue
            pair = frozenset((a, b))
            rel = out["relative position"]
            for first, second, pred, inverse, yes_kind, no_kind, which in (
                    (a, b, "left of", "right of", "left_of", "right_of", "which_left"),
                    (a, b, "above", "below", "above", "below", "which_above")):
                if sg.holds(first, pred, second):
                    lo, hi = first, second
                elif sg.holds(second, pred, first):
                    lo, hi = second, first
                else:
                    continue
                key = ("h" if pred == "left of" else "v", pair)
                rel += [_Candidate(yes_kind, "yes", (lo, hi), (lo, hi), key),
                        _Candidate(yes_kind, "no", (hi, lo), (hi, lo), key),
                        _Candidate(no_kind, "yes", (hi, lo), (hi, lo), key),
                        _Candidate(no_kind, "no", (lo, hi), (lo, hi), key),
                        _Candidate(which, lo, (lo, hi), (lo,), key), _Candidate(which, lo, (hi, lo), (lo,), key)]
            for kind, pred in (("touching", "touches"), ("overlap", "overlaps")):
                ans = "yes" if sg.holds(a, pred, b) else "no"
                rel += [_Candidate(kind, ans, (a, b), (a, b), (kind, pair)),
                        _Candidate(kind, ans, (b, a), (b, a), (kind, pair))]
            big, small = (a, b) if sg.classes[a].area >= sg.classes[b].area else (b, a)
            if sg.classes[big].area >= 1.25 * sg.classes[small].area:
                key = ("size", pair)
                out["size comparison"] += [
                    _Candidate("larger", "yes", (big, small), (big, small), key),
                    _Candidate("larger", "no", (small, big), (small, big), key),
                    _Candidate("smaller", "yes", (small, big), (small, big), key),
                    _Candidate("smaller", "no", (big, small), (big, small), key),
                    _Candidate("which_larger", big, (big, small), (big,), key),
                    _Candidate("which_larger", big, (small, big), (big,), key)]
    if len(present) >= 2:
        by_area = sorted(present, key=lambda n: -sg.classes[n].area)
        if sg.classes[by_area[0]].area >= 1.25 * sg.classes[by_area[1]].area:
            out["size comparison"].append(_Candidate("largest", by_area[0], (), (by_area[0],), ("largest",)))
    return out


def _cell_cover(sg: SceneGraph, name: str, pos: str) -> float:
    """Fraction of the grid cell ``pos`` covered by class ``name``."""
    r, c = _cell_index(pos)
    cell = sg.classes[name].mask[r * sg.height // 3:(r + 1) * sg.height // 3, c * sg.width // 3:(c + 1) * sg.width // 3]
    return float(cell.mean()) if cell.size else 0.0


def _cell_index(pos: str) -> tuple[int, int]:
    i = POSITIONS.index(pos)
    return i // 3, i % 3


def _check_templates(templates: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    out = dict(TEMPLATES)
    for kind, phrasings in (templates or {}).items():
        if kind not in TEMPLATES:
            raise ValueError(f"unknown template kind {kind!r}; kinds: {sorted(TEMPLATES)}")
        if isinstance(phrasings, str) or not phrasings:
            raise ValueError(f"templates[{kind!r}] must be a non-empty list of phrasings")
        for t in phrasings:
            used = {f for _, f, _, _ in string.Formatter().parse(t) if f}
            if used != _KIND_FIELDS[kind]:
                raise ValueError(f"template {t!r} for kind {kind!r} must use the fields {sorted(_KIND_FIELDS[kind])}, "
                                 f"uses {sorted(used)}")
        out[kind] = tuple(phrasings)
    return out


def generate_qa(masks: Mapping[str, Any], seed: int = 0, *, absent: Sequence[str] = (),
                parts: Mapping[str, Sequence[str]] | None = None, types: Sequence[str] | None = None,
                max_per_type: int = 2, max_questions: int | None = None, max_count: int = 10,
                min_area_fraction: float = 0.0005, connectivity: int = 4, margin: float = 0.05,
                templates: Mapping[str, Sequence[str]] | None = None) -> list[QARecord]:
    """Questions and answers about one image, from its class masks.

    Args:
        masks: class name -> (H, W) binary mask of ONE image; empty masks are absent classes.
        seed: the same masks, arguments and seed give the same records.
        absent: class names known to be absent from the image ("is there a hook?" -> "no"); balances existence.
        parts: union class -> part classes; no relation or size question pairs a union with its parts.
        types: question types to ask (default all of ``TYPES``).
        max_per_type: at most this many questions per type.
        max_questions: at most this many questions in all (types taken in turn, in a seeded order).
        max_count: counting questions only up to this many objects.
        min_area_fraction, connectivity, margin: scene-graph settings (see ``build_scene_graph``).
        templates: kind -> phrasings overriding ``TEMPLATES`` entries (same placeholders).

    Returns:
        ``QARecord``s in a seeded order; fewer than asked when the scene has no more unambiguous facts.

    Raises:
        ValueError: bad masks, an unknown type or template kind, a non-empty "absent" class.
    """
    wanted = list(TYPES) if types is None else list(types)
    bad = [t for t in wanted if t not in TYPES]
    if bad:
        raise ValueError(f"unknown question types {bad}; choose from {list(TYPES)}")
    if max_per_type < 1 or (max_questions is not None and max_questions < 0):
        raise ValueError(f"max_per_type must be >= 1 and max_questions >= 0, got {max_per_type}, {max_questions}")
    phrasings = _check_templates(templates)
    sg = build_scene_graph(masks, absent=absent, parts=parts, min_area_fraction=min_area_fraction,
                           connectivity=connectivity, margin=margin)
    pools = _candidates(sg, max_count)
    rng = np.random.default_rng(seed)
    order = [wanted[i] for i in rng.permutation(len(wanted))]
    used: set[tuple[Any, ...]] = set()
    taken = {t: 0 for t in order}
    out: list[QARecord] = []
    limit = max_questions if max_questions is not None else len(order) * max_per_type
    while len(out) < limit:
        progressed = False
        for t in order:
            if len(out) >= limit or taken[t] >= max_per_type:
                continue
            pool = [c for c in pools[t] if c.fact not in used]
            if not pool:
                continue
            groups: dict[str, list[_Candidate]] = {}
            for c in pool:
                groups.setdefault(_balance_key(c.answer), []).append(c)
            keys = sorted(groups)
            group = groups[keys[int(rng.integers(len(keys)))]]
            cand = group[int(rng.integers(len(group)))]
            used.add(cand.fact)
            taken[t] += 1
            progressed = True
            out.append(_record(sg, cand, phrasings, rng))
        if not progressed:
            break
    return out


def _record(sg: SceneGraph, c: _Candidate, phrasings: dict[str, tuple[str, ...]],
            rng: np.random.Generator) -> QARecord:
    options = phrasings[c.kind]
    template = options[int(rng.integers(len(options)))]
    values = {"a": c.classes[0] if c.classes else "", "b": c.classes[1] if len(c.classes) > 1 else "", "pos": c.pos}
    question = template.format(**{k: v for k, v in values.items() if k in _KIND_FIELDS[c.kind]})
    mask = None
    if c.region is not None:
        mask = np.zeros((sg.height, sg.width), bool)
        for n in c.region:
            mask |= sg.classes[n].mask
    classes = c.classes or (c.region or ())
    return QARecord(question=question, answer=c.answer, type=KIND_TYPE[c.kind], mask=mask, classes=tuple(classes),
                    kind=c.kind)


__all__ = [
    "KIND_TYPE",
    "POSITIONS",
    "TEMPLATES",
    "TYPES",
    "ClassNode",
    "QARecord",
    "Relation",
    "SceneGraph",
    "SceneObject",
    "build_scene_graph",
    "generate_qa",
    "position_word",
]
