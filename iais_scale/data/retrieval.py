"""Evaluation sets read from shards: all images with all their captions, and relation-swap groups."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .pipeline import read_shard, split_shards
from .samples import BadSample, ImageSample, decode_sample

log = logging.getLogger(__name__)


def read_split(
    split_dir: str | Path, *, max_regions: int | None = None, limit: int | None = None, image_input: str = "regions"
) -> list[ImageSample]:
    """Every good sample of a split, in shard order; bad ones are skipped, counted and logged.
    ``image_input="patches"`` keeps each sample's image bytes for the collator to decode."""
    urls, _ = split_shards(split_dir)
    bad: Counter[str] = Counter()
    samples = []
    for raw in (raw for url in urls for raw in read_shard(url, counts=bad)):
        if limit is not None and len(samples) >= limit:
            break
        try:
            samples.append(decode_sample(raw, max_regions=max_regions, image_input=image_input,
                                         keep_image=image_input == "patches"))
        except BadSample as e:
            bad[e.reason] += 1
            log.warning("%s: skipped %s", split_dir, e)
    if bad:
        log.warning("%s: skipped bad samples %s", split_dir, dict(bad))
    if not samples:
        raise ValueError(f"{split_dir}: no usable samples")
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
