"""The on-disk shard format ``iais_scale-shards-v1`` and its writer.

A data set is a folder ``DIR`` with one sub-folder per split holding WebDataset
tar shards ``shard-{i:06d}.tar`` and a ``sizes.json`` ({shard file name: sample
count}, the file OpenCLIP reads). One sample is one image with all its captions.
The complete specification is ``docs/data-format.md``; this module is its
reference implementation on the write side, plus the schema checks that the
writer and ``data_tools verify`` share.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from . import storage

FORMAT_NAME = "iais_scale-shards-v1"

MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
TOKENIZER_DIR = "tokenizer"

SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".tar"
TMP_SUFFIX = ".tmp"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")

# Member extensions: a member is named "{key}.{ext}". Keys contain no dots, so
# everything after the first dot is the extension (the WebDataset convention).
JSON_EXT = "json"
IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "webp")
FEAT_EXT = "feat.npy"
BOXES_EXT = "boxes.npy"
GEOMETRY_EXT = "geometry.npy"
MEMBER_EXTS: tuple[str, ...] = (JSON_EXT, *IMAGE_EXTS, FEAT_EXT, BOXES_EXT, GEOMETRY_EXT)

FEAT_DTYPES: tuple[np.dtype, ...] = (np.dtype("<f2"), np.dtype("<f4"))
BOXES_DTYPE = np.dtype("<f4")
GEOMETRY_DTYPE = np.dtype("<f4")
GEOMETRY_DIM = 7  # UNITER's [x1, y1, x2, y2, w, h, w*h], normalised by the image size

# USTAR stores names of at most 100 bytes without a "/". Keys keep the margin of
# the original members (".boxes.npy"), so that keys valid before geometry.npy
# existed stay valid; the writer refuses a geometry member whose name would not fit.
MAX_MEMBER_NAME = 100
MAX_KEY_LEN = MAX_MEMBER_NAME - 1 - len(BOXES_EXT)
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

# Fixed tar header fields make shards byte-identical for identical samples.
TAR_MTIME = 0
TAR_USER = ""
TAR_GROUP = ""
TAR_MODE = 0o444

# Boxes may poke out of the image by rounding; anything beyond is a bug
# (for example normalised instead of pixel coordinates on the wrong side).
BOX_SLACK_PX = 1.0
# Normalised coordinates (geometry, phrase boxes) get the same allowance for rounding.
NORM_SLACK = 0.01
MAX_TOKEN_ID = 1 << 31  # token ids become int64 tensors; anything larger is garbage
# boxes.npy and geometry.npy of one sample must describe the same boxes.
GEOMETRY_AGREEMENT = 1e-3


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside a split folder."""
    return f"{SHARD_PREFIX}{index:06d}{SHARD_SUFFIX}"


def sample_key(split: str, index: int) -> str:
    """The conventional key of sample ``index`` of ``split``: ``{split}-{index:06d}``."""
    return f"{split}-{index:06d}"


