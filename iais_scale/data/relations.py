"""Synthetic relation benchmark: scenes whose captions can only be matched through their spatial relation.

The demo data (``demo.py``) teaches objects: a model that ignores the relation word still ranks most
captions correctly. Here the relation is decisive (the scene primitives are ``scenes.py``, with a larger
vocabulary: 8 colours x 6 shapes x 2 sizes, 96 object phrases). No augmentation touches the data (a
horizontal flip would turn "left of" into "right of").

* **train**: ``n_train_pairs`` swap pairs, images ``2g`` and ``2g + 1``: image 1 is image 0 with two
  named objects X, Y trading cells (the same region features; only boxes and region order differ).
  Each image has two relation captions true of it and false of its partner, so the partner carries both
  kinds of hard negative (argument swap, relation-word swap), and a placement caption, also false of
  the partner ("a red circle on the left": which region a phrase names and where it is; without them
  the benchmark's small models never learned relations, docs/results.md). Meta ``pair: {"group": g,
  "index": i}``.
* **val / test**: independent scenes, no caption true of any other image of the split (exact
  retrieval ground truth); 96 phrases give 36,480 possible captions, room for 1,000+ images.
* **swap**: Winoground groups (``swap`` format of docs/data-format.md): caption 0 is "X rel Y",
  caption 1 with equal odds the argument swap "Y rel X" or the relation-word swap "X opp(rel) Y"
  (``swap_kind``); image 1 has X and Y in each other's cells.
* Every sample carries ``relation_spans``, one ``[start, end]`` character span per caption marking its
  relation phrase (or placement word), for the relation-word MLM probe of ``iais_scale.evaluate``, and
  ``caption_kinds`` ("relation" or "placement" per caption).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .format import sample_key
from .scenes import (
    GRID,
    IMAGE_SIZE,
    MAX_REJECTIONS,
    OPPOSITE,
    Obj,
    Palette,
    Sample,
    Triple,
    caption,
    generate,
    layout,
    relations_between,
    render,
    sample_regions,
    sample_scene,
    split_rngs,
    swap_cells,
    true_relations,
    write_splits,
)

RELATIONS_VERSION = 2  # 2: a placement caption per training image
GENERATOR = "relations"
SPLITS: tuple[str, ...] = ("train", "val", "test", "swap")
PALETTE = Palette(n_colours=8, n_shapes=6, feature_dim=16)
COLOURS, SHAPES, FEATURE_DIM = PALETTE.colours, PALETTE.shapes, PALETTE.feature_dim


def true_triples(scene: list[Obj]) -> set[Triple]:
    """Every caption triple true of the scene."""
    return {(scene[i].phrase, rel, scene[j].phrase) for i, j, rel in true_relations(scene)}


def placements(o: Obj) -> list[str]:
    """Where an object sits in the image: "on the left" / "on the right" (outer columns), "at the top" /
    "at the bottom" (outer rows); none in the middle cell."""
    out = []
    if o.col != GRID // 2:
        out.append("on the left" if o.col == 0 else "on the right")
    if o.row != GRID // 2:
        out.append("at the top" if o.row == 0 else "at the bottom")
    return out


def placement_caption(phrase: str, place: str) -> tuple[str, list[int]]:
    """"a {phrase} {place}" and the span of its last word (left/right/top/bottom), masked by the probe."""
    text = f"a {phrase} {place}"
    return text, [len(text) - len(place.rsplit(" ", 1)[1]), len(text)]


def _meta(split: str, index: int, captions: list[tuple[str, list[int]]], placement: int = 0,
          **extra: Any) -> dict[str, Any]:
    """A sample's meta; its last ``placement`` captions are placement captions."""
    texts, spans = zip(*captions, strict=True)
    kinds = ["relation"] * (len(texts) - placement) + ["placement"] * placement
    return {"image_id": f"relations-{sample_key(split, index)}", "split": split, "width": IMAGE_SIZE,
            "height": IMAGE_SIZE, "captions": list(texts), "relation_spans": list(spans), "caption_kinds": kinds,
            **extra}


