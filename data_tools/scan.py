"""Read every shard of a data set, check each sample and collect statistics (``verify``, ``stats``).

The shards are read by ``iais_scale.data.shards`` and the samples checked by the loader's own
decoding functions (``iais_scale.data.samples``), so verify and training never disagree about a
shard; verify adds the format's stricter rules (member names, one image, image type). Nothing is
ever unpickled.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from iais_scale.data import shards
from iais_scale.data.format import (
    BOXES_EXT,
    FEAT_EXT,
    GEOMETRY_EXT,
    IMAGE_EXTS,
    MANIFEST_FILE,
    MEMBER_EXTS,
    SHARD_PREFIX,
    SHARD_RE,
    SHARD_SUFFIX,
    SIZES_FILE,
    TMP_SUFFIX,
    TOKENIZER_DIR,
    Manifest,
    parse_sizes,
    validate_key,
)
from iais_scale.data.samples import TEXT_EXT, BadSample, check_image, load_regions, sample_meta
from iais_scale.data.tokenizer import SPECIAL_TOKENS

_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
# A JPEG with appended images (camera MPO files) is still a JPEG to every decoder.
_PIL_ALIASES = {"MPO": "JPEG"}

IAIS_LAYOUT = shards.IAIS_LAYOUT
IMG2DATASET_LAYOUT = shards.IMG2DATASET_LAYOUT
IMG2DATASET_EXTS: tuple[str, ...] = (*IMAGE_EXTS, TEXT_EXT, "json")
STATS_SUFFIX = shards.STATS_SUFFIX


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
    image_ids: set[str] = field(default_factory=set)
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
        self.image_ids |= other.image_ids
        self.problems.extend(other.problems)


_REASON_TEXT = {
    "missing_json": "missing .json",
    "missing_features": f"missing .{FEAT_EXT} / .{BOXES_EXT} or .{GEOMETRY_EXT}",
    "missing_image": "no image member",
    "missing_caption": "missing or empty caption (.txt)",
}


def _problem_text(e: BadSample, key: str) -> str:
    """A verify line's text for a loader's BadSample: the detail, then the loader's reason."""
    detail = str(e)[len(e.reason) + 2:] if str(e).startswith(e.reason + ": ") else ""
    detail = detail[len(key) + 2:] if detail.startswith(key + ": ") else detail
    if not detail or detail == key:
        detail = _REASON_TEXT.get(e.reason, e.reason.replace("_", " "))
    return f"{detail} [{e.reason}]"


def _check_sample(
    report: Report, where: str, raw: dict, split: str, feature_dim: int | None, decode_images: bool, layout: str,
    max_regions: int | None = None,
) -> None:
    """Check one sample with the loader's checks plus the format's rules; add its statistics."""
    key = raw["__key__"]

    def bad(reason: str) -> None:
        report.problems.append(f"{where}:{key}: {reason}")

    report.samples += 1
    report.keys.append((key, where))
    try:
        validate_key(key)
    except ValueError as e:
        bad(str(e))
    if "__too_large__" in raw:
        bad(f"members {raw['__too_large__']} over the size limit [member_too_large]")
        return
    allowed = IMG2DATASET_EXTS if layout == IMG2DATASET_LAYOUT else MEMBER_EXTS
    for ext in sorted(k for k in raw if not k.startswith("__")):
        if ext not in allowed:
            bad(f"unknown member extension .{ext}")

    meta: dict[str, Any] | None = None
    try:
        meta = sample_meta(raw)
    except BadSample as e:
        bad(_problem_text(e, key))
    if meta is not None:
        if layout != IMG2DATASET_LAYOUT and meta.get("split") != split:
            bad(f"split: {meta.get('split')!r} does not match the split folder {split!r}")
        report.image_ids.add(str(meta.get("image_id", key)))
        report.captions += len(meta["captions"])
        for caption in meta["captions"]:
            report.caption_words.add(len(caption.split()))
        if "swap" in meta:
            report.swap.append((meta["swap"]["group"], meta["swap"]["index"], key))

    images = [ext for ext in IMAGE_EXTS if ext in raw]
    if len(images) > 1:
        bad(f"several images: {', '.join(images)}")
    if images:
        report.images += 1
        ext = images[0]
        try:
            check_image(raw[ext], key)  # what the loader checks for a pixel input (PixelFields)
        except BadSample as e:
            bad(f".{ext}: {_problem_text(e, key)}")
        else:
            if decode_images:
                _decode_image(raw[ext], ext, meta, layout, bad)

    has_feat, has_boxes, has_geometry = FEAT_EXT in raw, BOXES_EXT in raw, GEOMETRY_EXT in raw
    for ext, present in ((BOXES_EXT, has_boxes), (GEOMETRY_EXT, has_geometry)):
        if present and not has_feat:
            bad(f".{ext} without .{FEAT_EXT}")
    if has_feat and not (has_boxes or has_geometry):
        bad(f".{FEAT_EXT} without .{BOXES_EXT} or .{GEOMETRY_EXT}")
    if layout == IMG2DATASET_LAYOUT and not images:
        bad("no image member (.jpg, .png or .webp)")
    elif not images and not has_feat:
        bad("neither an image nor region features")
    if has_feat and (has_boxes or has_geometry) and meta is not None:
        try:
            # The loader's own checks, including boxes against geometry when both are stored.
            feat, _, _ = load_regions(raw, meta, feature_dim=feature_dim, max_regions=max_regions)
        except BadSample as e:
            bad(_problem_text(e, key))
            return
        report.feature_dims.add(int(feat.shape[1]))
        report.regions.add(int(feat.shape[0]))


