"""Grid scenes of coloured shapes, shared by the demo (``demo.py``) and the relation benchmark
(``relations.py``): objects and their spatial relations, detector-like region features, rendering, and
the idempotent, atomic writing of a generated data set.

A scene is a 64x64 image with objects on a 3x3 grid, one per cell, distinct in (colour, shape). Region
features are what a perfect detector with a little noise gives: one-hot colour, shape and size plus
N(0, 0.1^2) noise, with 1-2 pure-noise distractor regions, in shuffled order. Every object's box lies
inside its cell with a 1 px margin, so its box centre gives its cell and the boxes give every relation.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .format import TOKENIZER_DIR, Manifest, ManifestError, ShardWriter
from .tokenizer import train_wordpiece

IMAGE_SIZE = 64
GRID = 3
COLOURS: dict[str, tuple[int, int, int]] = {  # a generator's palette takes the first n
    "red": (215, 35, 35),
    "green": (35, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 45, 175),
    "orange": (245, 130, 20),
    "pink": (245, 130, 200),
    "brown": (120, 75, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES: dict[str, int] = {"small": 7, "large": 15}  # side of the bounding square, px
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
OBJECT_NOISE = 0.1
DISTRACTOR_NOISE = 0.3
MAX_REJECTIONS = 10_000
EDGES = [round(i * IMAGE_SIZE / GRID) for i in range(GRID + 1)]  # cell edges in px: [0, 21, 43, 64]

Triple = tuple[str, str, str]  # a caption as (subject phrase, relation, object phrase)
Sample = tuple[str, dict[str, Any], bytes, np.ndarray, np.ndarray]  # key, meta, PNG, features, boxes


@dataclass(frozen=True)
class Palette:
    """The object vocabulary of a generator, the first ``n_colours`` of COLOURS and ``n_shapes`` of
    SHAPES; region features are one-hot [colour | shape | size | zeros] in ``feature_dim``."""

    n_colours: int
    n_shapes: int
    feature_dim: int

    def __post_init__(self) -> None:
        if not (1 <= self.n_colours <= len(COLOURS) and 1 <= self.n_shapes <= len(SHAPES)):
            raise ValueError(f"at most {len(COLOURS)} colours and {len(SHAPES)} shapes")
        if self.feature_dim < self.n_colours + self.n_shapes + len(SIZES):
            raise ValueError(f"feature_dim {self.feature_dim} cannot hold the one-hot colour, shape and size")

    @property
    def colours(self) -> dict[str, tuple[int, int, int]]:
        return dict(list(COLOURS.items())[: self.n_colours])

    @property
    def shapes(self) -> tuple[str, ...]:
        return SHAPES[: self.n_shapes]


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    row: int
    col: int
    dx: int  # jitter from the cell centre; kept when the object moves cell
    dy: int

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Pixel box x1, y1, x2, y2 (x2, y2 exclusive edges), inside the object's grid cell."""
        side = SIZES[self.size]
        x0, x1 = EDGES[self.col], EDGES[self.col + 1]
        y0, y1 = EDGES[self.row], EDGES[self.row + 1]
        x = x0 + (x1 - x0 - side) // 2 + self.dx
        y = y0 + (y1 - y0 - side) // 2 + self.dy
        return x, y, x + side, y + side


def relations_between(a: Obj, b: Obj) -> list[str]:
    """The relations that hold for "a REL b" (objects in distinct cells: at least one)."""
    rels = []
    if a.col != b.col:
        rels.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        rels.append("above" if a.row < b.row else "below")
    return rels


def true_relations(scene: list[Obj]) -> list[tuple[int, int, str]]:
    """Every (subject index, object index, relation) true of the scene."""
    return [(i, j, rel) for i, a in enumerate(scene) for j, b in enumerate(scene) if i != j
            for rel in relations_between(a, b)]


def caption(t: Triple) -> tuple[str, list[int]]:
    """The caption text of a triple and the character span [start, end] of its relation phrase."""
    subject, rel, obj = t
    start = len(f"a {subject} ")
    return f"a {subject} {rel} a {obj}", [start, start + len(rel)]


def swap_cells(scene: list[Obj], x: int, y: int) -> list[Obj]:
    """The scene with objects x and y trading grid cells (each keeps its own jitter)."""
    out = list(scene)
    out[x] = replace(scene[x], row=scene[y].row, col=scene[y].col)
    out[y] = replace(scene[y], row=scene[x].row, col=scene[x].col)
    return out


def _jitter_range(size: str) -> int:
    # A 1 px margin to the cell edge: objects never touch or cross cells.
    return (min(np.diff(EDGES)) - SIZES[size]) // 2 - 1


