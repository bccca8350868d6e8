"""Safe decoding of one shard sample, and the counted skip of bad ones.

Only JSON, text and ``.npy`` (``allow_pickle=False``) are ever decoded: nothing in a shard is
unpickled or executed, unlike webdataset's default decoders. Members with other extensions are
ignored. A sample that cannot be used raises ``BadSample`` with a short reason; the pipeline counts
the reasons and aborts once they pass the configured fraction.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import format as fmt


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is a short category for the counters."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class ImageSample:
    """One image with all its captions and its region features."""

    key: str
    image_id: str
    captions: list[str]
    width: int
    height: int
    features: np.ndarray  # [n, D] float32
    boxes: np.ndarray  # [n, 4] float32 pixels x1, y1, x2, y2
    meta: dict = field(default_factory=dict)


def load_npy(data: bytes) -> np.ndarray:
    """Decode ``.npy`` bytes; pickled object arrays are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(raw: dict, *, max_regions: int | None = None) -> ImageSample:
    """Turn the raw members of one sample (``{"__key__", "json", "feat.npy", ...}``) into a sample."""
    key = raw.get("__key__", "?")
    if fmt.JSON_EXT not in raw:
        raise BadSample("missing_json", key)
    try:
        meta = json.loads(raw[fmt.JSON_EXT])
        fmt.validate_sample(meta)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample("bad_json", f"{key}: {e}") from None
    if fmt.FEAT_EXT not in raw or fmt.BOXES_EXT not in raw:
        raise BadSample("missing_features", key)
    try:
        features, boxes = load_npy(raw[fmt.FEAT_EXT]), load_npy(raw[fmt.BOXES_EXT])
    except (ValueError, OSError, EOFError) as e:
        raise BadSample("bad_npy", f"{key}: {e}") from None
    try:
        fmt.validate_regions(features, boxes, meta["width"], meta["height"])
    except ValueError as e:
        reason = "nonfinite_features" if "NaN" in str(e) else "bad_regions"
        raise BadSample(reason, f"{key}: {e}") from None
    if max_regions is not None and features.shape[0] > max_regions:
        raise BadSample("too_many_regions", f"{key}: {features.shape[0]} > {max_regions}")
    return ImageSample(
        key=key,
        image_id=meta["image_id"],
        captions=list(meta["captions"]),
        width=meta["width"],
        height=meta["height"],
        features=features.astype(np.float32),
        boxes=boxes.astype(np.float32),
        meta=meta,
    )


class BadSampleCounter:
    """Counts good and bad samples by reason; raises once the bad fraction passes ``limit``.

    The check starts after ``min_seen`` samples so that one early bad sample does not abort a run.
    """

    def __init__(self, limit: float = 0.01, min_seen: int = 200):
        self.limit, self.min_seen = limit, min_seen
        self.good = 0
        self.bad: Counter[str] = Counter()

    def ok(self) -> None:
        self.good += 1

    def skip(self, error: BadSample) -> None:
        self.bad[error.reason] += 1
        self.check()

    def merge(self, good: int, bad: dict[str, int]) -> None:
        self.good += good
        self.bad.update(bad)
        self.check()

    @property
    def seen(self) -> int:
        return self.good + sum(self.bad.values())

    def check(self) -> None:
        n_bad = sum(self.bad.values())
        if self.seen >= self.min_seen and n_bad > self.limit * self.seen:
            raise RuntimeError(
                f"{n_bad} of {self.seen} samples were bad ({dict(self.bad)}), more than the allowed"
                f" fraction {self.limit}; run `python -m data_tools verify` on the shards"
            )
