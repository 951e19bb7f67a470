"""Synthetic image–caption pairs: coloured shapes on a 3 × 3 grid, drawn procedurally, seeded.

The masked multimodal LM (llmkit.objectives.mmlm) needs text that only an image can complete, and
a recipe that runs offline. Each example is a small RGB array with one or two objects, each a
shape (square, circle, triangle, cross) of a colour (red, green, blue, yellow, cyan, white) in one
of the nine cells of a 3 × 3 grid, and a caption that describes them:

    "a red circle at the top left"
    "a blue cross in the centre and a yellow square on the right"

Drawing. The image is (3, S, S) float32 in [0, 1]: a dark grey background (level ~ U(0, 0.2)),
each object filled with its colour's RGB times a brightness ~ U(0.75, 1), then Gaussian pixel
noise (std `noise`) and clipping. Cell (row, col) spans S/3 pixels; an object sits at the pixel
centre nearest the cell's centre with half-extent r = 0.49 · S/3, so objects never overlap.
With offsets (dy, dx) of a pixel centre from the object centre:

    square    max(|dy|, |dx|) ≤ r
    circle    dy² + dx² ≤ r²                      (the square less its corners)
    triangle  −r ≤ dy ≤ r  and  |dx| ≤ (dy + r)/2  (apex up)
    cross     max(|dy|, |dx|) ≤ r  and  min(|dy|, |dx|) ≤ r/3

Determinism. Example i of `ShapesDataset(n, seed, start=s)` is a pure function of
(seed, s + i, the drawing options): a numpy generator seeded by [seed, s + i] samples the objects
and then draws them, so items are random-access and a held-out split is just another `start`.
"""
from __future__ import annotations

import numpy as np
import torch

SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "white": (1.0, 1.0, 1.0)}
# (row, col) of the 3 × 3 grid -> position name and its caption phrase.
POSITIONS = {(0, 0): ("top left", "at the top left"), (0, 1): ("top", "at the top"),
             (0, 2): ("top right", "at the top right"), (1, 0): ("left", "on the left"),
             (1, 1): ("centre", "in the centre"), (1, 2): ("right", "on the right"),
             (2, 0): ("bottom left", "at the bottom left"), (2, 1): ("bottom", "at the bottom"),
             (2, 2): ("bottom right", "at the bottom right")}
# Caption words that only the image can tell (what the "MMLM uses the image" check masks).
IMAGE_WORDS = tuple(COLOURS) + SHAPES


def sample_objects(rng: np.random.Generator, max_objects: int = 2, two_object_prob: float = 0.5) -> list[dict]:
    """1 or 2 objects ({"shape", "colour", "row", "col", "position"}) in distinct cells."""
    count = 2 if max_objects >= 2 and rng.random() < two_object_prob else 1
    cells = rng.choice(9, size=count, replace=False)
    objects = []
    for cell in cells:
        row, col = divmod(int(cell), 3)
        objects.append({"shape": SHAPES[rng.integers(len(SHAPES))],
                        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
                        "row": row, "col": col, "position": POSITIONS[(row, col)][0]})
    return objects


def caption(objects: list[dict]) -> str:
    """"a {colour} {shape} {where}", joined by " and " for two objects."""
    return " and ".join(f"a {o['colour']} {o['shape']} {POSITIONS[(o['row'], o['col'])][1]}" for o in objects)


def shape_mask(shape: str, size: int, centre: tuple[float, float], r: float) -> np.ndarray:
    """(S, S) bool: the pixels whose centres fall inside `shape` (formulas in the module docstring)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5                                        # pixel centres
    dy, dx = yy - centre[0], xx - centre[1]                                        # (S, S) each
    ady, adx = np.abs(dy), np.abs(dx)
    inside = np.maximum(ady, adx) <= r
    if shape == "square":
        return inside
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "triangle":
        return (ady <= r) & (adx <= (dy + r) / 2)
    if shape == "cross":
        return inside & (np.minimum(ady, adx) <= r / 3)
    raise ValueError(f"shape={shape!r}: expected one of {list(SHAPES)}")


def geometry(row: int, col: int, size: int) -> tuple[tuple[float, float], float]:
    """(centre (y, x), half-extent r) of the object in grid cell (row, col) of an S × S image."""
    cell = size / 3
    centre = (np.floor((row + 0.5) * cell) + 0.5, np.floor((col + 0.5) * cell) + 0.5)
    return (float(centre[0]), float(centre[1])), 0.49 * cell


def draw(objects: list[dict], rng: np.random.Generator, size: int = 16, noise: float = 0.04) -> np.ndarray:
    """(3, S, S) float32 in [0, 1]; adds "centre", "bbox" (y0, y1, x0, x1 inclusive) to each object."""
    image = np.full((3, size, size), rng.uniform(0.0, 0.2), dtype=np.float32)     # (3, S, S)
    for obj in objects:
        centre, r = geometry(obj["row"], obj["col"], size)
        mask = shape_mask(obj["shape"], size, centre, r)                           # (S, S)
        rgb = np.asarray(COLOURS[obj["colour"]], dtype=np.float32) * rng.uniform(0.75, 1.0)
        image[:, mask] = rgb[:, None]
        ys, xs = np.nonzero(mask)
        obj["centre"], obj["bbox"] = centre, (int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max()))
    image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


class ShapesDataset:
    """`n` seeded image–caption examples: `ds[i]` -> (image (3, S, S) float tensor, caption, attributes).

    attributes = {"objects": [{"shape", "colour", "position", "row", "col", "centre", "bbox"}, ...],
    "size": S}. `start` offsets the example index (a disjoint split: ShapesDataset(m, seed, start=n)).
    """

    def __init__(self, n: int, seed: int = 0, size: int = 16, *, max_objects: int = 2,
                 two_object_prob: float = 0.5, noise: float = 0.04, start: int = 0):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ShapesDataset n={n!r}: expected a positive int (the number of examples)")
        if isinstance(size, bool) or not isinstance(size, int) or size < 9:
            raise ValueError(f"ShapesDataset size={size!r}: expected an int >= 9 (pixels per side, 3 per grid cell)")
        if max_objects not in (1, 2):
            raise ValueError(f"ShapesDataset max_objects={max_objects!r}: expected 1 or 2")
        self.n, self.seed, self.size, self.start = n, int(seed), size, int(start)
        self.max_objects, self.two_object_prob, self.noise = max_objects, float(two_object_prob), float(noise)

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int) -> np.random.Generator:
        if not -self.n <= index < self.n:
            raise IndexError(f"ShapesDataset index {index} out of range for {self.n} examples")
        return np.random.default_rng([self.seed, self.start + index % self.n])

    def caption(self, index: int) -> str:
        """The caption of example `index` without drawing its image (same as ds[index][1])."""
        return caption(sample_objects(self._rng(index), self.max_objects, self.two_object_prob))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, dict]:
        rng = self._rng(index)
        objects = sample_objects(rng, self.max_objects, self.two_object_prob)
        image = draw(objects, rng, self.size, self.noise)
        return torch.from_numpy(image), caption(objects), {"objects": objects, "size": self.size}


def shape_captions(n: int = 2000, seed: int = 0, **options) -> list[str]:
    """Captions of the first `n` examples of ShapesDataset(n, seed, **options): tokenizer training
    text for `source: shapes` (the caption vocabulary is closed, so a few thousand cover it)."""
    dataset = ShapesDataset(n, seed, **options)
    return [dataset.caption(i) for i in range(n)]

