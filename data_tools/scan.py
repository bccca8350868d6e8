"""Read every shard of a data set, check each sample and collect statistics.

Shared by ``verify`` (which reports the problems) and ``stats`` (which reports
the numbers). Tar files are read with :mod:`tarfile` rather than WebDataset so
that truncation and malformed members surface as precise messages; nothing is
ever unpickled (``.npy`` is loaded with ``allow_pickle=False``).

Besides the ``iais_scale-shards-v1`` layout, a folder of img2dataset output
(``00000.tar``, ``00000_stats.json``, ...; samples ``{key}.jpg`` + ``{key}.txt``
+ ``{key}.json``) is read as one split as it is: the caption comes from the
``.txt`` member, the ``.json`` is img2dataset's own metadata (its ``width`` /
``height``, when present, are checked against the image), and sample counts are
checked against ``successes`` of each ``{shard}_stats.json`` instead of a
``sizes.json``.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from iais_scale.data.format import (
    BOXES_EXT,
    FEAT_EXT,
    FORMAT_NAME,
    IMAGE_EXTS,
    JSON_EXT,
    MANIFEST_FILE,
    MEMBER_EXTS,
    SHARD_PREFIX,
    SHARD_RE,
    SHARD_SUFFIX,
    SIZES_FILE,
    TMP_SUFFIX,
    TOKENIZER_DIR,
    decode_npy,
    read_sizes,
    validate_key,
    validate_regions,
    validate_sample,
)
from iais_scale.data.tokenizer import SPECIAL_TOKENS

_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
# A JPEG with appended images (camera MPO files) is still a JPEG to every decoder.
_PIL_ALIASES = {"MPO": "JPEG"}

IAIS_LAYOUT = "iais_scale-shards-v1"
IMG2DATASET_LAYOUT = "img2dataset"
IMG2DATASET_EXTS: tuple[str, ...] = (*IMAGE_EXTS, "txt", JSON_EXT)
STATS_SUFFIX = "_stats.json"
_END_OF_ARCHIVE = 1024  # two zero blocks close every complete tar


@dataclass
class Agg:
    """Running min / mean / max that merges across shards without keeping values."""

    count: int = 0
    total: float = 0.0
    min: float | None = None
    max: float | None = None

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)

    def merge(self, other: Agg) -> None:
        self.count += other.count
        self.total += other.total
        for attr, pick in (("min", min), ("max", max)):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            setattr(self, attr, theirs if mine is None else mine if theirs is None else pick(mine, theirs))

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def as_dict(self) -> dict[str, float | None]:
        return {"min": self.min, "mean": self.mean, "max": self.max}


@dataclass
class Report:
    """Findings for one shard, or for a whole split once shards are merged."""

    shards: int = 0
    samples: int = 0
    captions: int = 0
    images: int = 0
    caption_words: Agg = field(default_factory=Agg)
    regions: Agg = field(default_factory=Agg)
    feature_dims: set[int] = field(default_factory=set)
    keys: list[tuple[str, str]] = field(default_factory=list)  # (key, shard)
    swap: list[tuple[int, int, str]] = field(default_factory=list)  # (group, index, key)
    problems: list[str] = field(default_factory=list)
    layout: str = IAIS_LAYOUT

    def merge(self, other: Report) -> None:
        self.shards += other.shards
        self.samples += other.samples
        self.captions += other.captions
        self.images += other.images
        self.caption_words.merge(other.caption_words)
        self.regions.merge(other.regions)
        self.feature_dims |= other.feature_dims
        self.keys.extend(other.keys)
        self.swap.extend(other.swap)
        self.problems.extend(other.problems)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON number {name}")


def _img2dataset_meta(members: dict[str, bytes], split: str, bad: Callable[[str], None]) -> dict[str, Any] | None:
    """The sample's metadata in our schema, from img2dataset's ``.txt`` caption and ``.json``."""
    extra: dict[str, Any] = {}
    if JSON_EXT in members:
        try:
            extra = json.loads(members[JSON_EXT].decode("utf-8"))  # img2dataset may write NaN: allowed here
        except (UnicodeDecodeError, ValueError) as e:
            bad(f".{JSON_EXT}: invalid JSON ({e})")
        if not isinstance(extra, dict):
            bad(f".{JSON_EXT}: must be an object")
            extra = {}
    if extra.get("status", "success") != "success":
        bad(f".{JSON_EXT}: status {extra.get('status')!r} ({extra.get('error_message')})")
    if "txt" not in members:
        bad("missing .txt (the caption)")
        return None
    try:
        caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        bad(f".txt: not UTF-8 ({e})")
        return None
    if not caption.strip():
        bad(".txt: empty caption")
        return None
    meta: dict[str, Any] = {"split": split, "captions": [caption]}
    for name in ("width", "height"):
        value = extra.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # not recorded: nothing to compare the image with
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            bad(f".{JSON_EXT}: {name} must be a positive integer, got {value!r}")
            continue
        meta[name] = value
    return meta


def _check_sample(
    report: Report,
    where: str,
    key: str,
    members: dict[str, bytes],
    split: str,
    feature_dim: int | None,
    decode_images: bool,
    layout: str = IAIS_LAYOUT,
) -> None:
    """Check one sample, append ``where:key: reason`` problems and add its statistics."""

    def bad(reason: str) -> None:
        report.problems.append(f"{where}:{key}: {reason}")

    report.samples += 1
    report.keys.append((key, where))
    try:
        validate_key(key)
    except ValueError as e:
        bad(str(e))

    meta: dict[str, Any] | None = None
    if layout == IMG2DATASET_LAYOUT:
        meta = _img2dataset_meta(members, split, bad)
    elif JSON_EXT not in members:
        bad(f"missing .{JSON_EXT}")
    else:
        try:
            meta = json.loads(members[JSON_EXT].decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
            bad(f".{JSON_EXT}: invalid JSON ({e})")
        if meta is not None:
            try:
                validate_sample(meta)
            except ValueError as e:
                bad(str(e))
                meta = None
    if meta is not None:
        if meta["split"] != split:
            bad(f"split: {meta['split']!r} does not match the split folder {split!r}")
        report.captions += len(meta["captions"])
        for caption in meta["captions"]:
            report.caption_words.add(len(caption.split()))
        if "swap" in meta:
            report.swap.append((meta["swap"]["group"], meta["swap"]["index"], key))

    images = [ext for ext in IMAGE_EXTS if ext in members]
    if len(images) > 1:
        bad(f"several images: {', '.join(images)}")
    if images:
        report.images += 1
    if images and decode_images:
        ext = images[0]
        try:
            with Image.open(io.BytesIO(members[ext])) as img:
                img.load()  # full decode: catches truncated image data
                # img2dataset names every image .jpg whatever its encode format; decoders sniff the content.
                if layout == IAIS_LAYOUT and _PIL_ALIASES.get(img.format, img.format) != _PIL_FORMATS[ext]:
                    bad(f".{ext}: holds a {img.format} image")
                size = (meta.get("width", img.size[0]), meta.get("height", img.size[1])) if meta else img.size
                if img.size != size:
                    bad(f".{ext}: size {img.size[0]}x{img.size[1]} != json {size[0]}x{size[1]}")
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            bad(f".{ext}: cannot decode image ({type(e).__name__}: {e})")

    has_feat, has_boxes = FEAT_EXT in members, BOXES_EXT in members
    if has_boxes and not has_feat:
        bad(f".{BOXES_EXT} without .{FEAT_EXT}")
    if has_feat and not has_boxes:
        bad(f".{FEAT_EXT} without .{BOXES_EXT}")
    if layout == IMG2DATASET_LAYOUT and not images:
        bad("no image member (.jpg, .png or .webp)")
    elif not images and not has_feat:
        bad("neither an image nor region features")
    if has_feat and has_boxes:
        try:
            feat = decode_npy(members[FEAT_EXT])
            boxes = decode_npy(members[BOXES_EXT])
        except Exception as e:  # np.load: ValueError for pickles and bad headers, EOFError, ...
            bad(f"npy: cannot decode ({type(e).__name__}: {e})")
            return
        try:
            width, height = (meta.get("width", np.inf), meta.get("height", np.inf)) if meta else (np.inf, np.inf)
            validate_regions(feat, boxes, width, height)
        except ValueError as e:
            bad(str(e))
            return
        if feature_dim is not None and feat.shape[1] != feature_dim:
            bad(f"feat: dimension {feat.shape[1]} != manifest feature_dim {feature_dim}")
        report.feature_dims.add(int(feat.shape[1]))
        report.regions.add(int(feat.shape[0]))


def _iter_samples(
    tf: tarfile.TarFile, where: str, problems: list[str], allowed: tuple[str, ...] = MEMBER_EXTS
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members into samples by key (everything before the first dot)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    for info in tf:
        if not info.isfile():
            problems.append(f"{where}: member {info.name!r} is not a regular file")
            continue
        name = info.name
        if "/" in name or "." not in name:
            problems.append(f"{where}: member {name!r} is not named KEY.EXT")
            continue
        k, ext = name.split(".", 1)
        f = tf.extractfile(info)
        assert f is not None  # regular files always have data
        data = f.read()  # raises tarfile.ReadError on truncated data
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        if ext not in allowed:
            problems.append(f"{where}:{k}: unknown member extension .{ext}")
        elif ext in members:
            problems.append(f"{where}:{k}: duplicate member .{ext}")
        else:
            members[ext] = data
    if key is not None:
        yield key, members


def scan_shard(
    path: Path,
    where: str,
    split: str,
    feature_dim: int | None,
    decode_images: bool = True,
    layout: str = IAIS_LAYOUT,
) -> Report:
    """Check every sample of one shard; ``where`` prefixes problem lines."""
    report = Report(shards=1, layout=layout)
    allowed = IMG2DATASET_EXTS if layout == IMG2DATASET_LAYOUT else MEMBER_EXTS
    # A sample is only known to be complete once the next one starts or the
    # archive ends properly, so the last one is held back until then.
    pending: tuple[str, dict[str, bytes]] | None = None
    try:
        with tarfile.open(path, "r:") as tf:
            for sample in _iter_samples(tf, where, report.problems, allowed):
                if pending is not None:
                    _check_sample(report, where, *pending, split, feature_dim, decode_images, layout)
                pending = sample
            end = tf.offset
        # tarfile stops quietly when a file is cut at a block boundary; only the
        # missing end-of-archive blocks reveal that.
        with path.open("rb") as f:
            f.seek(end)
            tail = f.read(_END_OF_ARCHIVE)
        if len(tail) < _END_OF_ARCHIVE or tail.count(0) != _END_OF_ARCHIVE:
            last = f", last sample {pending[0]} possibly incomplete" if pending is not None else ""
            report.problems.append(f"{where}: truncated tar (no end-of-archive marker after byte {end}{last})")
            pending = None
    except (tarfile.TarError, EOFError, OSError) as e:
        report.problems.append(f"{where}: truncated or unreadable tar ({type(e).__name__}: {e})")
    if pending is not None:
        _check_sample(report, where, *pending, split, feature_dim, decode_images, layout)
    return report


def _scan_shard_args(args: tuple[Path, str, str, int | None, bool, str]) -> Report:
    return scan_shard(*args)


def scan_split(
    split_dir: Path,
    where: str,
    *,
    feature_dim: int | None = None,
    decode_images: bool = True,
    workers: int = 1,
    on_problem: Callable[[str], None] | None = None,
) -> Report:
    """Check all shards of one split folder against each other and ``sizes.json``."""
    split = split_dir.name
    layout = split_layout(split_dir)
    report = Report(layout=layout or IAIS_LAYOUT)
    split_problems: list[str] = []
    sizes: dict[str, int] | None = None
    if layout == IMG2DATASET_LAYOUT:
        shards = sorted(p for p in split_dir.iterdir() if p.name.endswith(SHARD_SUFFIX) and p.is_file())
        sizes = _img2dataset_sizes(split_dir, where, split_problems)
    else:
        shards = sorted(p for p in split_dir.iterdir() if SHARD_RE.match(p.name))
        for p in sorted(split_dir.iterdir()):
            if p.name.startswith(SHARD_PREFIX) and p.name.endswith(TMP_SUFFIX):
                split_problems.append(f"{where}/{p.name}: leftover temporary file (interrupted write)")
        try:
            sizes = read_sizes(split_dir)
        except FileNotFoundError:
            split_problems.append(f"{where}/{SIZES_FILE}: missing")
        except (ValueError, OSError) as e:
            split_problems.append(f"{where}/{SIZES_FILE}: unreadable ({e})")
    counts_file = "its _stats.json" if layout == IMG2DATASET_LAYOUT else SIZES_FILE
    if sizes is not None and layout != IMG2DATASET_LAYOUT:
        on_disk = {p.name for p in shards}
        split_problems += [f"{where}/{n}: listed in {SIZES_FILE} but missing" for n in sizes if n not in on_disk]
        split_problems += [f"{where}/{n}: not listed in {SIZES_FILE}" for n in sorted(on_disk - set(sizes))]

    emit = on_problem or (lambda _line: None)
    for line in split_problems:
        emit(line)
    jobs = [(p, f"{where}/{p.name}", split, feature_dim, decode_images, report.layout) for p in shards]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_scan_shard_args, jobs))
    else:
        results = (_scan_shard_args(job) for job in jobs)  # lazy: problems print as they are found
    for job, shard_report in zip(jobs, results, strict=True):
        path, shard_where = job[0], job[1]
        if sizes is not None and path.name in sizes and sizes[path.name] != shard_report.samples:
            shard_report.problems.append(
                f"{shard_where}: {counts_file} says {sizes[path.name]} samples, found {shard_report.samples}"
            )
        for line in shard_report.problems:
            emit(line)
        report.merge(shard_report)

    # Also catches non-contiguous members: tar order splits them into two samples.
    tail: list[str] = []
    first: dict[str, str] = {}
    for key, shard in report.keys:
        if key in first:
            tail.append(f"{shard}:{key}: key already used by a sample in {first[key]}")
        first.setdefault(key, shard)
    groups: dict[int, list[int]] = {}
    for group, index, _key in report.swap:
        groups.setdefault(group, []).append(index)
    tail += [
        f"{where}: swap group {g} has images {sorted(ix)}, expected [0, 1]"
        for g, ix in sorted(groups.items())
        if sorted(ix) != [0, 1]
    ]
    if len(report.feature_dims) > 1:
        tail.append(f"{where}: feature dimensions differ between samples: {sorted(report.feature_dims)}")
    for line in tail:
        emit(line)
    report.problems = split_problems + report.problems + tail
    report.keys = []  # only needed for the duplicate check
    return report


def split_layout(path: Path) -> str | None:
    """``iais_scale-shards-v1`` or ``img2dataset`` for a split folder, None for any other folder."""
    if not path.is_dir():
        return None
    names = [p.name for p in path.iterdir()]
    if any(
        n == SIZES_FILE or SHARD_RE.match(n) or (n.startswith(SHARD_PREFIX) and n.endswith(TMP_SUFFIX)) for n in names
    ):
        return IAIS_LAYOUT
    if any(n.endswith(SHARD_SUFFIX) or n.endswith(STATS_SUFFIX) for n in names):
        return IMG2DATASET_LAYOUT
    return None


def _is_split_dir(path: Path) -> bool:
    return split_layout(path) is not None


def _img2dataset_sizes(split_dir: Path, where: str, problems: list[str]) -> dict[str, int]:
    """{shard: successes} from the ``{shard}_stats.json`` files that img2dataset writes beside each tar."""
    sizes: dict[str, int] = {}
    for p in sorted(split_dir.glob(f"*{STATS_SUFFIX}")):
        shard = p.name[: -len(STATS_SUFFIX)] + SHARD_SUFFIX
        try:
            successes = json.loads(p.read_text(encoding="utf-8")).get("successes")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
            problems.append(f"{where}/{p.name}: unreadable ({e})")
            continue
        if not isinstance(successes, int) or isinstance(successes, bool) or successes < 0:
            problems.append(f"{where}/{p.name}: no sample count ('successes')")
        elif not (split_dir / shard).is_file():
            problems.append(f"{where}/{p.name}: its shard {shard} is missing")
        else:
            sizes[shard] = successes
    return sizes


@dataclass
class DatasetScan:
    """Per-split reports plus problems that belong to the data set as a whole."""

    splits: dict[str, Report]
    problems: list[str]

    @property
    def n_problems(self) -> int:
        return len(self.problems) + sum(len(r.problems) for r in self.splits.values())


def _check_manifest(root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    path = root / MANIFEST_FILE
    if not path.exists():
        return None, []
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, [f"{MANIFEST_FILE}: unreadable ({e})"]
    if not isinstance(manifest, dict):
        return None, [f"{MANIFEST_FILE}: must be a JSON object"]
    problems = []
    if manifest.get("format") != FORMAT_NAME:
        problems.append(f"{MANIFEST_FILE}: format {manifest.get('format')!r} != {FORMAT_NAME!r}")
    dim = manifest.get("feature_dim")
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        problems.append(f"{MANIFEST_FILE}: feature_dim must be a positive integer, got {dim!r}")
        manifest["feature_dim"] = None
    if not isinstance(manifest.get("splits"), dict):
        problems.append(f"{MANIFEST_FILE}: splits must map split names to sample counts")
        manifest["splits"] = {}
    return manifest, problems


def _check_tokenizer(root: Path) -> list[str]:
    tok_dir = root / TOKENIZER_DIR
    if not tok_dir.exists():
        return []
    where = f"{TOKENIZER_DIR}/tokenizer.json"
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        return [f"{where}: cannot load ({e})"]
    return [f"{where}: no {t} token" for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]


def scan_dataset(
    path: str | Path,
    *,
    decode_images: bool = True,
    workers: int = 1,
    on_problem: Callable[[str], None] | None = None,
) -> DatasetScan:
    """Scan a data set folder (all splits) or a single split folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    emit = on_problem or (lambda _line: None)
    single = _is_split_dir(path)
    root = path.parent if single else path
    manifest, problems = _check_manifest(root)
    if single:
        # A lone split folder uses its parent's manifest only for feature_dim.
        split_dirs = [path]
        problems = []
    else:
        # Manifest order first (train, val, ...), then any unlisted split folders.
        order = list(manifest["splits"]) if manifest else []
        split_dirs = sorted(
            (p for p in path.iterdir() if _is_split_dir(p)),
            key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name),
        )
        known = {p.name for p in split_dirs}
        for name in manifest["splits"] if manifest else ():
            if name not in known:
                problems.append(f"{name}: listed in {MANIFEST_FILE} but missing")
        problems += _check_tokenizer(root)
        if not split_dirs:
            problems.append(f"{path}: no split folders with shards found")
    for line in problems:
        emit(line)
    feature_dim = manifest.get("feature_dim") if manifest else None

    splits: dict[str, Report] = {}
    for split_dir in split_dirs:
        report = scan_split(
            split_dir,
            split_dir.name,
            feature_dim=feature_dim,
            decode_images=decode_images,
            workers=workers,
            on_problem=on_problem,
        )
        splits[split_dir.name] = report
        expected = manifest["splits"].get(split_dir.name) if manifest and not single else None
        if expected is not None and expected != report.samples:
            line = f"{MANIFEST_FILE}: split {split_dir.name} has {expected} samples, found {report.samples}"
            report.problems.append(line)
            emit(line)
    return DatasetScan(splits=splits, problems=problems)