def validate_key(key: str) -> None:
    """Raise ValueError unless ``key`` is a valid sample key (letters, digits, ``-``, ``_``)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"key {key!r}: must be non-empty and use only letters, digits, '-' and '_'")
    if len(key) > MAX_KEY_LEN:
        raise ValueError(f"key {key!r}: longer than {MAX_KEY_LEN} characters")


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but True is no width.
    return isinstance(value, int) and not isinstance(value, bool)


def validate_sample(meta: Mapping[str, Any]) -> None:
    """Check the ``{key}.json`` schema; raise ValueError naming the offending key.

    Unknown keys are allowed (readers ignore them) so that producers may add
    provenance; everything listed in docs/data-format.md is checked.
    """
    if not isinstance(meta, Mapping):
        raise ValueError(f"json: must be an object, got {type(meta).__name__}")
    for name in ("image_id", "split"):
        if name not in meta:
            raise ValueError(f"{name}: missing")
        if not isinstance(meta[name], str) or not meta[name]:
            raise ValueError(f"{name}: must be a non-empty string, got {meta[name]!r}")
    for name in ("width", "height"):
        if name not in meta:
            raise ValueError(f"{name}: missing")
        if not _is_int(meta[name]) or meta[name] <= 0:
            raise ValueError(f"{name}: must be a positive integer, got {meta[name]!r}")
    if "captions" not in meta:
        raise ValueError("captions: missing")
    captions = meta["captions"]
    if not isinstance(captions, list) or not captions:
        raise ValueError("captions: must be a non-empty list of strings")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"captions[{i}]: must be a non-empty string, got {caption!r}")
    if "swap" in meta:
        swap = meta["swap"]
        if not isinstance(swap, Mapping):
            raise ValueError("swap: must be an object {group, index}")
        if not _is_int(swap.get("group")) or swap["group"] < 0:
            raise ValueError(f"swap.group: must be a non-negative integer, got {swap.get('group')!r}")
        if not _is_int(swap.get("index")) or swap["index"] not in (0, 1):
            raise ValueError(f"swap.index: must be 0 or 1, got {swap.get('index')!r}")
        if len(captions) != 1:
            raise ValueError("captions: a swap sample has exactly one caption")
    if "token_ids" in meta:
        _validate_token_ids(meta["token_ids"], len(captions))
    if "phrases" in meta:
        _validate_phrases(meta["phrases"], captions)


def _validate_token_ids(token_ids: Any, n_captions: int) -> None:
    if not isinstance(token_ids, list) or len(token_ids) != n_captions:
        raise ValueError(f"token_ids: must be a list of {n_captions} id lists, parallel to captions")
    for i, ids in enumerate(token_ids):
        if not isinstance(ids, list) or not ids:
            raise ValueError(f"token_ids[{i}]: must be a non-empty list of token ids")
        if not all(_is_int(t) and 0 <= t < MAX_TOKEN_ID for t in ids):
            raise ValueError(f"token_ids[{i}]: must hold integers in [0, {MAX_TOKEN_ID})")


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _validate_phrases(phrases: Any, captions: list[str]) -> None:
    if not isinstance(phrases, list):
        raise ValueError("phrases: must be a list of {caption, start, end, boxes[, entity]} objects")
    lo, hi = -NORM_SLACK, 1 + NORM_SLACK
    for i, ph in enumerate(phrases):
        where = f"phrases[{i}]"
        if not isinstance(ph, Mapping):
            raise ValueError(f"{where}: must be an object {{caption, start, end, boxes}}")
        c = ph.get("caption")
        if not _is_int(c) or not 0 <= c < len(captions):
            raise ValueError(f"{where}.caption: must be a caption index in [0, {len(captions)}), got {c!r}")
        start, end = ph.get("start"), ph.get("end")
        if not (_is_int(start) and _is_int(end) and 0 <= start < end <= len(captions[c])):
            raise ValueError(
                f"{where}: start/end must be character offsets 0 <= start < end <= {len(captions[c])}"
                f" into caption {c}, got {start!r}/{end!r}"
            )
        boxes = ph.get("boxes")
        if not isinstance(boxes, list) or not boxes:
            raise ValueError(f"{where}.boxes: must be a non-empty list of [x1, y1, x2, y2]")
        for j, box in enumerate(boxes):
            if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
                raise ValueError(f"{where}.boxes[{j}]: must be 4 finite numbers [x1, y1, x2, y2]")
            x1, y1, x2, y2 = box
            if not (lo <= x1 <= x2 <= hi and lo <= y1 <= y2 <= hi):
                raise ValueError(f"{where}.boxes[{j}]: need 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1 (normalised)")
        if "entity" in ph and not isinstance(ph["entity"], str):
            raise ValueError(f"{where}.entity: must be a string")


def normalised_geometry(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel boxes [n, 4] -> UNITER's 7-d ``[x1, y1, x2, y2, w, h, w*h]`` normalised by the image size."""
    x1, y1, x2, y2 = (boxes / np.array([width, height, width, height], np.float32)).clip(0, 1).T
    w, h = x2 - x1, y2 - y1
    return np.stack([x1, y1, x2, y2, w, h, w * h], -1).astype(np.float32)


def validate_geometry(geometry: np.ndarray, n: int) -> None:
    """Check a ``[n, 7]`` float32 normalised box geometry (values in [0, 1] up to rounding)."""
    if geometry.shape != (n, GEOMETRY_DIM):
        raise ValueError(f"geometry: shape {list(geometry.shape)} does not match feat rows, expected [{n}, 7]")
    if geometry.dtype != GEOMETRY_DTYPE:
        raise ValueError(f"geometry: dtype must be float32, got {geometry.dtype}")
    if not np.isfinite(geometry).all():
        raise ValueError("geometry: contains NaN or inf")
    if (geometry < -NORM_SLACK).any() or (geometry > 1 + NORM_SLACK).any():
        raise ValueError("geometry: values outside [0, 1] (must be normalised by the image size)")
    x1, y1, x2, y2 = geometry[:, :4].T
    if (x2 < x1 - NORM_SLACK).any() or (y2 < y1 - NORM_SLACK).any():
        raise ValueError("geometry: need x1 <= x2 and y1 <= y2")