def _decode_image(data: bytes, ext: str, meta: dict | None, layout: str, bad: Callable[[str], None]) -> None:
    """The full decode (what the collator will do), the image type against its extension, its size."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            # img2dataset names every image .jpg whatever its encoding; decoders sniff the content.
            if layout == IAIS_LAYOUT and _PIL_ALIASES.get(img.format, img.format) != _PIL_FORMATS[ext]:
                bad(f".{ext}: holds a {img.format} image")
            size = (meta.get("width", img.size[0]), meta.get("height", img.size[1])) if meta else img.size
            if img.size != size:
                bad(f".{ext}: size {img.size[0]}x{img.size[1]} != json {size[0]}x{size[1]}")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        bad(f".{ext}: cannot decode image ({type(e).__name__}: {e})")


def scan_shard(
    path: Path,
    where: str,
    split: str,
    feature_dim: int | None,
    decode_images: bool = True,
    layout: str = IAIS_LAYOUT,
    max_member_bytes: int = shards.MAX_MEMBER_BYTES,
) -> Report:
    """Check every sample of one shard; ``where`` prefixes problem lines."""
    report = Report(shards=1, layout=layout)

    def note(kind: str, detail: str) -> None:
        if kind == "member_too_large":
            return  # reported with its sample
        report.problems.append(f"{where}: {detail}")

    try:
        with open(path, "rb") as f:
            for raw in shards.iter_samples(f, str(path), note=note, max_member_bytes=max_member_bytes):
                _check_sample(report, where, raw, split, feature_dim, decode_images, layout)
    except shards.ShardError as e:
        report.problems.append(f"{where}: {e}")
    except OSError as e:
        report.problems.append(f"{where}: unreadable ({type(e).__name__}: {e})")
    return report


def _scan_shard_args(args: tuple) -> Report:
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
            sizes = parse_sizes((split_dir / SIZES_FILE).read_bytes(), f"{where}/{SIZES_FILE}")
        except FileNotFoundError:
            split_problems.append(f"{where}/{SIZES_FILE}: missing")
        except (ValueError, OSError) as e:
            split_problems.append(str(e) if isinstance(e, ValueError) else f"{where}/{SIZES_FILE}: unreadable ({e})")
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
    return shards.layout_of(str(path))


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


def _check_manifest(root: Path) -> tuple[Manifest | None, list[str]]:
    try:
        manifest, problems = Manifest.load(root)
    except OSError as e:
        return None, [f"{MANIFEST_FILE}: unreadable ({e})"]
    return manifest, [f"{MANIFEST_FILE}: {p}" for p in problems]


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
        order = list(manifest.splits) if manifest else []
        split_dirs = sorted(
            (p for p in path.iterdir() if _is_split_dir(p)),
            key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name),
        )
        known = {p.name for p in split_dirs}
        for name in manifest.splits if manifest else ():
            if name not in known:
                problems.append(f"{name}: listed in {MANIFEST_FILE} but missing")
        problems += _check_tokenizer(root)
        if not split_dirs:
            problems.append(f"{path}: no split folders with shards found")
    for line in problems:
        emit(line)
    feature_dim = manifest.feature_dim if manifest else None

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
        expected = manifest.splits.get(split_dir.name) if manifest and not single else None
        if expected is not None and expected != report.samples:
            line = f"{MANIFEST_FILE}: split {split_dir.name} has {expected} samples, found {report.samples}"
            report.problems.append(line)
            emit(line)
    # The same image in two splits (a test shard copied into train, say) inflates test scores.
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = splits[a].image_ids & splits[b].image_ids
            if shared:
                line = f"splits {a} and {b} share {len(shared)} image id(s), e.g. {sorted(shared)[:3]}"
                problems.append(line)
                emit(line)
    for r in splits.values():
        r.image_ids = set()
    return DatasetScan(splits=splits, problems=problems)
