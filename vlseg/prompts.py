"""Prompt library and generators (data, not models).

The library lives in the top-level ``prompts/`` folder (one JSON file per dataset family: class names, synonyms,
shape, colour, texture, typical size/location, definition; plus ``templates.json``) and ships inside the wheel as
``vlseg._prompt_data``.

Levels (after medvlsm's p0..p9), each adding to the previous one:
    p0 empty  p1 class name  p2 + shape  p3 + colour  p4 + size*  p5 + count*  p6 + location*  p7 + texture
    p8 + modality  p9 + definition            (* computed from the mask itself)
Instance queries ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost") name one connected
component; ``instance_mask`` returns that component's mask.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

LEVELS = tuple(f"p{i}" for i in range(10))
INSTANCE_QUERIES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")
_QUERY_ADJ = {"largest": "the biggest", "smallest": "the smallest", "leftmost": "furthest to the left",
              "rightmost": "furthest to the right", "topmost": "highest in the image",
              "bottommost": "lowest in the image"}
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
SIZE_WORDS = ((0.005, "tiny"), (0.03, "small"), (0.15, "medium-sized"), (0.40, "large"), (1.01, "very large"))


# ----------------------------------------------------------------------------- library
@dataclass(frozen=True)
class ClassInfo:
    """What the library knows about one target class."""

    name: str
    family: str = "generic"
    modality: str = "medical"
    synonyms: tuple[str, ...] = ()
    shape: tuple[str, ...] = ()
    colour: tuple[str, ...] = ()
    texture: tuple[str, ...] = ()
    typical_size: str = ""
    typical_location: str = ""
    definition: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return self.synonyms or (self.name,)


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, ClassInfo], dict[str, list[str]], dict[str, Any]]:
    root = resources.files("vlseg._prompt_data")
    classes: dict[str, ClassInfo] = {}
    families: dict[str, Any] = {}
    templates: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text(encoding="utf-8"))
        if entry.name == "templates.json":
            templates = {k: v for k, v in data.items() if not k.startswith("_")}
            continue
        if entry.name == RELATIONS_FILE:  # class relations, read by class_relations()
            continue
        families[data["family"]] = data
        for name, a in data["classes"].items():
            info = ClassInfo(
                name=name, family=data["family"], modality=data.get("modality", "medical"),
                synonyms=tuple(a.get("synonyms", [name])), shape=tuple(a.get("shape", ())),
                colour=tuple(a.get("colour", ())), texture=tuple(a.get("texture", ())),
                typical_size=a.get("typical_size", ""), typical_location=a.get("typical_location", ""),
                definition=a.get("definition", ""),
            )
            classes.setdefault(name.lower(), info)
    return classes, templates, families


def families() -> dict[str, Any]:
    """Family name -> the raw JSON (datasets, modality, classes)."""
    return json.loads(json.dumps(_load()[2]))


def templates(level: str) -> list[str]:
    """The sentence templates of a level (``p0``..``p9`` or ``instance``)."""
    t = _load()[1]
    if level not in t:
        raise ValueError(f"Unknown prompt level {level!r}; valid: {list(LEVELS)} or 'instance'")
    return list(t[level])


def lookup(class_name: str) -> ClassInfo:
    """The library entry for a class name or one of its synonyms; a bare entry for unknown classes."""
    if not isinstance(class_name, str) or not class_name.strip():
        raise ValueError("class_name must be a non-empty string")
    classes = _load()[0]
    key = class_name.strip().lower()
    if key in classes:
        return classes[key]
    for info in classes.values():
        if key in (s.lower() for s in info.synonyms):
            return info
    return ClassInfo(name=class_name.strip(), synonyms=(class_name.strip(),))


def class_names() -> list[str]:
    return sorted(i.name for i in _load()[0].values())


# ----------------------------------------------------------------------------- mask facts
@dataclass
class Component:
    area: int
    bbox: tuple[int, int, int, int]  # (y0, x0, y1, x1), exclusive ends
    centroid: tuple[float, float]  # (y, x) in pixels
    label: int = 0


@dataclass
class MaskFacts:
    """What a prompt may say about a mask. Positions are fractions of the image height/width."""

    height: int
    width: int
    components: list[Component] = field(default_factory=list)
    area_fraction: float = 0.0
    centroid: tuple[float, float] | None = None

    @property
    def count(self) -> int:
        return len(self.components)

    @property
    def size_word(self) -> str | None:
        if not self.components:
            return None
        return next(w for t, w in SIZE_WORDS if self.area_fraction < t)

    @property
    def vertical(self) -> str | None:
        return None if self.centroid is None else _third(self.centroid[0], ("upper", "middle", "lower"))

    @property
    def horizontal(self) -> str | None:
        return None if self.centroid is None else _third(self.centroid[1], ("left", "center", "right"))

    @property
    def location(self) -> str | None:
        """Where the target is: "in the upper left", "on the right", "at the top", "in the center"; for several
        components in different regions, each region: "in the upper left and in the lower right"."""
        if self.centroid is None:
            return None
        regions = list(dict.fromkeys(
            region_phrase(_third((c.centroid[0] + 0.5) / self.height, ("upper", "middle", "lower")),
                          _third((c.centroid[1] + 0.5) / self.width, ("left", "center", "right")))
            for c in sorted(self.components, key=lambda c: (c.centroid[0], c.centroid[1]))))
        if len(regions) > 1:
            return " and ".join(regions[:3])
        return region_phrase(self.vertical, self.horizontal)  # type: ignore[arg-type]


def region_phrase(v: str, h: str) -> str:
    """(vertical third, horizontal third) -> a location phrase."""
    if v == "middle" and h == "center":
        return "in the center"
    if v == "middle":
        return f"on the {h}"
    if h == "center":
        return "at the top" if v == "upper" else "at the bottom"
    return f"in the {v} {h}"


def _third(f: float, words: tuple[str, str, str]) -> str:
    return words[0] if f < 1 / 3 else (words[2] if f >= 2 / 3 else words[1])


def _binary(mask: Any) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] in (1, 3, 4):
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    return m > 0


def components(mask: Any, min_fraction: float = 0.05) -> tuple[np.ndarray, list[Component]]:
    """8-connected components, dropping specks smaller than ``min_fraction`` of the largest one.

    Returns (label image, components sorted by area, largest first).
    """
    from scipy import ndimage

    m = _binary(mask)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
    if n == 0:
        return labels, []
    areas = np.bincount(labels.ravel())[1:]
    keep = [i + 1 for i in range(n) if areas[i] >= max(1, min_fraction * areas.max())]
    boxes = ndimage.find_objects(labels)  # each label's tight box: its pixels are found there, not in the whole image
    comps = []
    for lab in keep:
        ys_box, xs_box = boxes[lab - 1]
        ys, xs = np.nonzero(labels[ys_box, xs_box] == lab)
        ys, xs = ys + ys_box.start, xs + xs_box.start  # integer coordinates: the same sums, so the same means
        comps.append(Component(area=int(len(ys)), bbox=(int(ys_box.start), int(xs_box.start), int(ys_box.stop),
                                                       int(xs_box.stop)),
                               centroid=(float(ys.mean()), float(xs.mean())), label=lab))
    comps.sort(key=lambda c: -c.area)
    return labels, comps


def describe(mask: Any) -> MaskFacts:
    """Size, count and location facts of a binary mask (what p4..p6 prompts state)."""
    m = _binary(mask)
    h, w = m.shape
    _, comps = components(m)
    if not comps:
        return MaskFacts(height=h, width=w)
    total = sum(c.area for c in comps)
    cy = sum(c.centroid[0] * c.area for c in comps) / total
    cx = sum(c.centroid[1] * c.area for c in comps) / total
    return MaskFacts(height=h, width=w, components=comps, area_fraction=float(m.sum()) / (h * w),
                     centroid=((cy + 0.5) / h, (cx + 0.5) / w))


# ----------------------------------------------------------------------------- generation
def _pick(rng: random.Random | None, items: tuple[str, ...] | list[str], default: str = "") -> str:
    if not items:
        return default
    return items[0] if rng is None else rng.choice(list(items))


def pluralize(name: str) -> str:
    if name.endswith(("s", "ia", "ae", "ture", "ium", "fat", "tissue")):
        return name
    if name.endswith("y") and not name.endswith(("ay", "ey", "oy")):
        return name[:-1] + "ies"
    return name + "s"


#: spellings with a vowel letter read with a consonant sound ("a uniform", "a urinary bladder", "a one-off") and with a
#: consonant letter read with a vowel sound ("an hour")
_CONSONANT_SOUND = re.compile(r"(uni(?!dent)|us[aeiu]|ur[aeio]|ut[ae]|uv|eu|one\b|once)", re.IGNORECASE)
_SILENT_H = re.compile(r"(hour|honest|hono|heir)", re.IGNORECASE)
_VOWEL_LETTER_NAMES = "AEFHILMNORSX"  # letters whose name starts with a vowel sound: "an MRI", "an L-hook"


def indefinite_article(word: str) -> str:
    """"a" or "an" before ``word`` (the first word of a phrase), by its first sound as spelt.

    A capitalised run of letters is read letter by letter ("an IVC", "an L-shaped hook", "a CT scan", "an X-ray");
    otherwise a vowel letter gives "an" except where it sounds as a consonant ("a uniform"), and a silent h gives
    "an" ("an hour")."""
    letters = re.match(r"[A-Za-z]+", word)
    if letters is None:
        return "a"
    run = letters.group(0)
    if run.isupper() and (len(run) > 1 or len(word) == 1 or not word[1].isalpha()):
        return "an" if run[0] in _VOWEL_LETTER_NAMES else "a"
    if run[0].lower() in "aeiou":
        return "a" if _CONSONANT_SOUND.match(run) else "an"
    return "an" if _SILENT_H.match(run) else "a"


_REGIONS = tuple(region_phrase(v, h) for v in ("upper", "middle", "lower") for h in ("left", "center", "right"))


def _imagined_facts(info: ClassInfo, rng: random.Random | None) -> tuple[int, str, str]:
    """(count, size word, location) for a prompt about an absent target.

    A prompt about a class that is not in the image cannot be computed from its (empty) mask, but it must not be
    recognisable by its form either: a model trained on negatives that lack the count, size and location words
    positives always have learns "no location -> empty" instead of reading the class name. Canonical (``rng`` None):
    one target of the class's typical size (``typical_size`` in the prompt library, else "small") in the center;
    drawn: 1-3 targets, any size but "very large", one or two regions.
    """
    if rng is None:
        typical = next((w for w in ("tiny", "small", "medium", "large") if w in info.typical_size.lower()), "small")
        return 1, {"medium": "medium-sized"}.get(typical, typical), "in the center"
    count = rng.choices((1, 2, 3), weights=(0.75, 0.15, 0.10))[0]
    size_word = rng.choice([w for _, w in SIZE_WORDS[:-1]])
    regions = rng.sample(_REGIONS, 2 if count > 1 and rng.random() < 0.5 else 1)
    return count, size_word, " and ".join(regions)


def generate(mask: Any, class_name: str, level: str, seed: int | None = None) -> str:
    """A prompt about ``class_name`` that is true of ``mask``.

    Args:
        mask: (H, W) binary mask of the target. Empty for a negative prompt: size, count and location are then
            imagined (``_imagined_facts``) so that negatives and positives read alike.
        class_name: a library class (or synonym); unknown classes get name-only prompts.
        level: ``"p0"``..``"p9"``, or an instance query (``"largest"``, ``"leftmost"``, ...).
        seed: ``None`` for the canonical prompt (first template, synonym and attribute: use for evaluation);
            an integer picks template, synonym and attributes reproducibly (training).
    Returns:
        The prompt string ("" for p0).
    """
    if level in INSTANCE_QUERIES:
        return generate_instance(mask, class_name, level, seed)[0]
    if level not in LEVELS:
        raise ValueError(f"Unknown prompt level {level!r}; valid: {list(LEVELS)} or {list(INSTANCE_QUERIES)}")
    n = int(level[1:])
    if n == 0:
        return ""
    info = lookup(class_name)
    rng = None if seed is None else random.Random(seed)
    facts = describe(mask)
    name = _pick(rng, info.names, info.name)
    if facts.count:
        count, size_word, location = facts.count, facts.size_word, facts.location
    else:  # a negative: state facts as a positive prompt would, so the prompt's form does not give the answer
        count, size_word, location = _imagined_facts(info, None if seed is None else random.Random(f"absent:{seed}"))
    # English adjective order: number, quality (texture), size, shape, colour, noun.
    words: list[str] = []
    if n >= 5 and count:
        words.append(_NUMBERS.get(count, "many"))
        name = name if count == 1 else pluralize(name)
    if n >= 7:
        words.append(_pick(rng, info.texture))
    if n >= 4 and size_word:
        words.append(size_word)
    if n >= 2:
        words.append(_pick(rng, info.shape))
    if n >= 3:
        words.append(_pick(rng, info.colour))
    phrase = " ".join(w for w in words + [name] if w)
    where = location if (n >= 6 and location) else ""
    template = _pick(rng, templates(level))
    # the templates write "a {phrase}" whatever the phrase's first word: the article agrees with it here, at the seam,
    # so the library's own text (definitions, synonyms) is never rewritten
    template = re.sub(r"\b([Aa]) \{phrase\}", lambda m: _capital(indefinite_article(phrase), m.group(1)) + " {phrase}",
                      template)
    text = template.format(phrase=phrase, where=where, modality=info.modality,
                           definition=info.definition or info.name)
    if n == 5 and count > 1:
        text = text.replace("there is ", "there are ")
    return re.sub(r"\s+", " ", text).strip(" ,")


def _capital(article: str, like: str) -> str:
    return article.capitalize() if like[:1].isupper() else article


def instance_mask(mask: Any, query: str) -> np.ndarray:
    """The (H, W) bool mask of the one component named by ``query`` (largest, leftmost, ...)."""
    if query not in INSTANCE_QUERIES:
        raise ValueError(f"Unknown instance query {query!r}; valid: {list(INSTANCE_QUERIES)}")
    labels, comps = components(mask)
    if not comps:
        raise ValueError("The mask is empty: no instance to select")
    key = {"largest": lambda c: -c.area, "smallest": lambda c: c.area, "leftmost": lambda c: c.centroid[1],
           "rightmost": lambda c: -c.centroid[1], "topmost": lambda c: c.centroid[0],
           "bottommost": lambda c: -c.centroid[0]}[query]
    return labels == min(comps, key=key).label


def generate_instance(mask: Any, class_name: str, query: str, seed: int | None = None) -> tuple[str, np.ndarray]:
    """(prompt, instance mask) for an instance query such as "the leftmost polyp"."""
    target = instance_mask(mask, query)
    info = lookup(class_name)
    rng = None if seed is None else random.Random(seed)
    name = _pick(rng, info.names, info.name)
    text = _pick(rng, templates("instance")).format(query=query, name=name, query_adj=_QUERY_ADJ[query])
    return text, target


_FLIPS = {"horizontal": (("left", "right"), ("leftmost", "rightmost")),
          "vertical": (("upper", "lower"), ("top", "bottom"), ("topmost", "bottommost"), ("highest", "lowest"))}


@lru_cache(maxsize=1)
def _positional_names() -> tuple[str, ...]:
    """Library names containing position words ("left ventricle"), longest first, to keep through flips."""
    return tuple(sorted({s for i in _load()[0].values() for s in (i.name, *i.synonyms)
                         if re.search(r"\b(left|right|upper|lower)\b", s, re.I)}, key=len, reverse=True))


def flip_prompt(text: str, horizontal: bool = False, vertical: bool = False) -> str:
    """Swap position words after an image flip ("upper left" -> "upper right"), leaving anatomical names that
    contain them ("left ventricle", "right lower lobe") unchanged."""
    protected = _positional_names()
    keep: dict[str, str] = {}

    def protect(m: re.Match[str]) -> str:
        key = f"\x00{len(keep)}\x00"
        keep[key] = m.group(0)
        return key

    for p in protected:
        text = re.sub(rf"\b{re.escape(p)}\b", protect, text, flags=re.I)
    pairs: list[tuple[str, str]] = []
    if horizontal:
        pairs += _FLIPS["horizontal"]
    if vertical:
        pairs += _FLIPS["vertical"]
    for a, b in pairs:
        text = re.sub(rf"\b({a}|{b})\b", lambda m: b if m.group(1).lower() == a else a, text, flags=re.I)
    for k, v in keep.items():
        text = text.replace(k, v)
    return text


class PromptSampler:
    """Random prompts for training: level, synonym and template drawn reproducibly; negatives at a rate.

    Args:
        levels: levels to draw from (uniformly, or with ``weights``).
        negative_rate: probability of replacing the target with an absent class (target = empty mask).
        instance_rate: probability of an instance query when the mask has several components.
        seed: makes the stream reproducible.
    """

    def __init__(self, levels: tuple[str, ...] = LEVELS[1:],
                 weights: tuple[float, ...] | None = None, negative_rate: float = 0.0, instance_rate: float = 0.0,
                 seed: int = 0):
        for lv in levels:
            if lv not in LEVELS:
                raise ValueError(f"Unknown prompt level {lv!r}")
        if not 0 <= negative_rate <= 1 or not 0 <= instance_rate <= 1:
            raise ValueError("negative_rate and instance_rate must be in [0, 1]")
        self.levels, self.weights = tuple(levels), weights
        self.negative_rate, self.instance_rate = negative_rate, instance_rate
        self.rng = random.Random(seed)

    def sample(self, mask: Any, class_name: str, absent: list[str] | tuple[str, ...] = ()
               ) -> tuple[str, np.ndarray, bool]:
        """-> (prompt, target mask, is_negative). ``absent``: classes known to be absent from this image."""
        m = _binary(mask)
        seed = self.rng.randrange(2**31)
        if absent and self.rng.random() < self.negative_rate:
            cls = self.rng.choice(list(absent))
            level = self.rng.choice([lv for lv in self.levels if lv != "p0"] or ["p1"])
            return generate(np.zeros_like(m), cls, level, seed), np.zeros_like(m), True
        if self.rng.random() < self.instance_rate and len(components(m)[1]) > 1:
            text, target = generate_instance(m, class_name, self.rng.choice(INSTANCE_QUERIES), seed)
            return text, target, False
        level = self.rng.choices(self.levels, weights=self.weights)[0]
        return generate(m, class_name, level, seed), m, not m.any()


__all__ = [
    "INSTANCE_QUERIES", "LEVELS", "ClassInfo", "MaskFacts", "PromptSampler", "class_names", "components",
    "describe", "families", "flip_prompt", "generate", "generate_instance", "indefinite_article", "instance_mask",
    "lookup", "templates",
]


# ----------------------------------------------------------------------------- class relations
RELATIONS_FILE = "hard_negatives.json"


@dataclass(frozen=True)
class ClassRelations:
    """How one class relates to the others (``prompts/hard_negatives.json`` plus the prompt families).

    Attributes:
        name: the library name of the class (synonyms resolve to it).
        parents: classes whose mask contains this one's (transitively): "surgical instrument" for "grasper".
        parts: classes whose masks this one's contains (transitively): "grasper", "hook" for "surgical instrument".
        co_occur: classes that can be visible, unannotated, in an image of this class (its prompt family, the
            ``co_occur`` groups, and its parents and parts), so they are never assumed absent from such an image.
        hard_negatives: look-alike classes (``look_alike`` groups) that are neither parents nor parts, in file order.
            Some of them may co-occur with the class (CT organs); whether one is a valid negative for a given image
            depends on what that image annotates (``vlseg.data.negatives``).
    """

    name: str
    parents: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()
    co_occur: tuple[str, ...] = ()
    hard_negatives: tuple[str, ...] = ()


def _canon(name: str) -> str:
    return lookup(name).name


@lru_cache(maxsize=1)
def _relations() -> tuple[dict[str, list[str]], dict[str, list[str]], list[list[str]], list[list[str]]]:
    """-> (parts by parent, parents by part, look-alike groups, co-occur groups), keys lower-case library names."""
    data = json.loads(resources.files("vlseg._prompt_data").joinpath(RELATIONS_FILE).read_text(encoding="utf-8"))
    known = {n.lower() for n in class_names()}

    def names(where: str, items: list[str]) -> list[str]:
        out = []
        for n in items:
            c = _canon(n)
            if c.lower() not in known:  # a typo here would silently drop a relation
                raise ValueError(f"{RELATIONS_FILE} {where}: {n!r} is not a library class; known: {sorted(known)}")
            out.append(c)
        return out

    parts: dict[str, list[str]] = {}
    for parent, entry in data.get("includes", {}).items():
        parts[_canon(parent).lower()] = names(f"includes[{parent!r}]", entry["parts"] + [parent])[:-1]
    changed = True
    while changed:  # transitive closure: a part of a part is a part
        changed = False
        for p, ps in parts.items():
            for q in list(ps):
                for r in parts.get(q.lower(), []):
                    if r not in ps:
                        ps.append(r)
                        changed = True
    parents: dict[str, list[str]] = {}
    for p, ps in parts.items():
        for q in ps:
            parents.setdefault(q.lower(), []).append(_canon(p))
    look = [names(f"look_alike[{g.get('name', i)!r}]", g["classes"]) for i, g in enumerate(data.get("look_alike", []))]
    co = [names(f"co_occur[{g.get('name', i)!r}]", g["classes"]) for i, g in enumerate(data.get("co_occur", []))]
    return parts, parents, look, co


@lru_cache(maxsize=1024)
def class_relations(class_name: str) -> ClassRelations:
    """Parents, parts, co-occurring classes and hard negatives of a class (or synonym); empty for unknown classes.

    Raises:
        ValueError: ``prompts/hard_negatives.json`` names a class the library does not know.
    """
    name = _canon(class_name)
    key = name.lower()
    parts_by, parents_by, look, co = _relations()
    parents = tuple(parents_by.get(key, ()))
    parts = tuple(parts_by.get(key, ()))
    kin = {key} | {c.lower() for c in parents + parts}
    co_occur: dict[str, None] = dict.fromkeys(parents + parts)
    for fam in _load()[2].values():
        members = [_canon(c) for c in fam["classes"]]
        if key in (m.lower() for m in members):
            co_occur.update(dict.fromkeys(members))
    for group in co:
        if key in (m.lower() for m in group):
            co_occur.update(dict.fromkeys(group))
    hard: dict[str, None] = {}
    for group in look:
        if key in (m.lower() for m in group):
            hard.update(dict.fromkeys(m for m in group if m.lower() not in kin))
    return ClassRelations(name=name, parents=parents, parts=parts,
                          co_occur=tuple(c for c in co_occur if c.lower() != key), hard_negatives=tuple(hard))


def hard_negatives(class_name: str) -> list[str]:
    """Classes that look like ``class_name`` in other images ("polyp" -> "skin lesion", "breast tumor", ...):
    the preferred wrong-class prompts. Never a parent or part of the class. Empty for unknown classes."""
    return list(class_relations(class_name).hard_negatives)


__all__ += ["ClassRelations", "class_relations", "hard_negatives"]
