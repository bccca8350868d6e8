"""Synthetic demo data set: coloured shapes on a 3x3 grid with relational captions.

Every scene is a 64x64 image with 2-4 objects, each in its own grid cell and
distinct in (colour, shape). A caption names two objects and one true spatial
relation between them ("a small red circle left of a large blue square").
Region features are what a perfect detector with a little noise would give:
one-hot colour, shape and size plus Gaussian noise, with 1-2 pure-noise
distractor regions, in shuffled order. The ``swap`` split holds Winoground-style
pairs that differ only in the argument order of the relation.

Everything is a pure function of ``seed``: each split draws from its own child
of ``np.random.SeedSequence(seed)``, so equal parameters give byte-identical
shards and changing one split's size leaves the other splits unchanged.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .format import TOKENIZER_DIR, Manifest, ManifestError, ShardWriter, sample_key
from .tokenizer import train_wordpiece

# Bump when the generated data changes, so cached demo sets are regenerated.
DEMO_VERSION = 1
GENERATOR = "demo"
SPLITS: tuple[str, ...] = ("train", "val", "test", "swap")
# Splits used for retrieval evaluation, where a caption must be true of its own
# image only; otherwise a "wrong" retrieval could be correct.
_UNIQUE_SPLITS = frozenset({"val", "test"})

IMAGE_SIZE = 64
GRID = 3
FEATURE_DIM = 16
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 45, 175),
    "orange": (245, 130, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, int] = {"small": 7, "large": 15}  # side of the bounding square, px
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

OBJECT_NOISE = 0.1
DISTRACTOR_NOISE = 0.3
_MAX_REJECTIONS = 10_000

# Pixel edges of the grid cells: [0, 21), [21, 43), [43, 64).
_EDGES = [round(i * IMAGE_SIZE / GRID) for i in range(GRID + 1)]


@dataclass(frozen=True)
class _Obj:
    colour: int
    shape: int
    size: int
    row: int
    col: int
    dx: int  # jitter from the cell centre; kept when the object moves cell
    dy: int

    @property
    def phrase(self) -> str:
        return f"{SIZE_NAMES[self.size]} {COLOUR_NAMES[self.colour]} {SHAPES[self.shape]}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Pixel box x1, y1, x2, y2 (x2, y2 exclusive edges)."""
        side = SIZES[SIZE_NAMES[self.size]]
        x0, x1 = _EDGES[self.col], _EDGES[self.col + 1]
        y0, y1 = _EDGES[self.row], _EDGES[self.row + 1]
        x = x0 + (x1 - x0 - side) // 2 + self.dx
        y = y0 + (y1 - y0 - side) // 2 + self.dy
        return x, y, x + side, y + side


# A caption as (subject phrase, relation, object phrase).
_Triple = tuple[str, str, str]


@dataclass(frozen=True)
class _Regions:
    feat: np.ndarray  # [n, FEATURE_DIM] float32, object rows first
    distractor_boxes: np.ndarray  # [k, 4] float32


def _jitter_range(size: int) -> int:
    # Keep a 1 px margin to the cell edge so objects never touch or cross cells.
    side = SIZES[SIZE_NAMES[size]]
    return (min(np.diff(_EDGES)) - side) // 2 - 1


def _relations(a: _Obj, b: _Obj) -> list[str]:
    """Relations that hold for "a REL b"; objects sit in distinct cells, so at least one."""
    rels = []
    if a.col != b.col:
        rels.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        rels.append("above" if a.row < b.row else "below")
    return rels


def _true_triples(scene: list[_Obj]) -> list[tuple[int, int, str]]:
    return [(i, j, rel) for i, a in enumerate(scene) for j, b in enumerate(scene) if i != j for rel in _relations(a, b)]


def _caption(a: _Obj, rel: str, b: _Obj) -> str:
    return f"a {a.phrase} {rel} a {b.phrase}"


def _sample_scene(rng: np.random.Generator) -> list[_Obj]:
    n = int(rng.integers(2, 5))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    sizes = rng.integers(0, len(SIZES), size=n)
    scene = []
    for cell, kind, size in zip(cells, kinds, sizes, strict=True):
        j = _jitter_range(int(size))
        dx, dy = rng.integers(-j, j + 1, size=2)
        scene.append(
            _Obj(
                colour=int(kind) // len(SHAPES),
                shape=int(kind) % len(SHAPES),
                size=int(size),
                row=int(cell) // GRID,
                col=int(cell) % GRID,
                dx=int(dx),
                dy=int(dy),
            )
        )
    return scene


