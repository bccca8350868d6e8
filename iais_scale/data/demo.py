"""Synthetic demo data set: 2-4 coloured shapes on a 3x3 grid (``scenes.py``), two captions per image
naming two objects and one true relation ("a small red circle left of a large blue square"); the
``swap`` split holds Winoground-style pairs that differ only in the argument order of the relation.
Everything is a pure function of ``seed`` (one child seed per split): equal parameters give
byte-identical shards, and changing one split's size leaves the others unchanged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import scenes as sc
from .format import MANIFEST_FILE, sample_key

log = logging.getLogger(__name__)

# Bump when the generated data changes, so cached demo sets are regenerated.
DEMO_VERSION = 1
GENERATOR = "demo"
SPLITS: tuple[str, ...] = ("train", "val", "test", "swap")
# Splits used for retrieval evaluation, where a caption must be true of its own
# image only; otherwise a "wrong" retrieval could be correct.
_UNIQUE_SPLITS = frozenset({"val", "test"})

PALETTE = sc.Palette(n_colours=6, n_shapes=4, feature_dim=16)
COLOURS, SHAPES, FEATURE_DIM, SIZES = PALETTE.colours, PALETTE.shapes, PALETTE.feature_dim, sc.SIZES
__all__ = ["COLOURS", "FEATURE_DIM", "SHAPES", "SIZES", "SPLITS", "make_demo"]


def _pick_captions(rng: np.random.Generator, scene: list[sc.Obj]) -> list[tuple[int, int, str]]:
    """Two different true captions, preferring a different object pair, then a different axis."""
    cands = sc.true_relations(scene)
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


def _meta(split: str, index: int, captions: list[str], **extra: Any) -> dict[str, Any]:
    return {"image_id": f"demo-{sample_key(split, index)}", "split": split, "width": sc.IMAGE_SIZE,
            "height": sc.IMAGE_SIZE, "captions": captions, **extra}


def _text(scene: list[sc.Obj], i: int, rel: str, j: int) -> str:
    return sc.caption((scene[i].phrase, rel, scene[j].phrase))[0]


def _scene_samples(rng: np.random.Generator, split: str, n: int) -> Iterator[sc.Sample]:
    # For evaluation splits a new scene is rejected if one of its captions is
    # true of an earlier scene or an earlier caption is true of it.
    unique = split in _UNIQUE_SPLITS
    seen_true: set[sc.Triple] = set()
    used: set[sc.Triple] = set()
    for index in range(n):
        for _ in range(sc.MAX_REJECTIONS):
            scene = sc.sample_scene(rng, PALETTE)
            picks = _pick_captions(rng, scene)
            triples = [(scene[i].phrase, rel, scene[j].phrase) for i, j, rel in picks]
            if not unique:
                break
            true_here = {(scene[i].phrase, rel, scene[j].phrase) for i, j, rel in sc.true_relations(scene)}
            if not (set(triples) & seen_true) and not (true_here & used):
                seen_true |= true_here
                used |= set(triples)
                break
        else:
            raise RuntimeError(f"could not draw {n} unambiguous {split} scenes; use a smaller split")
        captions = [_text(scene, i, rel, j) for i, j, rel in picks]
        background = int(rng.integers(225, 251))
        feat, boxes = sc.layout(rng, scene, sc.sample_regions(rng, PALETTE, scene))
        yield sample_key(split, index), _meta(split, index, captions), sc.render(scene, background), feat, boxes


def _swap_samples(rng: np.random.Generator, split: str, n_groups: int) -> Iterator[sc.Sample]:
    """Winoground-style pairs: image 1 is image 0 with X and Y trading cells, so "Y rel X" holds there
    and "X rel Y" does not."""
    for group in range(n_groups):
        scene = sc.sample_scene(rng, PALETTE)
        x, y = (int(i) for i in rng.choice(len(scene), size=2, replace=False))
        rels = sc.relations_between(scene[x], scene[y])
        rel = rels[int(rng.integers(len(rels)))]
        swapped = sc.swap_cells(scene, x, y)
        captions = [_text(scene, x, rel, y), _text(scene, y, rel, x)]
        background = int(rng.integers(225, 251))
        regions = sc.sample_regions(rng, PALETTE, scene)  # the same features in both images: only geometry differs
        for i, objs in enumerate((scene, swapped)):
            index = 2 * group + i
            feat, boxes = sc.layout(rng, objs, regions)
            meta = _meta(split, index, [captions[i]], swap={"group": group, "index": i})
            yield sample_key(split, index), meta, sc.render(objs, background), feat, boxes


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
    """Generate the demo data set in ``out_dir`` (idempotent, atomic: ``scenes.generate``); return it."""
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1 (the tokenizer is trained on it), got {n_train}")
    for name, value in (("n_val", n_val), ("n_test", n_test), ("n_swap_groups", n_swap_groups)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    params = {"version": DEMO_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test,
              "n_swap_groups": n_swap_groups, "shard_size": shard_size}

    def write(folder: Path) -> None:
        rngs = sc.split_rngs(seed, SPLITS)
        sources = {
            "train": _scene_samples(rngs["train"], "train", n_train),
            "val": _scene_samples(rngs["val"], "val", n_val),
            "test": _scene_samples(rngs["test"], "test", n_test),
            "swap": _swap_samples(rngs["swap"], "swap", n_swap_groups),
        }
        sc.write_splits(folder, sources, shard_size=shard_size, feature_dim=FEATURE_DIM, generator=GENERATOR,
                     params=params)

    return sc.generate(out_dir, GENERATOR, params, write, overwrite=overwrite)


def ensure_demo(root: str | os.PathLike[str], rank: int, timeout_s: float = 600.0) -> None:
    """The demo data set at ``root``, made when missing: global rank 0 writes it (atomically, see
    ``make_demo``); every other rank, on any node of a shared file system, waits for its manifest."""
    root = Path(root)
    if (root / MANIFEST_FILE).is_file():
        return
    if rank == 0:
        log.info("demo shards missing under %s: generating them", root)
        make_demo(root)
        return
    deadline = time.time() + timeout_s
    while not (root / MANIFEST_FILE).is_file():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout_s / 60:.0f} minutes for rank 0 to write the demo data into {root}")
        time.sleep(1)
