"""Safe output names derived from prompts and input file names: no path separators or dots that could escape the
output folder, and no two names alike within one run (``polyp``, ``Polyp`` and ``polyp!`` all slug to
``polyp``: they become ``polyp``, ``polyp_2``, ``polyp_3``)."""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_LEN = 60


def slug(text: str) -> str:
    """Lowercase ASCII letters, digits and single underscores; ``prompt`` when nothing is left."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", text.strip()).strip("_").lower()
    return s[:MAX_LEN].rstrip("_") or "prompt"


def unique_slugs(texts: Iterable[str], taken: Iterable[str] = ()) -> list[str]:
    """One slug per text, made unique (``_2``, ``_3``, ...) among themselves and ``taken``."""
    used = set(taken)
    out = []
    for t in texts:
        base = slug(t)
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        out.append(name)
    return out


__all__ = ["slug", "unique_slugs"]
