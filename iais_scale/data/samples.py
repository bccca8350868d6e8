"""Safe decoding of one shard sample, and the counted skip of bad ones.

Only JSON, text and ``.npy`` (``allow_pickle=False``) are ever decoded, plus image headers with PIL:
nothing in a shard is unpickled or executed. Both our layout and img2dataset's output decode
(``docs/data-format.md``). Any failure to decode raises ``BadSample`` with a short reason, which the
pipeline counts; ``data_tools verify`` runs the same checks.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import format as fmt

TEXT_EXT = "txt"  # img2dataset's caption member



class Caption(str):
    """A caption string that also carries the data set's word-piece ids (``token_ids``, no [CLS]/[SEP]).

    It is the caption text everywhere a string is expected; the collator uses ``token_ids`` instead of
    tokenizing the text, so training and evaluation see exactly the data set's ids.
    """

    token_ids: tuple[int, ...]

    def __new__(cls, text: str, token_ids) -> Caption:
        obj = super().__new__(cls, text)
        obj.token_ids = tuple(int(t) for t in token_ids)
        return obj

    def __reduce__(self):  # pickled as (text, ids), e.g. into DataLoader workers
        return Caption, (str(self), self.token_ids)


def captions_of(meta: dict) -> list[str]:
    """The sample's captions: plain strings, or :class:`Caption` objects when ``token_ids`` are stored."""
    ids = meta.get("token_ids")
    if ids is None:
        return list(meta["captions"])
    return [Caption(text, t) for text, t in zip(meta["captions"], ids, strict=True)]


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` is a short category for the counters."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class ImageSample:
    """One image with all its captions, its region features and/or its encoded image.

    ``features``/``boxes`` are empty (``[0, 0]``/``[0, 4]``) for samples decoded for pixels
    (``image_fields.PixelFields``). ``image`` holds the encoded file bytes (decoded lazily);
    ``pixels`` is the ``[S, S, 3]`` uint8 result once the stream has decoded it for a batch.
    """

    key: str
    image_id: str
    captions: list[str]
    width: int
    height: int
    features: np.ndarray  # [n, D] float32
    boxes: np.ndarray  # [n, 4] float32 pixels x1, y1, x2, y2
    meta: dict = field(default_factory=dict)
    image: bytes | None = None
    pixels: np.ndarray | None = None
    geometry: np.ndarray | None = None  # [n, 7] float32 from geometry.npy; None: computed from boxes

    def normalised_boxes(self) -> np.ndarray:
        """Region boxes ``[n, 4]`` as fractions of the image size (from geometry when stored)."""
        if self.geometry is not None:
            return self.geometry[:, :4]
        return self.boxes / np.array([self.width, self.height, self.width, self.height], np.float32)


def _jpeg_scan_start(data: bytes) -> int:
    """Offset of the entropy-coded data after the first SOS marker (ValueError when malformed)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"no JPEG marker at offset {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:
            return i + 2 + length
        i += 2 + length
    raise ValueError("no start-of-scan marker")


def check_image(data: bytes, key: str = "?") -> tuple[int, int]:
    """Cheap validity check of an encoded image; returns its (width, height) or raises BadSample.

    Reads the header (format, size); a JPEG must have its end-of-image marker after the scan data
    (what a truncated download lacks: entropy-coded data never contains ``FF D9``, trailing bytes
    after the image are allowed), a PNG must pass ``verify()`` (chunk structure and CRCs), a WebP's
    RIFF size must fit the data. Decoding the pixels costs ~100x more and is left to the collator.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            kind = im.format
            if kind in ("JPEG", "MPO"):
                if data.find(b"\xff\xd9", _jpeg_scan_start(data)) < 0:
                    raise ValueError("truncated JPEG (no end-of-image marker after the scan data)")
            elif kind == "PNG":
                im.verify()
            elif kind == "WEBP":
                if int.from_bytes(data[4:8], "little") + 8 > len(data):
                    raise ValueError("truncated WebP (RIFF size beyond the data)")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise BadSample("bad_image", f"{key}: {type(e).__name__}: {e}") from None
    if width < 1 or height < 1:
        raise BadSample("bad_image", f"{key}: empty image {width}x{height}")
    return width, height


def _img2dataset_meta(raw: dict, key: str) -> dict:
    """Our schema's fields from img2dataset's ``.txt`` caption and ``.json`` metadata."""
    extra: dict = {}
    if fmt.JSON_EXT in raw:
        extra = parse_json(raw[fmt.JSON_EXT], key)  # img2dataset writes NaN for missing numbers: allowed
        if not isinstance(extra, dict):
            raise BadSample("bad_json", f"{key}: the .json must be an object")
    status = extra.get("status", "success")
    if status != "success":
        raise BadSample("bad_status", f"{key}: img2dataset status {status!r} ({extra.get('error_message')})")
    caption = None
    if TEXT_EXT in raw:
        try:
            caption = raw[TEXT_EXT].decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample("bad_caption", f"{key}: .txt is not UTF-8 ({e})") from None
    if (caption is None or not caption.strip()) and isinstance(extra.get("caption"), str):
        caption = extra["caption"]
    if caption is None or not caption.strip():
        raise BadSample("missing_caption", key)
    meta = {"image_id": key, "captions": [caption.strip()], "img2dataset": extra}
    for name in ("width", "height"):
        value = extra.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            meta[name] = value
        elif isinstance(value, float) and math.isfinite(value) and value > 0 and value.is_integer():
            meta[name] = int(value)
    return meta


def parse_json(data: bytes, key: str = "?") -> object:
    """A JSON member; malformed, non-UTF-8 or absurdly nested JSON is ``bad_json``."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadSample("bad_json", f"{key}: {type(e).__name__}: {str(e)[:200]}") from None


def sample_meta(raw: dict) -> dict:
    """The sample's metadata in our schema: our ``.json``, or img2dataset's ``.txt`` + ``.json``."""
    key = raw.get("__key__", "?")
    if TEXT_EXT in raw:  # img2dataset layout: the caption is a member of its own
        return _img2dataset_meta(raw, key)
    if fmt.JSON_EXT not in raw:
        raise BadSample("missing_json", key)
    meta = parse_json(raw[fmt.JSON_EXT], key)
    try:
        fmt.validate_sample(meta)
    except ValueError as e:
        raise BadSample("bad_json", f"{key}: {e}") from None
    return meta


def load_regions(raw: dict, meta: dict, *, feature_dim: int | None = None,
                 max_regions: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Region features [n, D], pixel boxes [n, 4] and the stored geometry [n, 7] (None without
    ``geometry.npy``) of a sample, checked (float32 copies). Without ``boxes.npy`` the boxes are the
    geometry's scaled to ``width x height``."""
    key = raw.get("__key__", "?")
    if fmt.FEAT_EXT not in raw or (fmt.BOXES_EXT not in raw and fmt.GEOMETRY_EXT not in raw):
        raise BadSample("missing_features", key)
    try:
        features = fmt.decode_npy(raw[fmt.FEAT_EXT])
        boxes = fmt.decode_npy(raw[fmt.BOXES_EXT]) if fmt.BOXES_EXT in raw else None
        geometry = fmt.decode_npy(raw[fmt.GEOMETRY_EXT]) if fmt.GEOMETRY_EXT in raw else None
    except (ValueError, TypeError, OSError, EOFError) as e:  # bad headers, unsupported dtypes, short data
        raise BadSample("bad_npy", f"{key}: {type(e).__name__}: {e}") from None
    try:
        fmt.validate_regions(features, boxes, meta["width"], meta["height"], geometry)
    except ValueError as e:
        reason = "nonfinite_features" if "NaN" in str(e) else "bad_regions"
        raise BadSample(reason, f"{key}: {e}") from None
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise BadSample("bad_feature_dim", f"{key}: features of dimension {features.shape[1]}, expected {feature_dim}")
    if max_regions is not None and features.shape[0] > max_regions:
        raise BadSample("too_many_regions", f"{key}: {features.shape[0]} > {max_regions}")
    if geometry is not None:
        geometry = geometry.astype(np.float32)  # a writable copy, like the others
        if boxes is None:
            size = np.array([meta["width"], meta["height"], meta["width"], meta["height"]], np.float32)
            boxes = geometry[:, :4] * size
    assert boxes is not None
    return features.astype(np.float32), boxes.astype(np.float32), geometry


def decode_sample(raw: dict, fields) -> ImageSample:
    """Turn the raw members of one sample (``{"__key__", "json", "feat.npy", ...}``) into a sample.

    ``fields`` (``image_fields.RegionFields`` or ``PixelFields``) takes the image members it needs.
    Any failure raises ``BadSample``: one bad sample never stops a run.
    """
    key = raw.get("__key__", "?")
    try:
        if "__too_large__" in raw:
            raise BadSample("member_too_large", f"{key}: members {raw['__too_large__']} over the size limit")
        meta = sample_meta(raw)
        image_ext = next((ext for ext in fmt.IMAGE_EXTS if ext in raw), None)
        image = raw[image_ext] if image_ext is not None else None
        return fields.sample(raw, key, meta, image, captions_of(meta))
    except BadSample:
        raise
    except Exception as e:  # anything a hostile sample provokes is that sample's problem only
        raise BadSample("undecodable", f"{key}: {type(e).__name__}: {str(e)[:200]}") from None


NOT_SAMPLES = frozenset({"bad_shard"})  # counts of shards: their samples are counted as lost_samples


class BadSampleCounter:
    """Counts good and bad samples by reason; raises once the bad fraction passes ``limit``.

    One counter per rank: the trainer merges the counts its stream passes along with each batch
    (every reason: decoding, ``bad_image`` at collation, ``lost_samples`` of an unreadable or short
    shard, ``past_declared_size``). ``bad_shard`` counts shards, not samples: it is reported but
    not part of the fraction (their lost samples are). The check starts after ``min_seen`` samples
    so that one early bad sample does not abort a run. ``rank`` (optional) names the rank.
    """

    def __init__(self, limit: float = 0.01, min_seen: int = 200, *, rank: int | None = None):
        self.limit, self.min_seen, self.rank = limit, min_seen, rank
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

    def state_dict(self) -> dict:
        return {"good": self.good, "reasons": dict(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        self.good, self.bad = state.get("good", 0), Counter(state.get("reasons", {}))

    @staticmethod
    def merged(states: list[dict]) -> dict:
        """One state holding the counts of ``states`` (every rank's of a job) together."""
        reasons: Counter[str] = Counter()
        for s in states:
            reasons.update(s.get("reasons", {}))
        return {"good": sum(s.get("good", 0) for s in states), "reasons": dict(reasons)}

    @property
    def bad_samples(self) -> int:
        return sum(n for reason, n in self.bad.items() if reason not in NOT_SAMPLES)

    @property
    def seen(self) -> int:
        return self.good + self.bad_samples

    def check(self) -> None:
        n_bad = self.bad_samples
        if self.seen >= self.min_seen and n_bad > self.limit * self.seen:
            where = f"rank {self.rank}: " if self.rank is not None else ""
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.bad.most_common())
            raise RuntimeError(
                f"{where}{n_bad} of {self.seen} samples were bad ({reasons}), more than the allowed"
                f" fraction {self.limit} (data.max_bad_fraction); run `python -m data_tools verify` on the shards"
            )