def sample_scene(rng: np.random.Generator, palette: Palette, min_objects: int = 2, max_objects: int = 4) -> list[Obj]:
    colours = list(palette.colours)
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    kinds = rng.choice(len(colours) * len(palette.shapes), size=n, replace=False)
    sizes = rng.integers(0, len(SIZES), size=n)
    scene = []
    for cell, kind, size in zip(cells, kinds, sizes, strict=True):
        j = _jitter_range(SIZE_NAMES[size])
        dx, dy = rng.integers(-j, j + 1, size=2)
        scene.append(Obj(colour=colours[int(kind) // len(palette.shapes)], shape=palette.shapes[int(kind) % len(palette.shapes)],
                         size=SIZE_NAMES[size], row=int(cell) // GRID, col=int(cell) % GRID, dx=int(dx), dy=int(dy)))
    return scene


@dataclass(frozen=True)
class Regions:
    feat: np.ndarray  # [n, feature_dim] float32, object rows first
    distractor_boxes: np.ndarray  # [k, 4] float32


def sample_regions(rng: np.random.Generator, palette: Palette, scene: list[Obj]) -> Regions:
    colours = list(palette.colours)
    feat = np.zeros((len(scene), palette.feature_dim), dtype=np.float32)
    for i, o in enumerate(scene):
        feat[i, colours.index(o.colour)] = 1.0
        feat[i, len(colours) + palette.shapes.index(o.shape)] = 1.0
        feat[i, len(colours) + len(palette.shapes) + SIZE_NAMES.index(o.size)] = 1.0
    feat += rng.normal(0.0, OBJECT_NOISE, size=feat.shape).astype(np.float32)
    k = int(rng.integers(1, 3))
    distractors = rng.normal(0.0, DISTRACTOR_NOISE, size=(k, palette.feature_dim)).astype(np.float32)
    wh = rng.integers(3, 9, size=(k, 2))
    xy = rng.integers(0, IMAGE_SIZE - wh + 1)
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    return Regions(feat=np.concatenate([feat, distractors]), distractor_boxes=boxes)


def layout(rng: np.random.Generator, scene: list[Obj], regions: Regions) -> tuple[np.ndarray, np.ndarray]:
    """Features (float16) and boxes of one image, in a fresh random order."""
    boxes = np.concatenate([np.array([o.box for o in scene], dtype=np.float32), regions.distractor_boxes])
    perm = rng.permutation(len(boxes))
    return regions.feat[perm].astype(np.float16), boxes[perm]


def render(scene: list[Obj], background: int) -> bytes:
    """The scene as a PNG on a grey background."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in scene:
        x1, y1, x2, y2 = o.box
        r, b = x2 - 1, y2 - 1  # PIL includes the end pixel
        cx, cy = (x1 + r) / 2, (y1 + b) / 2
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x1, y1, r, b), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x1, y1, r, b), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x1, b), (r, b), (cx, y1)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, y1), (r, cy), (cx, b), (x1, cy)], fill=fill)
        elif o.shape == "cross":
            t = max(1, (r - x1) // 3)
            draw.rectangle((x1, cy - t / 2, r, cy + t / 2), fill=fill)
            draw.rectangle((cx - t / 2, y1, cx + t / 2, b), fill=fill)
        elif o.shape == "star":  # five points
            pts = []
            for k in range(10):
                radius = (r - x1) / 2 if k % 2 == 0 else (r - x1) / 5
                angle = -np.pi / 2 + k * np.pi / 5
                pts.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
            draw.polygon(pts, fill=fill)
        else:
            raise ValueError(f"no drawing for shape {o.shape!r}")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- writing a data set


def _read_manifest(root: Path) -> Manifest | None:
    try:
        return Manifest.read(root)
    except FileNotFoundError:
        return None
    except ManifestError:
        return Manifest(generator="?")  # a damaged data set: replaced (with overwrite) like a foreign one


def generate(out_dir: str | os.PathLike[str], generator: str, params: dict[str, Any],
             write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Make a data set in ``out_dir`` with ``write(folder)``, idempotently and atomically.

    Returns at once when ``out_dir/manifest.json`` records the same generator and parameters; other
    parameters raise FileExistsError unless ``overwrite``, and another generator's data always does.
    The data set is written into a private folder beside ``out_dir`` and renamed into place, so readers
    (and other nodes of a shared file system) see either nothing or the whole data set, and two writers
    racing leave one complete copy.
    """
    out = Path(out_dir)
    old = _read_manifest(out)
    if old is not None:
        if old.generator != generator:
            raise FileExistsError(f"{out} holds a data set not made by the {generator} generator; refusing to touch it")
        if old.params == params:
            return out
        if not overwrite:
            raise FileExistsError(f"{out} holds {generator} data with params {old.params}, not {params};"
                                  " pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the data set is read by every rank and user
    try:
        write(staging)
        _install(staging, out, generator, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _install(staging: Path, out: Path, generator: str, params: dict[str, Any]) -> None:
    """Move a complete data set into place with renames only (atomic on one file system)."""
    try:
        os.rename(staging, out)  # fails if ``out`` exists (even empty on some systems)
        return
    except OSError:
        pass
    current = _read_manifest(out)
    if current is not None and current.generator == generator and current.params == params:
        return  # another process installed the same data set first
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, aside)  # an interrupted or outdated data set: replaced whole
    os.rename(staging, out)
    shutil.rmtree(aside, ignore_errors=True)


def write_splits(out: Path, splits: dict[str, Iterable[Sample]], *, shard_size: int, feature_dim: int,
                 generator: str, params: dict[str, Any]) -> None:
    """Shards of every split, a WordPiece tokenizer trained on the train captions, then the manifest."""
    counts: dict[str, int] = {}
    train_captions: list[str] = []
    for split, samples in splits.items():
        with ShardWriter(out / split, shard_size=shard_size, overwrite=True) as writer:
            for key, meta, image, feat, boxes in samples:
                writer.write(key, meta, image=image, image_ext="png", feat=feat, boxes=boxes)
                if split == "train":
                    train_captions.extend(meta["captions"])
        counts[split] = writer.n_samples
    train_wordpiece(train_captions, out / TOKENIZER_DIR)
    Manifest(splits=counts, feature_dim=feature_dim, generator=generator, params=params).write(out)


def split_rngs(seed: int, splits: tuple[str, ...]) -> dict[str, np.random.Generator]:
    """One generator per split from children of ``SeedSequence(seed)``: a split's size changes only that split."""
    seeds = np.random.SeedSequence(seed).spawn(len(splits))
    return {split: np.random.Generator(np.random.PCG64(s)) for split, s in zip(splits, seeds, strict=True)}
