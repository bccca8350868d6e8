"""Synthetic relation benchmark: scenes whose captions can only be matched through their spatial relation.

The demo data (``demo.py``) teaches objects: a model that ignores the relation word still ranks most
captions correctly, and its relation-swap scores stay at zero. This generator makes the relation
decisive and learnable:

* **Vocabulary.** 8 colours x 6 shapes x 2 sizes (96 object phrases), 2-4 objects per scene on the
  demo's 3x3 grid of a 64x64 image, distinct in (colour, shape). Region features are what a perfect
  detector with a little noise gives, one-hot colour [0:8], shape [8:14], size [14:16] plus
  N(0, 0.1^2) noise, with 1-2 pure-noise distractor regions, in shuffled order. The relation is
  inferable from the regions' 7-d box geometry alone: relations are those of the grid cells ("A left
  of B": A's column is left of B's; "above": A's row is above B's), and every object's box lies
  inside its cell (1 px margin), so its box centre gives its cell exactly.
* **No flips.** No augmentation touches the data (a horizontal flip would turn "left of" into
  "right of"); the model sees region features, never pixels, and nothing flips them.
* **train**: ``n_train_pairs`` swap pairs, images ``2g`` and ``2g + 1``: image 1 is image 0 with two
  named objects X, Y trading grid cells (each keeps its jitter; the same region features, only boxes
  and region order differ). Each image has two captions that are true of it and false of its
  partner ("decisive": e.g. "X left of Y" and "Y right of X" for image 0, "Y left of X" and "X right
  of Y" for image 1), so each image's partner carries both kinds of hard negative: the argument
  swap and the relation-word swap of its own caption. Meta ``pair: {"group": g, "index": i}``.
  Consecutive samples form a pair; ``benchmarks/relations.py`` batches whole pairs, so the
  ranking loss's in-batch mining always has the partner among its candidates. (The DeepSpeed
  trainer's shuffled stream meets a partner only by chance.)
* **val / test**: independent scenes, ``captions_per_image`` captions each, none true of any other
  image of the split (retrieval ground truth is exact). Sized for 1,000+ images: 96 phrases give
  36,480 possible (subject, relation, object) captions.
* **swap**: ``n_swap_groups`` Winoground groups in the ``swap`` format of docs/data-format.md (one
  caption per image, caption i true of image i only). Caption 0 is "X rel Y"; caption 1 is, with
  equal odds, the argument swap "Y rel X" (``swap_kind: "argument"``: same words, other order) or
  the relation-word swap "X opp(rel) Y" (``swap_kind: "relation"``: "left of" <-> "right of",
  "above" <-> "below"). Image 1 is image 0 with X and Y trading cells.
* **Relation spans.** Every sample carries ``relation_spans``: one ``[start, end]`` character span
  per caption, parallel to ``captions``, marking its relation phrase (``caption[start:end]`` is
  "left of", "right of", "above" or "below"). ``iais_scale.evaluate`` masks the word pieces inside
  it for the relation-word MLM probe.

Everything is a pure function of ``seed`` (one child seed per split, as in ``demo.py``).
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

RELATIONS_VERSION = 1
GENERATOR = "relations"
SPLITS: tuple[str, ...] = ("train", "val", "test", "swap")

IMAGE_SIZE = 64
GRID = 3
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 45, 175),
    "orange": (245, 130, 20),
    "pink": (245, 130, 200),
    "brown": (120, 75, 35),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES: dict[str, int] = {"small": 7, "large": 15}  # side of the bounding square, px
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
FEATURE_DIM = len(COLOURS) + len(SHAPES) + len(SIZES)  # 16
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

OBJECT_NOISE = 0.1
DISTRACTOR_NOISE = 0.3
_MAX_REJECTIONS = 10_000
_EDGES = [round(i * IMAGE_SIZE / GRID) for i in range(GRID + 1)]  # [0, 21, 43, 64]


@dataclass(frozen=True)
class Obj:
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
        """Pixel box x1, y1, x2, y2 (x2, y2 exclusive edges), inside the object's grid cell."""
        side = SIZES[SIZE_NAMES[self.size]]
        x0, x1 = _EDGES[self.col], _EDGES[self.col + 1]
        y0, y1 = _EDGES[self.row], _EDGES[self.row + 1]
        x = x0 + (x1 - x0 - side) // 2 + self.dx
        y = y0 + (y1 - y0 - side) // 2 + self.dy
        return x, y, x + side, y + side


Triple = tuple[str, str, str]  # (subject phrase, relation, object phrase)


def relations_between(a: Obj, b: Obj) -> list[str]:
    """The relations that hold for "a REL b" (objects in distinct cells: at least one)."""
    rels = []
    if a.col != b.col:
        rels.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        rels.append("above" if a.row < b.row else "below")
    return rels


def true_triples(scene: list[Obj]) -> set[Triple]:
    """Every caption triple true of the scene."""
    return {(a.phrase, rel, b.phrase) for i, a in enumerate(scene) for j, b in enumerate(scene) if i != j
            for rel in relations_between(a, b)}


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