def _pick_captions(rng: np.random.Generator, scene: list[_Obj]) -> list[tuple[int, int, str]]:
    """Two different true captions, preferring a different object pair, then a different axis."""
    cands = _true_triples(scene)
    first = cands[int(rng.integers(len(cands)))]
    pair = {first[0], first[1]}
    horizontal = first[2] in ("left of", "right of")
    tiers = [
        [c for c in cands if {c[0], c[1]} != pair],
        [c for c in cands if (c[2] in ("left of", "right of")) != horizontal],
        [c for c in cands if c != first],
    ]
    rest = next(t for t in tiers if t)  # 2 objects always give the reversed caption
    return [first, rest[int(rng.integers(len(rest)))]]


def _sample_regions(rng: np.random.Generator, scene: list[_Obj]) -> _Regions:
    n_obj = len(scene)
    feat = np.zeros((n_obj, FEATURE_DIM), dtype=np.float32)
    for i, o in enumerate(scene):
        feat[i, o.colour] = 1.0
        feat[i, len(COLOURS) + o.shape] = 1.0
        feat[i, len(COLOURS) + len(SHAPES) + o.size] = 1.0
    feat += rng.normal(0.0, OBJECT_NOISE, size=feat.shape).astype(np.float32)
    k = int(rng.integers(1, 3))
    distractors = rng.normal(0.0, DISTRACTOR_NOISE, size=(k, FEATURE_DIM)).astype(np.float32)
    wh = rng.integers(3, 9, size=(k, 2))
    xy = rng.integers(0, IMAGE_SIZE - wh + 1)
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    return _Regions(feat=np.concatenate([feat, distractors]), distractor_boxes=boxes)


def _layout(rng: np.random.Generator, scene: list[_Obj], regions: _Regions) -> tuple[np.ndarray, np.ndarray]:
    """Features (float16) and boxes of one image, in a fresh random order."""
    boxes = np.concatenate([np.array([o.box for o in scene], dtype=np.float32), regions.distractor_boxes])
    perm = rng.permutation(len(boxes))
    return regions.feat[perm].astype(np.float16), boxes[perm]


