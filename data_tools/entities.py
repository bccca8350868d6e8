"""``data_tools entities``: Flickr30k Entities phrase boxes -> the ``phrases`` of a data set's samples.

Reads ``Annotations/{image_id}.xml`` (PASCAL-VOC-like: ``<size>``, ``<object>`` with one or more
``<name>`` entity ids and a ``<bndbox>``, or ``<nobndbox>``/``<scene>`` without a box) and
``Sentences/{image_id}.txt`` (one caption per line, phrases marked ``[/EN#18/people A man]``) and
rewrites the shards of an existing data set with each sample's ``phrases``: character spans into
its own captions plus the entity's boxes normalised by the image size. A sentence is matched to
the caption that equals its markup-free text up to whitespace and case; others are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iais_scale.data import shards
from iais_scale.data.format import (
    BOXES_EXT,
    FEAT_EXT,
    GEOMETRY_EXT,
    IMAGE_EXTS,
    JSON_EXT,
    SIZES_FILE,
    Manifest,
    ShardWriter,
    decode_npy,
    read_sizes,
    validate_sample,
)

MAX_FILE_BYTES = 4 << 20  # an annotation or sentence file is a few KB; anything huge is not one
STAGING_DIR = ".entities-staging"
_PHRASE_START = re.compile(r"^\[/EN#([^/\s\]]+)((?:/[^/\s\]]*)*)$")


@dataclass
class Phrase:
    start: int  # character offsets into the sentence's markup-free text
    end: int
    entity: str
    types: list[str]


@dataclass
class Sentence:
    text: str
    phrases: list[Phrase] = field(default_factory=list)


def parse_sentence(line: str) -> Sentence:
    """One line of ``Sentences/*.txt``: the text without markup and its phrases' character spans.

    Tokens are whitespace-separated as in the official parser; a ``[/EN#id/type`` token opens a
    phrase that the next token ending in ``]`` closes. A bracket that opens nothing stays text;
    a phrase left open at the end of the line closes there.
    """
    words: list[str] = []
    phrases: list[Phrase] = []
    pos = 0
    open_phrase: tuple[int, str, list[str]] | None = None  # (start, entity, types)
    for token in line.split():
        if open_phrase is None:
            m = _PHRASE_START.match(token)
            if m:
                open_phrase = (pos + (1 if words else 0), m.group(1), [t for t in m.group(2).split("/") if t])
                continue
        closes = open_phrase is not None and token.endswith("]")
        word = token[:-1] if closes else token
        if word:
            pos += (1 if words else 0) + len(word)
            words.append(word)
        if closes and open_phrase is not None:
            start, entity, types = open_phrase
            if pos > start:
                phrases.append(Phrase(start, pos, entity, types))
            open_phrase = None
    if open_phrase is not None and pos > open_phrase[0]:
        phrases.append(Phrase(open_phrase[0], pos, open_phrase[1], open_phrase[2]))
    return Sentence(" ".join(words), phrases)


@dataclass
class Annotation:
    width: int
    height: int
    boxes: dict[str, list[list[float]]]  # entity id -> normalised [x1, y1, x2, y2] boxes


def parse_annotation(data: bytes) -> Annotation:
    """``Annotations/*.xml`` -> the image size and each entity's boxes normalised to [0, 1].

    Coordinates are 1-based inclusive pixels (the official reader subtracts 1): a box covers
    ``xmin - 1 .. xmax`` as exclusive edges, divided by the width (height for y).
    """
    root = ET.fromstring(data)
    size = root.find("size")
    width = int(float(size.findtext("width", "0"))) if size is not None else 0
    height = int(float(size.findtext("height", "0"))) if size is not None else 0
    if width <= 0 or height <= 0:
        raise ValueError(f"no positive <size> ({width}x{height})")
    boxes: dict[str, list[list[float]]] = {}
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue  # <nobndbox>/<scene>: an entity without a box
        xmin, ymin, xmax, ymax = (float(box.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))
        if not all(np.isfinite([xmin, ymin, xmax, ymax])) or xmax < xmin or ymax < ymin:
            continue
        norm = [(xmin - 1) / width, (ymin - 1) / height, xmax / width, ymax / height]
        norm = [round(min(1.0, max(0.0, v)), 6) for v in norm]
        for name in obj.iter("name"):
            if name.text and name.text.strip():
                boxes.setdefault(name.text.strip(), []).append(norm)
    return Annotation(width, height, boxes)


def _compact(text: str) -> list[tuple[int, str]]:
    """(index, lower-cased character) of every non-space character."""
    return [(i, ch.lower()) for i, ch in enumerate(text) if not ch.isspace()]


def match_phrases(sentences: list[Sentence], captions: list[str], boxes: dict[str, list[list[float]]],
                  counts: Counter) -> list[dict[str, Any]]:
    """The ``phrases`` field: each sentence's boxed phrases moved onto the caption it equals."""
    compact = [_compact(c) for c in captions]
    used: set[int] = set()
    out: list[dict[str, Any]] = []
    for s in sentences:
        sc = _compact(s.text)
        key = [ch for _, ch in sc]
        j = next((j for j, cc in enumerate(compact) if j not in used and [ch for _, ch in cc] == key), None)
        if j is None:
            counts["unmatched_sentences"] += 1
            continue
        used.add(j)
        counts["matched_captions"] += 1
        # Character k of the sentence's text is non-space character rank[k] of both texts.
        rank = {i: r for r, (i, _) in enumerate(sc)}
        for ph in s.phrases:
            inside = [rank[i] for i in range(ph.start, ph.end) if i in rank]
            entity_boxes = boxes.get(ph.entity)
            if not inside or not entity_boxes:
                counts["phrases_without_box"] += 1
                continue
            start, end = compact[j][inside[0]][0], compact[j][inside[-1]][0] + 1
            out.append({"caption": j, "start": start, "end": end, "boxes": entity_boxes, "entity": ph.entity})
            counts["phrases"] += 1
    return out


def _read_small(path: Path) -> bytes:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path.stat().st_size} bytes: not an annotation file")
    return path.read_bytes()


def _candidates(image_id: str) -> list[str]:
    """File stems to try for a sample's image id: itself, then its trailing digits without leading zeros."""
    out = [image_id]
    m = re.search(r"(\d+)$", image_id)
    if m:
        out.append(m.group(1).lstrip("0") or "0")
    return out


class Entities:
    """The annotation folders, read lazily per image."""

    def __init__(self, annotations: str | Path, sentences: str | Path):
        self.annotations, self.sentences = Path(annotations), Path(sentences)
        for p, opt in ((self.annotations, "--annotations"), (self.sentences, "--sentences")):
            if not p.is_dir():
                raise FileNotFoundError(f"{opt} {p}: not a directory")

    def phrases(self, meta: dict[str, Any], counts: Counter, notes: list[str]) -> tuple[list | None, Annotation | None]:
        """(phrases, annotation) of one sample, (None, None) when it has no annotation files."""
        stem = next((s for s in _candidates(meta["image_id"]) if (self.sentences / f"{s}.txt").is_file()
                     and (self.annotations / f"{s}.xml").is_file()), None)
        if stem is None:
            counts["missing_annotations"] += 1
            return None, None
        try:
            ann = parse_annotation(_read_small(self.annotations / f"{stem}.xml"))
            text = _read_small(self.sentences / f"{stem}.txt").decode("utf-8")
        except Exception as e:  # ParseError, ValueError, UnicodeDecodeError, OSError
            counts["bad_annotations"] += 1
            notes.append(f"{meta['image_id']}: {stem}: {type(e).__name__}: {e}")
            return None, None
        sentences = [parse_sentence(line) for line in text.splitlines() if line.strip()]
        before = counts["unmatched_sentences"]
        phrases = match_phrases(sentences, list(meta["captions"]), ann.boxes, counts)
        if counts["unmatched_sentences"] > before:
            notes.append(f"{meta['image_id']}: {counts['unmatched_sentences'] - before} sentence(s) match no caption")
        counts["annotated_samples"] += 1
        return phrases, ann


def _rewrite(raw: dict, meta: dict[str, Any], writer: ShardWriter) -> None:
    image_ext = next((e for e in IMAGE_EXTS if e in raw), "png")
    arrays = {ext: decode_npy(raw[ext]) for ext in (FEAT_EXT, BOXES_EXT, GEOMETRY_EXT) if ext in raw}
    writer.write(raw["__key__"], meta, image=raw.get(image_ext), image_ext=image_ext, feat=arrays.get(FEAT_EXT),
                 boxes=arrays.get(BOXES_EXT), geometry=arrays.get(GEOMETRY_EXT))


def _new_meta(raw: dict, meta: dict[str, Any], entities: Entities, counts: Counter, notes: list[str]) -> dict:
    """The sample's JSON with its phrases (replacing earlier ones), or ``meta`` unchanged without annotations."""
    phrases, ann = entities.phrases(meta, counts, notes)
    if phrases is None:
        return meta
    new = {k: v for k, v in meta.items() if k != "phrases"}
    if phrases:
        new["phrases"] = phrases
    unsized = (new["width"], new["height"]) == (1, 1) and BOXES_EXT not in raw and not any(e in raw for e in IMAGE_EXTS)
    if ann is not None and unsized:
        new["width"], new["height"] = ann.width, ann.height  # the size was unknown so far (uniter)
    validate_sample(new)
    return new


def annotate_split(split_dir: Path, entities: Entities, out: Callable[[str], None] = print) -> Counter:
    """Rewrite the shards of one split whose samples gain or change ``phrases``; the others stay as they are."""
    counts: Counter[str] = Counter()
    notes: list[str] = []
    sizes = read_sizes(split_dir)
    staging = split_dir.parent / STAGING_DIR / split_dir.name
    allowed = {"__key__", "__url__", "__index__", JSON_EXT, *IMAGE_EXTS, FEAT_EXT, BOXES_EXT, GEOMETRY_EXT}
    try:
        for name, n in sizes.items():
            path = split_dir / name
            # Two passes, so that a shard's arrays are never all in memory: the JSONs first.
            metas: list[dict[str, Any]] = []
            changed, rewritable = False, True
            with open(path, "rb") as f:
                for raw in shards.iter_samples(f, str(path)):
                    counts["samples"] += 1
                    try:
                        meta = json.loads(raw[JSON_EXT])
                        validate_sample(meta)
                    except (KeyError, ValueError) as e:
                        counts["bad_samples"] += 1
                        notes.append(f"{name}:{raw['__key__']}: {type(e).__name__}: {e}")
                        rewritable = False
                        continue
                    rewritable &= not (set(raw) - allowed)
                    new = _new_meta(raw, meta, entities, counts, notes)
                    changed |= new != meta
                    metas.append(new)
            if not changed:
                continue
            if not rewritable or len(metas) != n:
                counts["shards_not_rewritten"] += 1
                notes.append(f"{name}: bad samples, unexpected members or a wrong count; left as it is")
                continue
            # One staging shard per shard, renamed over the original: other shards are never touched.
            with open(path, "rb") as f, ShardWriter(staging, shard_size=max(1, n), overwrite=True) as writer:
                for raw, meta in zip(shards.iter_samples(f, str(path)), metas, strict=True):
                    _rewrite(raw, meta, writer)
            os.replace(staging / "shard-000000.tar", path)
            counts["shards_rewritten"] += 1
    finally:
        shutil.rmtree(split_dir.parent / STAGING_DIR, ignore_errors=True)
    for line in notes[:10]:
        out(f"  {split_dir.name}: {line}")
    if len(notes) > 10:
        out(f"  {split_dir.name}: ... {len(notes) - 10} more")
    return counts


def annotate(data: str | Path, annotations: str | Path, sentences: str | Path, *, splits: list[str] | None = None,
             out: Callable[[str], None] = print) -> dict[str, dict[str, int]]:
    """Add ``phrases`` to the samples of ``splits`` (default: all) of the data set ``data``; returns counts."""
    root = Path(data)
    manifest = Manifest.read(root)
    entities = Entities(annotations, sentences)
    names = splits or list(manifest.splits)
    missing = [s for s in names if not (root / s / SIZES_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: no split(s) {missing} (with {SIZES_FILE})")
    report = {}
    for split in names:
        counts = annotate_split(root / split, entities, out)
        report[split] = dict(sorted(counts.items()))
        out(f"{split}: {counts['annotated_samples']} of {counts['samples']} samples annotated,"
            f" {counts['matched_captions']} captions, {counts['phrases']} phrases with boxes;"
            f" {counts['unmatched_sentences']} sentence(s) matched no caption,"
            f" {counts['missing_annotations']} sample(s) without annotation files")
    previous = manifest.extra.get("phrases", {})
    done = {**(previous.get("splits", {}) if isinstance(previous, dict) else {}), **report}
    manifest.extra["phrases"] = {"source": "flickr30k_entities", "annotations": str(Path(annotations).resolve()),
                                 "sentences": str(Path(sentences).resolve()), "splits": done}
    manifest.write(root)  # last: the shards it vouches for are in place
    return report


def add_parser(sub: Any) -> None:
    p = sub.add_parser("entities", help="add Flickr30k Entities phrase boxes (for ISDa) to a data set",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="Annotations/ folder ({image_id}.xml)")
    p.add_argument("--sentences", required=True, help="Sentences/ folder ({image_id}.txt)")
    p.add_argument("--data", required=True, help="an existing data set folder (e.g. from karpathy or uniter)")
    p.add_argument("--split", action="append", help="split to annotate (repeatable; default: every split)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    annotate(args.data, args.annotations, args.sentences, splits=args.split)
    return 0
