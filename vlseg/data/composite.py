"""Composite canvases: 2-4 images from different datasets tiled into one image, each class's target only on its
own tile(s). A model that segments "the salient thing in this kind of image" marks every tile whatever the prompt;
only the words can tell it which tile is meant, so canvases teach and test that language decides the mask.

    sampler = CompositeSampler(train_ds, seed=0)
    canvas = sampler.canvas(step)                 # a pure function of (dataset, seed, step, item)
    canvas.image                                   # (S, S, 3) uint8
    canvas.targets["polyp"]                        # (S, S) bool: the polyp tile's mask, False elsewhere
    sampler.negatives(canvas)                      # classes on no tile (empty targets), look-alikes first
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .groups import ImageGroup, group_by_image, load_group
from .negatives import datasets_compatible, hard_subset, negative_candidates

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), exclusive ends
_SALT_PICK, _SALT_PLACE = 0xC0, 0xC1  # keep the canvas streams apart from other (seed, step) streams
LAYOUTS: dict[int, tuple[tuple[int, int], ...]] = {2: ((1, 2), (2, 1)), 3: ((2, 2), (1, 3), (3, 1)), 4: ((2, 2),)}


@dataclass(frozen=True)
class CanvasTile:
    """One image on a canvas.

    Attributes:
        cell: the grid cell it occupies, as a (y0, x0, y1, x1) box in canvas pixels.
        content: where the resized image lies inside the cell (the rest of the cell is padding).
        source: the image's identity (``ImageGroup.key`` or the caller's key).
        dataset: its dataset name.
        classes: classes with a non-empty mask on this tile.
        annotated: every class the tile's masks name (present or annotated absent).
    """

    cell: Box
    content: Box
    source: str = ""
    dataset: str = ""
    classes: tuple[str, ...] = ()
    annotated: tuple[str, ...] = ()


@dataclass
class Canvas:
    """A composite image and its per-class targets.

    Attributes:
        image: (S, S, 3) uint8.
        targets: class name -> (S, S) bool, the union of that class's masks over the tiles that annotate it and
            False everywhere else (classes annotated absent on their tile have all-False targets).
        tiles: the tiles, in the order given to ``make_canvas``.
    """

    image: np.ndarray
    targets: dict[str, np.ndarray]
    tiles: list[CanvasTile] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def cell_mask(self, i: int) -> np.ndarray:
        """(S, S) bool: the cell of tile ``i``."""
        y0, x0, y1, x1 = self.tiles[i].cell
        m = np.zeros(self.image.shape[:2], bool)
        m[y0:y1, x0:x1] = True
        return m

    @property
    def present(self) -> list[str]:
        """Classes shown on some tile (in tile order; a class on two tiles appears twice)."""
        return [c for t in self.tiles for c in t.classes]

    @property
    def absent(self) -> list[str]:
        """Classes some tile's annotation marks absent there (they may still be shown on another tile)."""
        return [c for t in self.tiles for c in t.annotated if c not in t.classes]

    def owners(self, class_name: str) -> list[int]:
        """Indices of the tiles on which ``class_name`` has a non-empty mask."""
        return [i for i, t in enumerate(self.tiles) if class_name in t.classes]

    def other_tiles_mask(self, class_name: str) -> np.ndarray:
        """(S, S) bool: the cells of every tile that does not show ``class_name`` (where a mask for it leaks)."""
        m = np.zeros(self.image.shape[:2], bool)
        own = set(self.owners(class_name))
        for i in range(len(self.tiles)):
            if i not in own:
                m |= self.cell_mask(i)
        return m