def validate_regions(
    feat: np.ndarray, boxes: np.ndarray | None, width: int, height: int, geometry: np.ndarray | None = None
) -> None:
    """Check region features ``[n, D]`` with pixel boxes ``[n, 4]`` and/or geometry ``[n, 7]``; raise ValueError.

    With both, the boxes normalised by ``width x height`` must agree with the geometry (1e-3).
    """
    if feat.ndim != 2 or feat.shape[0] < 1 or feat.shape[1] < 1:
        raise ValueError(f"feat: must have shape [n >= 1, D >= 1], got {list(feat.shape)}")
    if feat.dtype.kind != "f" or feat.dtype.itemsize not in (2, 4):
        raise ValueError(f"feat: dtype must be float16 or float32, got {feat.dtype}")
    if not np.isfinite(feat).all():
        raise ValueError("feat: contains NaN or inf")
    if boxes is None and geometry is None:
        raise ValueError("boxes: region features need boxes or geometry")
    if geometry is not None:
        validate_geometry(geometry, feat.shape[0])
    if boxes is None:
        return
    if boxes.shape != (feat.shape[0], 4):
        raise ValueError(f"boxes: shape {list(boxes.shape)} does not match feat rows, expected [{feat.shape[0]}, 4]")
    if boxes.dtype != BOXES_DTYPE:
        raise ValueError(f"boxes: dtype must be float32, got {boxes.dtype}")
    if not np.isfinite(boxes).all():
        raise ValueError("boxes: contains NaN or inf")
    x1, y1, x2, y2 = boxes.T
    if (x2 < x1).any() or (y2 < y1).any():
        raise ValueError("boxes: need x1 <= x2 and y1 <= y2")
    lo, hx, hy = -BOX_SLACK_PX, width + BOX_SLACK_PX, height + BOX_SLACK_PX
    if (x1 < lo).any() or (y1 < lo).any() or (x2 > hx).any() or (y2 > hy).any():
        raise ValueError(f"boxes: outside the {width}x{height} image")
    if geometry is not None:
        gap = float(np.abs(normalised_geometry(boxes, width, height) - geometry).max())
        if gap > GEOMETRY_AGREEMENT:
            raise ValueError(f"geometry: differs from boxes / image size by up to {gap:.4g} (> {GEOMETRY_AGREEMENT})")


def encode_json(meta: Mapping[str, Any]) -> bytes:
    """Canonical JSON bytes (sorted keys, compact, UTF-8) so equal metadata gives equal bytes."""
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode_npy(array: np.ndarray) -> bytes:
    """``np.save`` bytes of a little-endian, C-contiguous copy of ``array`` (never pickled)."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_NPY_MAGIC = b"\x93NUMPY"
# The header numpy writes for a plain array (np.lib.format); anything else goes through np.load.
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[a-z]\d{1,2})', 'fortran_order': (True|False), 'shape': \(([\d, ]*)\), \}\s*")


def decode_npy(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_npy`: decode ``.npy`` bytes; object arrays are refused, never unpickled.

    Plain numeric arrays are read with a regular-expression header parse and ``np.frombuffer``
    (read-only view of ``data``), ~5x faster than ``np.load``, whose header parse compiles Python;
    any other header goes to ``np.load(..., allow_pickle=False)``.
    """
    if data[:6] == _NPY_MAGIC and data[6:7] in (b"\x01", b"\x02", b"\x03") and len(data) >= 12:
        start = 10 if data[6] == 1 else 12
        length = int.from_bytes(data[8:start], "little")
        match = _NPY_HEADER.fullmatch(data[start : start + length].decode("latin1"))
        if match is not None:
            dtype = np.dtype(match.group(1))
            shape = tuple(int(n) for n in match.group(3).replace(" ", "").split(",") if n)
            array = np.frombuffer(data, dtype, count=math.prod(shape), offset=start + length)
            return array.reshape(shape, order="F" if match.group(2) == "True" else "C")
    return np.load(io.BytesIO(data), allow_pickle=False)


