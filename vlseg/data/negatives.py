"""Which classes may be asked about an image as negatives (target: an empty mask).

A class is a safe negative for an image only if we know it is not there. We know that when the image annotates
it as absent (a ``negative`` row), or when it belongs to another kind of image altogether: not the same class
under another name, not a parent or part of a class the image shows (``includes`` in
``prompts/hard_negatives.json``), and nothing that can be visible there unannotated (the class's prompt family and
the ``co_occur`` groups: a laparoscopic frame annotated only for tools still shows the liver). Look-alike classes
(``vlseg.prompts.hard_negatives``) come first among the safe ones: they are what a model that ignores its prompt
gets wrong.

Used by composite canvases (which datasets may share a canvas, which classes are absent from one), by the
training batcher (wrong-class prompts) and by the language-use report.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache, lru_cache

from ..prompts import class_relations, lookup


@lru_cache(maxsize=4096)
def _key(name: str) -> str:
    return lookup(name).name.lower()


@cache
def is_relative(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same class (synonyms included) or one is a parent or part of the other
    ("surgical instrument" / "grasper"). Such pairs are never each other's negatives or "other class"."""
    ka, kb = _key(a), _key(b)
    if ka == kb:
        return True
    r = class_relations(a)
    return kb in {_key(c) for c in r.parents + r.parts}


@cache
def may_co_occur(a: str, b: str) -> bool:
    """True when an image annotated for ``b`` may show ``a`` unannotated (or the reverse): relatives, the same
    prompt family, or a ``co_occur`` group of ``prompts/hard_negatives.json``."""
    if is_relative(a, b):
        return True
    kb = _key(b)
    ka = _key(a)
    return kb in {_key(c) for c in class_relations(a).co_occur} or ka in {_key(c) for c in class_relations(b).co_occur}


def is_valid_negative(candidate: str, present: Iterable[str], absent: Iterable[str] = (),
                      context: Iterable[str] = ()) -> bool:
    """Whether ``candidate`` is known to be absent from an image.

    Args:
        candidate: the class that would be prompted.
        present: classes the image shows (non-empty masks).
        absent: classes the image annotates as absent (negative rows): valid unless shown or a parent of a
            shown class (a part of a shown class, e.g. "hook" beside "surgical instrument", can be absent).
        context: other classes the image's dataset annotates (what kind of image this is); a candidate that
            may co-occur with one of them is not assumed absent.
    Returns:
        True when prompting ``candidate`` on the image should give an empty mask.
    """
    present = list(present)
    k = _key(candidate)
    # the class itself or a parent of a shown class is there; a part of a shown class may not be (a frame with a
    # grasper but no hook), so a part counts as absent only where the image says so
    if any(k == _key(p) or k in {_key(q) for q in class_relations(p).parents} for p in present):
        return False
    if k in {_key(a) for a in absent}:
        return True
    return not any(may_co_occur(candidate, c) for c in (*present, *absent, *context))


def negative_candidates(pool: Iterable[str], present: Iterable[str], absent: Iterable[str] = (),
                        context: Iterable[str] = (), hard_first: bool = True) -> list[str]:
    """The classes of ``pool`` that are valid negatives for an image, hard ones (``hard_subset``) first
    (each part in ``pool`` order, duplicates and synonyms of one class dropped).

    Args:
        pool: candidate class names (e.g. every class of a pooled training set).
        present, absent, context: as in ``is_valid_negative``.
        hard_first: put ``hard_subset`` first: the look-alikes of the present classes (``vlseg.prompts.hard_negatives``)
            and the classes annotated absent on the image.
    Returns:
        Candidate names as given in ``pool``.
    """
    present, absent, context = list(present), list(absent), list(context)
    seen: set[str] = set()
    valid = []
    for c in pool:
        k = _key(c)
        if k not in seen and is_valid_negative(c, present, absent, context):
            seen.add(k)
            valid.append(c)
    if not hard_first:
        return valid
    hard = {_key(c) for c in hard_subset(valid, present, absent)}
    return [c for c in valid if _key(c) in hard] + [c for c in valid if _key(c) not in hard]


def hard_subset(candidates: Iterable[str], present: Iterable[str], absent: Iterable[str] = ()) -> list[str]:
    """The candidates that are look-alikes (hard negatives) of at least one present class, or that the image's own
    annotation marks absent (the hardest negatives there are: "breast tumor" on a normal breast ultrasound is
    asked of exactly the images that look most like it; drawn among ~20 other classes it would hardly ever be)."""
    hard = {_key(h) for p in present for h in class_relations(p).hard_negatives} | {_key(a) for a in absent}
    return [c for c in candidates if _key(c) in hard]


def datasets_compatible(classes_a: Iterable[str], classes_b: Iterable[str]) -> bool:
    """Whether images annotated for ``classes_a`` and for ``classes_b`` may share a composite canvas: no class of
    one can be (unannotated) in an image of the other, so every class's target is only its own tile."""
    a, b = list(classes_a), list(classes_b)
    return not any(may_co_occur(x, y) for x in a for y in b)


__all__ = ["datasets_compatible", "hard_subset", "is_relative", "is_valid_negative", "may_co_occur",
           "negative_candidates"]