def _cells(size: int, rows: int, cols: int) -> list[Box]:
    ys = [r * size // rows for r in range(rows + 1)]
    xs = [c * size // cols for c in range(cols + 1)]
    return [(ys[r], xs[c], ys[r + 1], xs[c + 1]) for r in range(rows) for c in range(cols)]


def _fit(h: int, w: int, ch: int, cw: int) -> tuple[int, int]:
    scale = min(ch / h, cw / w)
    return max(1, min(ch, round(h * scale))), max(1, min(cw, round(w * scale)))


def make_canvas(tiles: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]], layout: tuple[int, int] = (1, 2),
                size: int = 512, rng: np.random.Generator | None = None, sources: Sequence[str] | None = None,
                datasets: Sequence[str] | None = None, fill: int = 0) -> Canvas:
    """Tile images into one square canvas.

    Each image is resized into its grid cell with its aspect ratio kept (bilinear) and padded with ``fill``; its
    masks are resized the same way with nearest-neighbour, so a class's target is exactly its own tile's mask.

    Args:
        tiles: per tile, (image (H, W, 3) uint8, {class name: (H, W) bool mask}).
        layout: (rows, cols) of the grid; rows * cols >= len(tiles).
        size: S, the canvas side in pixels.
        rng: when given, tiles take random cells and random positions inside them (training); when None, tiles
            fill the cells row by row, centred (evaluation).
        sources, datasets: per tile, its identity and dataset name (recorded in ``Canvas.tiles``).
        fill: the padding grey level.
    Returns:
        A ``Canvas``.
    Raises:
        ValueError: no tiles, too many tiles for the layout, a canvas smaller than the grid, or an image/mask
            that is not (H, W, 3) uint8 / (H, W).
    """
    rows, cols = (int(v) for v in layout)
    if rows < 1 or cols < 1:
        raise ValueError(f"layout must be (rows >= 1, cols >= 1), got {layout}")
    if not 1 <= len(tiles) <= rows * cols:
        raise ValueError(f"layout {layout} holds 1..{rows * cols} tiles, got {len(tiles)}")
    if size < max(rows, cols):
        raise ValueError(f"size {size} is too small for a {rows}x{cols} grid")
    for name, seq in (("sources", sources), ("datasets", datasets)):
        if seq is not None and len(seq) != len(tiles):
            raise ValueError(f"{name} has {len(seq)} entries for {len(tiles)} tiles")
    cells = _cells(size, rows, cols)
    order = list(range(len(cells))) if rng is None else [int(i) for i in rng.permutation(len(cells))]
    canvas = np.full((size, size, 3), fill, np.uint8)
    targets: dict[str, np.ndarray] = {}
    out_tiles = []
    for t, (image, masks) in enumerate(tiles):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"tile {t}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        cell = cells[order[t]]
        ch, cw = cell[2] - cell[0], cell[3] - cell[1]
        nh, nw = _fit(image.shape[0], image.shape[1], ch, cw)
        if rng is None:
            dy, dx = (ch - nh) // 2, (cw - nw) // 2
        else:
            dy, dx = int(rng.integers(ch - nh + 1)), int(rng.integers(cw - nw + 1))
        y0, x0 = cell[0] + dy, cell[1] + dx
        canvas[y0:y0 + nh, x0:x0 + nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
        present = []
        for name, mask in masks.items():
            m = np.asarray(mask)
            if m.shape != image.shape[:2]:
                raise ValueError(f"tile {t}: mask {name!r} {m.shape} does not match the image {image.shape[:2]}")
            small = np.asarray(Image.fromarray((m > 0).astype(np.uint8) * 255).resize((nw, nh), Image.Resampling.NEAREST)) > 127
            target = targets.setdefault(name, np.zeros((size, size), bool))
            target[y0:y0 + nh, x0:x0 + nw] |= small
            if small.any():
                present.append(name)
        out_tiles.append(CanvasTile(cell=cell, content=(y0, x0, y0 + nh, x0 + nw),
                                    source="" if sources is None else str(sources[t]),
                                    dataset="" if datasets is None else str(datasets[t]),
                                    classes=tuple(present), annotated=tuple(masks)))
    return Canvas(image=canvas, targets=targets, tiles=out_tiles)


class CompositeSampler:
    """Picks the tiles of composite canvases from a (pooled) dataset, deterministically.

    Every tile of a canvas comes from a different dataset, and only datasets whose classes cannot appear
    unannotated in each other's images share a canvas (``vlseg.data.negatives.datasets_compatible``), so each
    class's target is exactly its own tile. ``pick`` and ``canvas`` are pure functions of (the dataset, ``seed``,
    ``step``, ``item``): a resumed training run sees the same canvases.

    Args:
        dataset: a dataset with ``records`` (``dataset`` and ``class_name`` fields) and ``__getitem__``.
        seed: the run's seed.
        tiles: (fewest, most) tiles per canvas, within 2..4.
        size: the canvas side in pixels.
        groups: the image groups to draw from (default ``group_by_image(dataset)``; pass a subset to draw only
            from some images, e.g. the evaluation images).
        weights: dataset name -> weight for the first tile's dataset (default uniform over datasets); later tiles
            are uniform over the remaining compatible datasets.
        hard_rate: the chance that a later tile comes from a dataset whose classes look like those already on the
            canvas (``vlseg.prompts.hard_negatives``: polyp / skin lesion / breast tumor, vessels / membranes), when
            one is left: canvases where only the class name, not "the salient thing", tells the tiles apart.
        loader: (dataset, group) -> (image, {class: mask}), as ``load_group`` gives them (the default); training
            passes a ``GroupCache``, so a tile's image is decoded once, not on every canvas it is drawn for.
    Raises:
        ValueError: ``tiles`` out of range, or no two datasets may share a canvas.
    """

    def __init__(self, dataset: Any, seed: int = 0, tiles: tuple[int, int] = (2, 4), size: int = 512,
                 groups: Sequence[ImageGroup] | None = None, weights: Mapping[str, float] | None = None,
                 hard_rate: float = 0.0,
                 loader: Callable[[Any, ImageGroup], tuple[np.ndarray, dict[str, np.ndarray]]] | None = None):
        lo, hi = tiles
        if not 2 <= lo <= hi <= 4:
            raise ValueError(f"tiles must be (lo, hi) with 2 <= lo <= hi <= 4, got {tiles}")
        if not 0.0 <= hard_rate <= 1.0:
            raise ValueError(f"hard_rate must be within [0, 1], got {hard_rate}")
        self.hard_rate = float(hard_rate)
        # `is None`, not `or`: a GroupCache is a sized container, falsy while empty, so `loader or ...` dropped the
        # training cache and decoded every canvas tile from its file again
        self.loader = loader if loader is not None else (lambda ds, g: load_group(ds, g)[:2])
        self.dataset, self.seed, self.tiles, self.size = dataset, int(seed), (int(lo), int(hi)), int(size)
        self.groups = list(group_by_image(dataset) if groups is None else groups)
        self.by_dataset: dict[str, list[int]] = {}
        for i, g in enumerate(self.groups):
            self.by_dataset.setdefault(g.dataset, []).append(i)
        self.classes: dict[str, tuple[str, ...]] = {}  # every class each dataset annotates, over all its rows
        for r in dataset.records:
            d = str(r.get("dataset", ""))
            if d in self.by_dataset and r.get("class_name") not in self.classes.get(d, ()):
                self.classes[d] = (*self.classes.get(d, ()), str(r.get("class_name", "")))
        self.names = sorted(self.by_dataset)
        self.partners = {d: {e for e in self.names if e != d and datasets_compatible(self.classes[d], self.classes[e])}
                         for d in self.names}
        self.starts = [d for d in self.names if self.partners[d]]
        if not self.starts:
            raise ValueError(f"composite canvases need two datasets whose classes cannot appear in each other's "
                             f"images; got {({d: list(c) for d, c in self.classes.items()})}")
        w = np.array([float((weights or {}).get(d, 1.0)) for d in self.starts])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum over {self.starts}, got {dict(weights or {})}")
        self.start_p = w / w.sum()
        self.pool = sorted({c for cs in self.classes.values() for c in cs})
        self.look_alikes = {d: {e for e in self.partners[d] if hard_subset(self.classes[e], self.classes[d])}
                            for d in self.names}  # compatible datasets with a look-alike class

    def _rng(self, step: int, item: int, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), int(item), salt])

    def pick(self, step: int, item: int = 0) -> tuple[list[ImageGroup], tuple[int, int]]:
        """The image groups of canvas (step, item) and its (rows, cols) layout. May hold fewer tiles than drawn
        when too few compatible datasets remain (never fewer than two)."""
        rng = self._rng(step, item, _SALT_PICK)
        n = int(rng.integers(self.tiles[0], self.tiles[1] + 1))
        chosen = [self.starts[int(rng.choice(len(self.starts), p=self.start_p))]]
        while len(chosen) < n:
            left = sorted(set.intersection(*(self.partners[d] for d in chosen)) - set(chosen))
            if not left:
                break
            if self.hard_rate and rng.random() < self.hard_rate:  # no draw at rate 0: canvases stay as they were
                hard = [d for d in left if any(d in self.look_alikes[c] for c in chosen)]
                left = hard or left
            chosen.append(left[int(rng.integers(len(left)))])
        groups = [self.groups[self.by_dataset[d][int(rng.integers(len(self.by_dataset[d])))]] for d in chosen]
        layouts = LAYOUTS[len(groups)]
        return groups, layouts[int(rng.integers(len(layouts)))]

    def canvas(self, step: int, item: int = 0, place: bool = True) -> Canvas:
        """Canvas (step, item): its images loaded (``load_group``: every annotated class of each image) and tiled.

        Args:
            place: random cells and positions inside them (training); False gives centred tiles (evaluation).
        """
        groups, layout = self.pick(step, item)
        loaded = [self.loader(self.dataset, g) for g in groups]
        rng = self._rng(step, item, _SALT_PLACE) if place else None
        return make_canvas(loaded, layout, self.size, rng=rng, sources=[g.key for g in groups],
                           datasets=[g.dataset for g in groups])

    def negatives(self, canvas: Canvas, pool: Sequence[str] | None = None) -> list[str]:
        """Classes absent from every tile (their target on the canvas is empty), look-alikes of the canvas's
        classes first. ``pool`` defaults to every class of the dataset."""
        context = [c for t in canvas.tiles for c in self.classes.get(t.dataset, ())]
        candidates = negative_candidates(self.pool if pool is None else pool, canvas.present, canvas.absent, context)
        # a class annotated absent on one tile may be present on another: keep only the canvas-wide absent ones
        return [c for c in candidates if not canvas.targets.get(c, np.zeros(1, bool)).any()]


__all__ = ["LAYOUTS", "Canvas", "CanvasTile", "CompositeSampler", "make_canvas"]