def _render(scene: list[_Obj], background: int) -> bytes:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for o in scene:
        x1, y1, x2, y2 = o.box
        r, b = x2 - 1, y2 - 1  # PIL includes the end pixel
        cx, cy = (x1 + r) / 2, (y1 + b) / 2
        fill = COLOURS[COLOUR_NAMES[o.colour]]
        shape = SHAPES[o.shape]
        if shape == "circle":
            draw.ellipse((x1, y1, r, b), fill=fill)
        elif shape == "square":
            draw.rectangle((x1, y1, r, b), fill=fill)
        elif shape == "triangle":
            draw.polygon([(x1, b), (r, b), (cx, y1)], fill=fill)
        else:
            draw.polygon([(cx, y1), (r, cy), (cx, b), (x1, cy)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_Sample = tuple[str, dict[str, Any], bytes, np.ndarray, np.ndarray]


def _meta(split: str, index: int, captions: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "image_id": f"demo-{sample_key(split, index)}",
        "split": split,
        "width": IMAGE_SIZE,
        "height": IMAGE_SIZE,
        "captions": captions,
        **extra,
    }


def _scene_samples(rng: np.random.Generator, split: str, n: int) -> Iterator[_Sample]:
    # For evaluation splits a new scene is rejected if one of its captions is
    # true of an earlier scene or an earlier caption is true of it.
    unique = split in _UNIQUE_SPLITS
    seen_true: set[_Triple] = set()
    used: set[_Triple] = set()
    for index in range(n):
        for _ in range(_MAX_REJECTIONS):
            scene = _sample_scene(rng)
            picks = _pick_captions(rng, scene)
            triples = [(scene[i].phrase, rel, scene[j].phrase) for i, j, rel in picks]
            if not unique:
                break
            true_here = {(scene[i].phrase, rel, scene[j].phrase) for i, j, rel in _true_triples(scene)}
            if not (set(triples) & seen_true) and not (true_here & used):
                seen_true |= true_here
                used |= set(triples)
                break
        else:
            raise RuntimeError(f"could not draw {n} unambiguous {split} scenes; use a smaller split")
        captions = [_caption(scene[i], rel, scene[j]) for i, j, rel in picks]
        background = int(rng.integers(225, 251))
        feat, boxes = _layout(rng, scene, _sample_regions(rng, scene))
        yield sample_key(split, index), _meta(split, index, captions), _render(scene, background), feat, boxes


def _swap_samples(rng: np.random.Generator, split: str, n_groups: int) -> Iterator[_Sample]:
    for group in range(n_groups):
        scene = _sample_scene(rng)
        x, y = (int(i) for i in rng.choice(len(scene), size=2, replace=False))
        rels = _relations(scene[x], scene[y])
        rel = rels[int(rng.integers(len(rels)))]
        # Image 1: X and Y trade cells (each keeps its own jitter), so "Y rel X"
        # holds there and "X rel Y" does not; everything else is unchanged.
        swapped = list(scene)
        swapped[x] = replace(scene[x], row=scene[y].row, col=scene[y].col)
        swapped[y] = replace(scene[y], row=scene[x].row, col=scene[x].col)
        captions = [_caption(scene[x], rel, scene[y]), _caption(scene[y], rel, scene[x])]
        background = int(rng.integers(225, 251))
        # Same object and distractor features in both images: only geometry differs.
        regions = _sample_regions(rng, scene)
        for i, objs in enumerate((scene, swapped)):
            index = 2 * group + i
            feat, boxes = _layout(rng, objs, regions)
            meta = _meta(split, index, [captions[i]], swap={"group": group, "index": i})
            yield sample_key(split, index), meta, _render(objs, background), feat, boxes


def _params(**kwargs: int) -> dict[str, int]:
    return {"version": DEMO_VERSION, **kwargs}


def _read_manifest(root: Path) -> Manifest | None:
    try:
        return Manifest.read(root)
    except FileNotFoundError:
        return None
    except ManifestError:
        return Manifest(generator="?")


def make_demo(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 100,
    n_test: int = 100,
    n_swap_groups: int = 100,
    shard_size: int = 500,
    overwrite: bool = False,
) -> Path:
    """Generate the demo data set in ``out_dir`` (idempotent) and return ``out_dir``.

    Returns at once when ``out_dir/manifest.json`` records the same parameters; other parameters
    raise FileExistsError unless ``overwrite``. The data set is written into a private folder beside
    ``out_dir`` and renamed into place, so readers (and other nodes of a shared file system) see
    either nothing or the whole data set, and two writers racing leave one complete copy.
    """
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1 (the tokenizer is trained on it), got {n_train}")
    for name, value in (("n_val", n_val), ("n_test", n_test), ("n_swap_groups", n_swap_groups)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    out = Path(out_dir)
    params = _params(
        seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, n_swap_groups=n_swap_groups, shard_size=shard_size
    )
    old = _read_manifest(out)
    if old is not None:
        if old.generator != GENERATOR:
            raise FileExistsError(f"{out} holds a data set not made by the demo generator; refusing to touch it")
        if old.params == params:
            return out
        if not overwrite:
            raise FileExistsError(f"{out} holds demo data with params {old.params}, not {params}; pass overwrite=True")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the data set is read by every rank and user
    try:
        _write_demo(staging, seed, params, n_train, n_val, n_test, n_swap_groups, shard_size)
        _install(staging, out, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _install(staging: Path, out: Path, params: dict[str, Any]) -> None:
    """Move a complete data set into place with renames only (atomic on one file system)."""
    try:
        os.rename(staging, out)  # fails if ``out`` exists (even empty on some systems)
        return
    except OSError:
        pass
    current = _read_manifest(out)
    if current is not None and current.generator == GENERATOR and current.params == params:
        return  # another process installed the same data set first
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, aside)  # an interrupted or outdated data set: replaced whole
    os.rename(staging, out)
    shutil.rmtree(aside, ignore_errors=True)


def _write_demo(out: Path, seed: int, params: dict[str, Any], n_train: int, n_val: int, n_test: int,
                n_swap_groups: int, shard_size: int) -> None:
    seeds = np.random.SeedSequence(seed).spawn(len(SPLITS))
    rngs = {split: np.random.Generator(np.random.PCG64(s)) for split, s in zip(SPLITS, seeds, strict=True)}
    sources: dict[str, Iterator[_Sample]] = {
        "train": _scene_samples(rngs["train"], "train", n_train),
        "val": _scene_samples(rngs["val"], "val", n_val),
        "test": _scene_samples(rngs["test"], "test", n_test),
        "swap": _swap_samples(rngs["swap"], "swap", n_swap_groups),
    }
    counts: dict[str, int] = {}
    train_captions: list[str] = []
    for split, samples in sources.items():
        with ShardWriter(out / split, shard_size=shard_size, overwrite=True) as writer:
            for key, meta, image, feat, boxes in samples:
                writer.write(key, meta, image=image, image_ext="png", feat=feat, boxes=boxes)
                if split == "train":
                    train_captions.extend(meta["captions"])
        counts[split] = writer.n_samples
    train_wordpiece(train_captions, out / TOKENIZER_DIR)
    Manifest(splits=counts, feature_dim=FEATURE_DIM, generator=GENERATOR, params=params).write(out)
