"""Evaluation sets read from shards: all images with all their captions, and relation-swap groups."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .image_fields import ImageFields, RegionFields
from .pipeline import DEFAULT_IO, IoOptions
from .samples import BadSample, ImageSample, decode_sample
from .shards import read_shard, resolve_split

log = logging.getLogger(__name__)


def read_split(
    spec: str | Path, fields: ImageFields | None = None, *, limit: int | None = None, io: IoOptions = DEFAULT_IO,
    counts: Counter | None = None,
) -> list[ImageSample]:
    """Every good sample of a split (a folder, URL or shard list), in shard order.

    Bad samples and repeated keys or image ids (a shard copied twice) are skipped, counted into
    ``counts`` and logged: an image listed twice would turn its own duplicate into a wrong answer.
    ``fields`` takes what each sample carries for the image (default: region features, no bound).
    """
    fields = fields or RegionFields()
    split = resolve_split(str(spec), need_sizes=False)
    bad: Counter[str] = counts if counts is not None else Counter()
    samples: list[ImageSample] = []
    first: dict[str, str] = {}
    for url in split.urls:
        if limit is not None and len(samples) >= limit:
            break
        for raw in read_shard(url, counts=bad, retries=io.retries, backoff_s=io.backoff_s,
                              max_member_bytes=io.max_member_bytes, timeout_s=io.timeout_s):
            if limit is not None and len(samples) >= limit:
                break
            try:
                sample = decode_sample(raw, fields)
            except BadSample as e:
                bad[e.reason] += 1
                log.warning("%s: skipped %s", spec, e)
                continue
            clash = first.get(f"key:{sample.key}") or first.get(f"id:{sample.image_id}")
            if clash is not None:
                bad["duplicate_sample"] += 1
                log.warning("%s: skipped %s (%s): its key or image id was already read from %s", spec, sample.key, url,
                            clash)
                continue
            first[f"key:{sample.key}"] = first[f"id:{sample.image_id}"] = url
            samples.append(sample)
    if bad:
        log.warning("%s: skipped bad samples %s", spec, dict(bad))
    if not samples:
        raise ValueError(f"{spec}: no usable samples")
    return samples


@dataclass
class RetrievalSet:
    """Images and captions of a retrieval evaluation; ``caption_image[c]`` is the image of caption c."""

    images: list[ImageSample]
    captions: list[str]
    caption_image: torch.Tensor  # [n_captions] long

    @classmethod
    def from_samples(cls, images: list[ImageSample]) -> RetrievalSet:
        captions, owner = [], []
        for i, s in enumerate(images):
            captions += s.captions
            owner += [i] * len(s.captions)
        return cls(images, captions, torch.tensor(owner, dtype=torch.long))


@dataclass
class SwapGroup:
    """Winoground format: caption i describes image i; the two differ only in a relation."""

    images: tuple[ImageSample, ImageSample]
    captions: tuple[str, str]


def swap_groups(samples: list[ImageSample]) -> list[SwapGroup]:
    groups: dict[int, dict[int, ImageSample]] = {}
    for s in samples:
        swap = s.meta.get("swap")
        if swap is None:
            raise ValueError(f"{s.key}: not a relation-swap sample (no 'swap' field)")
        groups.setdefault(swap["group"], {})[swap["index"]] = s
    incomplete = [g for g, members in groups.items() if set(members) != {0, 1}]
    if incomplete:
        raise ValueError(f"relation-swap groups without both members: {incomplete[:10]}")
    return [
        SwapGroup((m[0], m[1]), (m[0].captions[0], m[1].captions[0]))
        for _, m in sorted(groups.items())
    ]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [A, B] of boxes ``[A, 4]`` and ``[B, 4]`` given as ``x1, y1, x2, y2`` (any common frame)."""
    a = np.asarray(a, np.float64)[:, None]
    b = np.asarray(b, np.float64)[None]
    iw = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(0)
    ih = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]).clip(0) * (a[..., 3] - a[..., 1]).clip(0)
    area_b = (b[..., 2] - b[..., 0]).clip(0) * (b[..., 3] - b[..., 1]).clip(0)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def best_region(regions: np.ndarray, boxes: list) -> int:
    """Index of the region (``[R, 4]`` normalised boxes) with the highest IoU with any of ``boxes``;
    -1 when no region overlaps any of them (an alignment by IoU 0 would be arbitrary)."""
    if not len(regions) or not len(boxes):
        return -1
    iou = box_iou(regions, np.asarray(boxes, np.float64).reshape(-1, 4)).max(1)
    best = int(iou.argmax())
    return best if iou[best] > 0 else -1