def _jitter_range(size: int) -> int:
    # A 1 px margin to the cell edge: objects never touch or cross cells.
    side = SIZES[SIZE_NAMES[size]]
    return (min(np.diff(_EDGES)) - side) // 2 - 1


def sample_scene(rng: np.random.Generator, min_objects: int = 2, max_objects: int = 4) -> list[Obj]:
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    sizes = rng.integers(0, len(SIZES), size=n)
    scene = []
    for cell, kind, size in zip(cells, kinds, sizes, strict=True):
        j = _jitter_range(int(size))
        dx, dy = rng.integers(-j, j + 1, size=2)
        scene.append(Obj(colour=int(kind) // len(SHAPES), shape=int(kind) % len(SHAPES), size=int(size),
                         row=int(cell) // GRID, col=int(cell) % GRID, dx=int(dx), dy=int(dy)))
    return scene


@dataclass(frozen=True)
class _Regions:
    feat: np.ndarray  # [n, FEATURE_DIM] float32, object rows first
    distractor_boxes: np.ndarray  # [k, 4] float32


def _sample_regions(rng: np.random.Generator, scene: list[Obj]) -> _Regions:
    feat = np.zeros((len(scene), FEATURE_DIM), dtype=np.float32)
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


def _layout(rng: np.random.Generator, scene: list[Obj], regions: _Regions) -> tuple[np.ndarray, np.ndarray]:
    """Features (float16) and boxes of one image, in a fresh random order."""
    boxes = np.concatenate([np.array([o.box for o in scene], dtype=np.float32), regions.distractor_boxes])
    perm = rng.permutation(len(boxes))
    return regions.feat[perm].astype(np.float16), boxes[perm]


def _render(scene: list[Obj], background: int) -> bytes:
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
        elif shape == "diamond":
            draw.polygon([(cx, y1), (r, cy), (cx, b), (x1, cy)], fill=fill)
        elif shape == "cross":
            t = max(1, (r - x1) // 3)
            draw.rectangle((x1, cy - t / 2, r, cy + t / 2), fill=fill)
            draw.rectangle((cx - t / 2, y1, cx + t / 2, b), fill=fill)
        else:  # star: a five-pointed polygon
            pts = []
            for k in range(10):
                radius = (r - x1) / 2 if k % 2 == 0 else (r - x1) / 5
                angle = -np.pi / 2 + k * np.pi / 5
                pts.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
            draw.polygon(pts, fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_Sample = tuple[str, dict[str, Any], bytes, np.ndarray, np.ndarray]


def _meta(split: str, index: int, triples: list[Triple], **extra: Any) -> dict[str, Any]:
    texts, spans = zip(*(caption(t) for t in triples), strict=True)
    return {
        "image_id": f"relations-{sample_key(split, index)}",
        "split": split,
        "width": IMAGE_SIZE,
        "height": IMAGE_SIZE,
        "captions": list(texts),
        "relation_spans": list(spans),
        **extra,
    }


def _pair_samples(rng: np.random.Generator, split: str, n_pairs: int) -> Iterator[_Sample]:
    """Training pairs: two images differing only in the cells of two named objects, each with two
    captions true of it and false of its partner."""
    for group in range(n_pairs):
        scene = sample_scene(rng)
        x, y = (int(i) for i in rng.choice(len(scene), size=2, replace=False))
        swapped = swap_cells(scene, x, y)
        truth = [true_triples(scene), true_triples(swapped)]
        names = {scene[x].phrase, scene[y].phrase}
        regions = _sample_regions(rng, scene)
        background = int(rng.integers(225, 251))
        for i, objs in enumerate((scene, swapped)):
            decisive = sorted(truth[i] - truth[1 - i])
            about_xy = [t for t in decisive if {t[0], t[2]} == names]  # never empty: X and Y swapped cells
            first = about_xy[int(rng.integers(len(about_xy)))]
            # Prefer the other surface form of the same fact ("Y right of X" beside "X left of Y"), then
            # anything else decisive.
            rest = [t for t in decisive if t != first]
            mirror = [t for t in rest if (t[2], OPPOSITE[t[1]], t[0]) == first]
            pool = mirror if mirror and rng.random() < 0.5 else rest
            second = pool[int(rng.integers(len(pool)))]
            index = 2 * group + i
            feat, boxes = _layout(rng, objs, regions)
            meta = _meta(split, index, [first, second], pair={"group": group, "index": i})
            yield sample_key(split, index), meta, _render(objs, background), feat, boxes


def _scene_samples(rng: np.random.Generator, split: str, n: int, captions_per_image: int) -> Iterator[_Sample]:
    """Independent scenes; no caption is true of any other image of the split."""
    seen_true: set[Triple] = set()  # every triple true of an earlier image
    used: set[Triple] = set()  # every caption of an earlier image
    for index in range(n):
        for _ in range(_MAX_REJECTIONS):
            scene = sample_scene(rng)
            here = true_triples(scene)
            cands = sorted(here - seen_true)
            if len(cands) < captions_per_image or here & used:
                continue
            picks = [cands[int(k)] for k in rng.choice(len(cands), size=captions_per_image, replace=False)]
            seen_true |= here
            used |= set(picks)
            break
        else:
            raise RuntimeError(f"could not draw {n} unambiguous {split} scenes; use a smaller split")
        background = int(rng.integers(225, 251))
        feat, boxes = _layout(rng, scene, _sample_regions(rng, scene))
        yield sample_key(split, index), _meta(split, index, picks), _render(scene, background), feat, boxes


def _swap_samples(rng: np.random.Generator, split: str, n_groups: int) -> Iterator[_Sample]:
    for group in range(n_groups):
        scene = sample_scene(rng)
        x, y = (int(i) for i in rng.choice(len(scene), size=2, replace=False))
        rels = relations_between(scene[x], scene[y])
        rel = rels[int(rng.integers(len(rels)))]
        swapped = swap_cells(scene, x, y)
        kind = "argument" if rng.random() < 0.5 else "relation"
        c0 = (scene[x].phrase, rel, scene[y].phrase)
        c1 = (scene[y].phrase, rel, scene[x].phrase) if kind == "argument" else (scene[x].phrase, OPPOSITE[rel],
                                                                                  scene[y].phrase)
        regions = _sample_regions(rng, scene)  # the same features in both images: only geometry differs
        background = int(rng.integers(225, 251))
        for i, (objs, t) in enumerate(((scene, c0), (swapped, c1))):
            index = 2 * group + i
            feat, boxes = _layout(rng, objs, regions)
            meta = _meta(split, index, [t], swap={"group": group, "index": i}, swap_kind=kind)
            yield sample_key(split, index), meta, _render(objs, background), feat, boxes


def _read_manifest(root: Path) -> Manifest | None:
    try:
        return Manifest.read(root)
    except FileNotFoundError:
        return None
    except ManifestError:
        return Manifest(generator="?")


def make_relations(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train_pairs: int = 2000,
    n_val: int = 200,
    n_test: int = 1000,
    n_swap_groups: int = 1000,
    captions_per_image: int = 1,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> Path:
    """Generate the relation benchmark in ``out_dir`` (idempotent; same contract as ``make_demo``).

    ``captions_per_image`` applies to ``val`` and ``test`` (training images have 2, swap images 1).
    """
    if n_train_pairs < 1:
        raise ValueError(f"n_train_pairs must be >= 1 (the tokenizer is trained on it), got {n_train_pairs}")
    for name, value in (("n_val", n_val), ("n_test", n_test), ("n_swap_groups", n_swap_groups)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    out = Path(out_dir)
    params = {"version": RELATIONS_VERSION, "seed": seed, "n_train_pairs": n_train_pairs, "n_val": n_val,
              "n_test": n_test, "n_swap_groups": n_swap_groups, "captions_per_image": captions_per_image,
              "shard_size": shard_size}
    old = _read_manifest(out)
    if old is not None:
        if old.generator != GENERATOR:
            raise FileExistsError(f"{out} holds a data set not made by the relations generator; refusing to touch it")
        if old.params == params:
            return out
        if not overwrite:
            raise FileExistsError(f"{out} holds relation data with params {old.params}, not {params};"
                                  " pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)
    try:
        _write(staging, seed, params)
        _install(staging, out, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _install(staging: Path, out: Path, params: dict[str, Any]) -> None:
    """Move a complete data set into place with renames only (atomic on one file system)."""
    try:
        os.rename(staging, out)
        return
    except OSError:
        pass
    current = _read_manifest(out)
    if current is not None and current.generator == GENERATOR and current.params == params:
        return  # another process installed the same data set first
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, aside)
    os.rename(staging, out)
    shutil.rmtree(aside, ignore_errors=True)


def _write(out: Path, seed: int, params: dict[str, Any]) -> None:
    seeds = np.random.SeedSequence(seed).spawn(len(SPLITS))
    rngs = {split: np.random.Generator(np.random.PCG64(s)) for split, s in zip(SPLITS, seeds, strict=True)}
    k = params["captions_per_image"]
    sources: dict[str, Iterator[_Sample]] = {
        "train": _pair_samples(rngs["train"], "train", params["n_train_pairs"]),
        "val": _scene_samples(rngs["val"], "val", params["n_val"], k),
        "test": _scene_samples(rngs["test"], "test", params["n_test"], k),
        "swap": _swap_samples(rngs["swap"], "swap", params["n_swap_groups"]),
    }
    counts: dict[str, int] = {}
    train_captions: list[str] = []
    for split, samples in sources.items():
        with ShardWriter(out / split, shard_size=params["shard_size"], overwrite=True) as writer:
            for key, meta, image, feat, boxes in samples:
                writer.write(key, meta, image=image, image_ext="png", feat=feat, boxes=boxes)
                if split == "train":
                    train_captions.extend(meta["captions"])
        counts[split] = writer.n_samples
    train_wordpiece(train_captions, out / TOKENIZER_DIR)
    Manifest(splits=counts, feature_dim=FEATURE_DIM, generator=GENERATOR, params=params).write(out)