def _valid_shard_name(name: Any, ours: bool) -> bool:
    """A bare file name of a shard: no folder, no '..', and our pattern in our own split folders."""
    if not isinstance(name, str) or not name.endswith(SHARD_SUFFIX) or name.startswith("."):
        return False
    if "/" in name or "\\" in name or "\0" in name:
        return False
    return bool(SHARD_RE.match(name)) if ours else True


def parse_sizes(data: bytes | str, where: str, *, ours: bool = True) -> dict[str, int]:
    """Validate ``sizes.json`` content -> {shard file name: sample count}, in shard order.

    Names must be bare shard file names (``shard-NNNNNN.tar`` in our layout, any ``*.tar`` beside a
    shard list) so that a hostile file cannot point a split at other files; counts are integers >= 0.
    """
    try:
        sizes = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(sizes, dict):
        raise ValueError(f"{where}: must map shard names to sample counts")
    bad_names = [n for n in sizes if not _valid_shard_name(n, ours)]
    if bad_names:
        pattern = "shard-NNNNNN.tar" if ours else "*.tar file names"
        raise ValueError(f"{where}: invalid shard names {bad_names[:5]} (expected {pattern} in this folder)")
    bad_counts = {n: v for n, v in sizes.items() if not (_is_int(v) and v >= 0)}
    if bad_counts:
        raise ValueError(f"{where}: sample counts must be integers >= 0, got {dict(list(bad_counts.items())[:5])}")
    return {name: sizes[name] for name in sorted(sizes)}


def read_sizes(split_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Read and validate ``split_dir/sizes.json`` (a local split folder of ours)."""
    path = Path(split_dir) / SIZES_FILE
    return parse_sizes(path.read_bytes(), str(path))


class ManifestError(ValueError):
    """A manifest that does not follow docs/data-format.md; ``problems`` lists every issue."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{where}: " + "; ".join(problems))


@dataclass
class Manifest:
    """``manifest.json`` of a data set: what it holds and who made it (docs/data-format.md)."""

    splits: dict[str, int] = field(default_factory=dict)
    feature_dim: int | None = None
    generator: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    format: str = FORMAT_NAME
    extra: dict[str, Any] = field(default_factory=dict)  # keys of newer producers, kept on rewrite

    @classmethod
    def from_dict(cls, data: Any) -> tuple[Manifest, list[str]]:
        """The manifest and its problems (fields that fail a check are left at their defaults)."""
        if not isinstance(data, dict):
            return cls(), ["must be a JSON object"]
        problems = []
        m = cls(extra={k: v for k, v in data.items() if k not in _MANIFEST_FIELDS})
        if data.get("format") != FORMAT_NAME:
            problems.append(f"format {data.get('format')!r} != {FORMAT_NAME!r}")
        dim = data.get("feature_dim")
        if dim is not None and not (_is_int(dim) and dim >= 1):
            problems.append(f"feature_dim must be a positive integer or null, got {dim!r}")
        else:
            m.feature_dim = dim
        splits = data.get("splits")
        if not isinstance(splits, dict) or not all(_is_int(v) and v >= 0 for v in splits.values()):
            problems.append("splits must map split names to sample counts")
        else:
            m.splits = dict(splits)
        for name, kind in (("generator", str), ("params", dict), ("skipped", dict)):
            if name in data:
                if isinstance(data[name], kind):
                    setattr(m, name, data[name])
                else:
                    problems.append(f"{name} must be a {kind.__name__}")
        return m, problems

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> tuple[Manifest | None, list[str]]:
        """(manifest, problems) of ``root/manifest.json`` (a folder or URL): ``(None, [])`` when there
        is none, ``(None, [why])`` when it is not JSON, else the manifest and the fields that failed."""
        url = storage.join(root, MANIFEST_FILE)
        try:
            data = json.loads(storage.read_bytes(url))
        except FileNotFoundError:
            return None, []
        except (ValueError, UnicodeDecodeError) as e:
            return None, [f"not JSON ({e})"]
        return cls.from_dict(data)

    @classmethod
    def read(cls, root: str | os.PathLike[str]) -> Manifest:
        """Read ``root/manifest.json`` (a folder or URL); FileNotFoundError, or ManifestError."""
        manifest, problems = cls.load(root)
        url = storage.join(root, MANIFEST_FILE)
        if problems:
            raise ManifestError(url, problems)
        if manifest is None:
            raise FileNotFoundError(f"{url} not found (make the data set with `python -m data_tools`)")
        return manifest

    def to_dict(self) -> dict[str, Any]:
        out = {"format": self.format, "feature_dim": self.feature_dim, "generator": self.generator,
               "params": self.params, "splits": self.splits}
        if self.skipped:
            out["skipped"] = self.skipped
        return {**out, **self.extra}

    def write(self, root: str | os.PathLike[str]) -> None:
        """Write ``root/manifest.json`` atomically (it is written last: it vouches for the data)."""
        write_json_atomic(Path(root) / MANIFEST_FILE, self.to_dict(), sort_keys=False)