def _pair_samples(rng: np.random.Generator, split: str, n_pairs: int, objects: tuple[int, int]) -> Iterator[Sample]:
    """Training pairs: two images differing only in the cells of two named objects, each with two
    captions true of it and false of its partner."""
    for group in range(n_pairs):
        scene = sample_scene(rng, PALETTE, *objects)
        x, y = (int(i) for i in rng.choice(len(scene), size=2, replace=False))
        swapped = swap_cells(scene, x, y)
        truth = [true_triples(scene), true_triples(swapped)]
        names = {scene[x].phrase, scene[y].phrase}
        regions = sample_regions(rng, PALETTE, scene)
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
            # A placement of X or Y that the partner does not share ("a red circle on the left"): it names
            # one object and where it is, the first step to relations (docs/results.md).
            partner = (swapped, scene)[i]
            places = [(objs[k].phrase, p) for k in (x, y) for p in placements(objs[k]) if p not in placements(partner[k])]
            third = [placement_caption(*places[int(rng.integers(len(places)))])] if places else []
            index = 2 * group + i
            feat, boxes = layout(rng, objs, regions)
            meta = _meta(split, index, [caption(first), caption(second), *third], placement=len(third),
                         pair={"group": group, "index": i})
            yield sample_key(split, index), meta, render(objs, background), feat, boxes


def _scene_samples(rng: np.random.Generator, split: str, n: int, captions_per_image: int,
                   objects: tuple[int, int]) -> Iterator[Sample]:
    """Independent scenes; no caption is true of any other image of the split."""
    seen_true: set[Triple] = set()  # every triple true of an earlier image
    used: set[Triple] = set()  # every caption of an earlier image
    for index in range(n):
        for _ in range(MAX_REJECTIONS):
            scene = sample_scene(rng, PALETTE, *objects)
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
        feat, boxes = layout(rng, scene, sample_regions(rng, PALETTE, scene))
        yield sample_key(split, index), _meta(split, index, [caption(t) for t in picks]), render(scene, background), feat, boxes


def _swap_samples(rng: np.random.Generator, split: str, n_groups: int, objects: tuple[int, int]) -> Iterator[Sample]:
    for group in range(n_groups):
        scene = sample_scene(rng, PALETTE, *objects)
        x, y = (int(i) for i in rng.choice(len(scene), size=2, replace=False))
        rels = relations_between(scene[x], scene[y])
        rel = rels[int(rng.integers(len(rels)))]
        swapped = swap_cells(scene, x, y)
        kind = "argument" if rng.random() < 0.5 else "relation"
        c0 = (scene[x].phrase, rel, scene[y].phrase)
        c1 = (scene[y].phrase, rel, scene[x].phrase) if kind == "argument" else (scene[x].phrase, OPPOSITE[rel],
                                                                                  scene[y].phrase)
        regions = sample_regions(rng, PALETTE, scene)  # the same features in both images: only geometry differs
        background = int(rng.integers(225, 251))
        for i, (objs, t) in enumerate(((scene, c0), (swapped, c1))):
            index = 2 * group + i
            feat, boxes = layout(rng, objs, regions)
            meta = _meta(split, index, [caption(t)], swap={"group": group, "index": i}, swap_kind=kind)
            yield sample_key(split, index), meta, render(objs, background), feat, boxes


def make_relations(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train_pairs: int = 2000,
    n_val: int = 200,
    n_test: int = 1000,
    n_swap_groups: int = 1000,
    captions_per_image: int = 1,
    min_objects: int = 2,
    max_objects: int = 4,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> Path:
    """Generate the relation benchmark in ``out_dir`` (idempotent, atomic: ``scenes.generate``).

    ``captions_per_image`` applies to ``val`` and ``test`` (training images have 2, swap images 1).
    """
    if n_train_pairs < 1:
        raise ValueError(f"n_train_pairs must be >= 1 (the tokenizer is trained on it), got {n_train_pairs}")
    for name, value in (("n_val", n_val), ("n_test", n_test), ("n_swap_groups", n_swap_groups)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if not 2 <= min_objects <= max_objects <= GRID * GRID:
        raise ValueError(f"need 2 <= min_objects <= max_objects <= {GRID * GRID}, got {min_objects}, {max_objects}")
    params = {"version": RELATIONS_VERSION, "seed": seed, "n_train_pairs": n_train_pairs, "n_val": n_val,
              "n_test": n_test, "n_swap_groups": n_swap_groups, "captions_per_image": captions_per_image,
              "min_objects": min_objects, "max_objects": max_objects, "shard_size": shard_size}

    def write(folder: Path) -> None:
        rngs = split_rngs(seed, SPLITS)
        objects = (min_objects, max_objects)
        sources = {
            "train": _pair_samples(rngs["train"], "train", n_train_pairs, objects),
            "val": _scene_samples(rngs["val"], "val", n_val, captions_per_image, objects),
            "test": _scene_samples(rngs["test"], "test", n_test, captions_per_image, objects),
            "swap": _swap_samples(rngs["swap"], "swap", n_swap_groups, objects),
        }
        write_splits(folder, sources, shard_size=shard_size, feature_dim=FEATURE_DIM, generator=GENERATOR,
                     params=params)

    return generate(out_dir, GENERATOR, params, write, overwrite=overwrite)