_MANIFEST_FIELDS = ("format", "feature_dim", "generator", "params", "splits", "skipped")


def list_shards(split_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete shards of a split folder in index order (``.tmp`` leftovers excluded)."""
    return sorted(p for p in Path(split_dir).iterdir() if SHARD_RE.match(p.name))


def _tar_member_bytes(size: int) -> int:
    # One 512-byte header plus the data padded to whole 512-byte blocks.
    return 512 + 512 * math.ceil(size / 512)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented JSON via a ``.tmp`` file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ShardWriter:
    """Write one split's samples into ``shard-{i:06d}.tar`` files plus ``sizes.json``, atomically.

    Shards are written as ``.tmp`` and renamed when complete; ``sizes.json`` last (on ``close``).
    ``resume`` keeps the first shards a previous run completed (docs/data-format.md, "Resuming");
    ``on_shard_done(name, n)`` runs after each rename. As a context manager an exception drops the
    unfinished shard and writes no ``sizes.json``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        shard_size: int = 1000,
        max_shard_bytes: int | None = None,
        overwrite: bool = False,
        resume: Mapping[str, int] | None = None,
        on_shard_done: Callable[[str, int], None] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if max_shard_bytes is not None and max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1 or None, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.split = self.out_dir.name
        self.shard_size = shard_size
        self.max_shard_bytes = max_shard_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)

        self.on_shard_done = on_shard_done

        keep: dict[str, int] = {}
        if resume is not None:
            keep = dict(resume)
            expected = [shard_name(i) for i in range(len(keep))]
            if list(keep) != expected:
                raise ValueError(f"resume: must list {', '.join(expected) or 'no shards'} in order, got {list(keep)}")
            missing = [name for name in expected if not (self.out_dir / name).is_file()]
            if missing:
                raise FileNotFoundError(f"resume: {self.out_dir} lacks {', '.join(missing)}")
        existing = [
            p for p in self.out_dir.iterdir() if (SHARD_RE.match(p.name) and p.name not in keep) or p.name == SIZES_FILE
        ]
        if existing and not overwrite and resume is None:
            raise FileExistsError(f"{self.out_dir} already holds shards; pass overwrite=True to replace them")
        for p in self.out_dir.iterdir():
            # Leftover .tmp files come from a killed writer and are garbage by construction.
            if p in existing or (p.name.endswith(TMP_SUFFIX) and p.name.startswith(SHARD_PREFIX)):
                p.unlink()

        self.sizes: dict[str, int] = keep
        self.n_samples = sum(keep.values())
        self._closed = False
        self._index = len(keep)
        self._file: BinaryIO | None = None
        self._tar: Any = None  # webdataset.TarWriter, imported lazily
        self._count = 0
        self._bytes = 0
        self._keys: set[str] = set()

    @property
    def shard_paths(self) -> list[Path]:
        """Paths of the shards completed so far."""
        return [self.out_dir / name for name in self.sizes]

    def write(
        self,
        key: str,
        meta: Mapping[str, Any],
        *,
        image: bytes | None = None,
        image_ext: str = "png",
        feat: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        geometry: np.ndarray | None = None,
    ) -> None:
        """Validate and append one sample; ``image`` is already-encoded file bytes.

        ``feat`` needs pixel ``boxes``, normalised ``geometry`` ``[n, 7]``, or both (they must agree).
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        validate_key(key)
        validate_sample(meta)
        if meta["split"] != self.split:
            raise ValueError(f"split: {meta['split']!r} does not match the split folder {self.split!r}")
        members: dict[str, bytes] = {JSON_EXT: encode_json(meta)}
        if image is not None:
            if image_ext not in IMAGE_EXTS:
                raise ValueError(f"image_ext: must be one of {IMAGE_EXTS}, got {image_ext!r}")
            if not image:
                raise ValueError("image: empty bytes")
            members[image_ext] = bytes(image)
        if feat is None and (boxes is not None or geometry is not None):
            raise ValueError("boxes and geometry need feat (the region features they belong to)")
        if feat is not None:
            if boxes is None and geometry is None:
                raise ValueError("feat needs boxes, geometry or both")
            feat = np.asarray(feat)
            boxes = None if boxes is None else np.asarray(boxes, dtype=BOXES_DTYPE)
            geometry = None if geometry is None else np.asarray(geometry, dtype=GEOMETRY_DTYPE)
            validate_regions(feat, boxes, meta["width"], meta["height"], geometry)
            members[FEAT_EXT] = encode_npy(feat)
            if boxes is not None:
                members[BOXES_EXT] = encode_npy(boxes)
            if geometry is not None:
                if len(f"{key}.{GEOMETRY_EXT}".encode()) > MAX_MEMBER_NAME:
                    raise ValueError(f"key {key!r}: too long for a .{GEOMETRY_EXT} member (tar names <= 100 bytes)")
                members[GEOMETRY_EXT] = encode_npy(geometry)

        nbytes = sum(_tar_member_bytes(len(v)) for v in members.values())
        full = self._count >= self.shard_size or (
            self.max_shard_bytes is not None and self._count > 0 and self._bytes + nbytes > self.max_shard_bytes
        )
        # WebDataset groups consecutive members by key, so a repeated key in one
        # shard would silently merge two samples.
        if not full and key in self._keys:
            raise ValueError(f"key {key!r}: written twice to {shard_name(self._index)}")
        if self._tar is not None and full:
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        self._tar.write({"__key__": key, **members})
        self._keys.add(key)
        self._count += 1
        self._bytes += nbytes
        self.n_samples += 1

    def _open_shard(self) -> None:
        tmp = self.out_dir / (shard_name(self._index) + TMP_SUFFIX)
        # Imported here: importing webdataset imports torch (over a second), which
        # readers of this module (verify, stats) do not need.
        from webdataset import TarWriter

        self._file = tmp.open("wb")
        # encoder=False: members are bytes already, encoded canonically above.
        self._tar = TarWriter(self._file, encoder=False, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE, mtime=TAR_MTIME)
        self._count = 0
        self._bytes = 0
        self._keys = set()

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()  # writes the end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self._index)
        os.replace(self.out_dir / (name + TMP_SUFFIX), self.out_dir / name)
        self.sizes[name] = self._count
        self._tar, self._file = None, None
        self._index += 1
        if self.on_shard_done is not None:
            self.on_shard_done(name, self.sizes[name])

    def close(self) -> dict[str, int]:
        """Finish the last shard, write ``sizes.json`` and return it."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            write_json_atomic(self.out_dir / SIZES_FILE, self.sizes)
            self._closed = True
        return dict(self.sizes)

    def abort(self) -> None:
        """Drop the unfinished shard without writing ``sizes.json``."""
        if self._tar is not None:
            # Close the tar stream before its file, or its finaliser writes to a closed file.
            self._tar.close()
        if self._file is not None:
            self._file.close()
            (self.out_dir / (shard_name(self._index) + TMP_SUFFIX)).unlink(missing_ok=True)
        self._tar, self._file = None, None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


RELATION_GENERATORS = ("demo", "relations")  # data sets of ours whose captions are relational


def relation_data_reason(flag: bool | None, manifest: Manifest | None) -> str | None:
    """Why the data counts as relation data (its captions may say "left of"), or None.

    ``data.relation_captions`` decides when set; else the manifest's ``relation_captions``, else the
    manifest's generator (the demo and relations generators write relational captions) or a
    ``swap`` split (relation-swap evaluation data)."""
    if flag is not None:
        return "data.relation_captions is true" if flag else None
    if manifest is None:
        return None
    declared = manifest.extra.get("relation_captions")
    if isinstance(declared, bool):
        return "the manifest declares relation_captions: true" if declared else None
    if manifest.generator in RELATION_GENERATORS:
        return f"the data set's captions are relational (manifest generator {manifest.generator!r})"
    if "swap" in manifest.splits:
        return "the data set has a relation-swap split ('swap' in the manifest)"
    return None
