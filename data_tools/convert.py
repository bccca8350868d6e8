"""Shared machinery of the converters (``karpathy``, ``coco``, ``table``, ``features``).

A converter turns its source into :class:`Record` objects (one per image, all
its captions, the image file and/or the region-feature file to read) collected
in :class:`Inputs`, which also keeps the problems met while collecting
(empty captions, duplicate entries, ...). :func:`run_conversion` does the rest,
the same way for every source:

1. per split, sort the records by image id and shuffle them with ``--seed``
   (a pure function of the seed and the split name);
2. read each record's image and features (:func:`load_record`), in ``--workers``
   processes with ordered results, so the output never depends on timing;
3. write the samples with :class:`~iais_scale.data.format.ShardWriter` under
   keys ``{split}-{index:06d}`` and log each completed shard to
   ``{split}/progress.jsonl``; a rerun of the same command resumes after the last
   logged shard and produces byte-identical output;
4. write ``{split}/skipped.json`` (every input that was skipped or changed, by
   reason), then ``manifest.json``, then delete the progress logs.

Bad inputs never stop a run: they are counted by reason, listed in
``skipped.json`` and printed in the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iais_scale.data.format import (
    FORMAT_NAME,
    MANIFEST_FILE,
    SHARD_PREFIX,
    SHARD_RE,
    SIZES_FILE,
    TMP_SUFFIX,
    Manifest,
    ShardWriter,
    sample_key,
    shard_name,
    write_json_atomic,
)

from .regions import load_regions

PROGRESS_FILE = "progress.jsonl"
SKIPPED_FILE = "skipped.json"
# Bump when the same inputs and parameters would give different shards.
CONVERTER_VERSION = 1

# What happens to the input for each reason (printed in the summary, documented
# in docs/data-format.md).
REASONS: dict[str, str] = {
    "missing_image": "sample skipped",
    "unreadable_image": "sample skipped",
    "missing_features": "sample skipped",
    "bad_features": "sample skipped",
    "no_captions": "sample skipped",
    "duplicate_image": "entry skipped",
    "unknown_image": "captions skipped",
    "bad_split": "rows skipped",
    "empty_caption": "caption dropped",
    "split_conflict": "captions kept in the image's first split",
    "reencoded_image": "image re-encoded as PNG",
    "bad_path": "sample skipped (the path leaves the image folder, or holds a NUL byte)",
}
SPLIT_ORDER = ("train", "val", "test")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")
# PIL format -> member extension for images stored as they are.
PASS_THROUGH = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
MAX_LISTED = 5  # problems printed per split in the summary


def valid_split_name(name: object) -> bool:
    """Split names become folder names and key prefixes: letters, digits, ``-``, ``_``."""
    return isinstance(name, str) and bool(_SPLIT_RE.match(name))


def parse_bytes(text: str) -> int:
    """``"1000"``, ``"512K"``, ``"500M"``, ``"1G"`` (powers of 1024) as a number of bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 1000000, 500M, 1G)")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Record:
    """One image of the source with all its captions, before anything is read."""

    image_id: str
    split: str
    captions: tuple[str, ...]
    image: str | None  # path of the image file, None for feature-only data
    features: str | None  # path of the .npz region features, None if none was found
    source: str  # where the entry was found, for problem listings


def issue(reason: str, image_id: str | None, where: str, detail: str = "") -> dict[str, Any]:
    """One listed problem: the reason (a key of REASONS), the image, the offending input and details."""
    assert reason in REASONS, reason
    return {"reason": reason, "image_id": image_id, "input": where, "detail": detail}


def index_features(features_dir: str | os.PathLike[str] | None) -> dict[str, str]:
    """Map file stem -> path of every ``.npz`` under ``features_dir`` (recursively, first in sorted order wins)."""
    if features_dir is None:
        return {}
    root = Path(features_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--features {root}: not a directory")
    index: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".npz"):
                index.setdefault(name[: -len(".npz")], os.path.join(dirpath, name))
    return index


def inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in folder ``root`` by its name (``..`` and absolute paths resolved
    lexically; symlinks inside the folder are the user's own and are followed)."""
    r = os.path.normpath(os.path.abspath(root))
    p = os.path.normpath(os.path.abspath(path))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


class Inputs:
    """Records per split plus the problems met while collecting them. Image paths must lie in
    ``image_root`` (a source file naming ``../secret.png`` or ``/etc/...`` is refused per record)."""

    def __init__(self, features_dir: str | os.PathLike[str] | None = None,
                 image_root: str | os.PathLike[str] | None = None) -> None:
        self.image_root = image_root
        self.want_features = features_dir is not None
        self._features = index_features(features_dir)
        self.splits: dict[str, list[Record]] = {}
        self.issues: dict[str | None, list[dict[str, Any]]] = {}  # None: inputs with no valid split
        self._seen: dict[str, str] = {}  # image_id -> split

    def note(self, split: str | None, item: dict[str, Any]) -> None:
        self.issues.setdefault(split, []).append(item)

    def add(
        self,
        split: str,
        image_id: str,
        captions: Iterable[Any],
        *,
        image: str | os.PathLike[str] | None,
        feature_stems: Sequence[str] = (),
        source: str,
    ) -> None:
        """Add one image; empty captions are dropped and listed, an image without captions is listed."""
        if not valid_split_name(split):
            self.note(None, issue("bad_split", image_id, source, f"split {split!r}: use letters, digits, '-', '_'"))
            return
        if image_id in self._seen:
            self.note(
                split,
                issue("duplicate_image", image_id, source, f"image id already used in split {self._seen[image_id]}"),
            )
            return
        if image is not None:
            if "\0" in str(image) or "\0" in image_id:
                self.note(split, issue("bad_path", image_id.replace("\0", "\\0"), source, "NUL byte in the name"))
                return
            if self.image_root is not None and not inside(self.image_root, image):
                self.note(split, issue("bad_path", image_id, source, f"{image} is outside {self.image_root}"))
                return
        kept = []
        for i, caption in enumerate(captions):
            text = caption.strip() if isinstance(caption, str) else ""
            if text:
                kept.append(text)
            else:
                self.note(split, issue("empty_caption", image_id, source, f"caption {i}: {caption!r}"))
        if not kept:
            self.note(split, issue("no_captions", image_id, source, "no non-empty caption"))
            return
        features = next((self._features[s] for s in feature_stems if s in self._features), None)
        self._seen[image_id] = split
        self.splits.setdefault(split, []).append(
            Record(image_id, split, tuple(kept), None if image is None else str(image), features, source)
        )


# ---------------------------------------------------------------- reading one record


@dataclass(frozen=True)
class LoadOptions:
    want_features: bool
    check_decode: bool = True
    feature_dtype: str = "keep"  # keep | float16 | float32
    max_array_bytes: int = 512 << 20  # an .npz declaring more is refused before it is expanded


@dataclass
class Loaded:
    meta: dict[str, Any]
    image: bytes | None
    image_ext: str
    feat: np.ndarray | None
    boxes: np.ndarray | None
    notes: list[dict[str, Any]] = field(default_factory=list)
    geometry: np.ndarray | None = None  # 7-d box geometry (UNITER's img_db), with or instead of boxes
    key: str | None = None  # the sample's key in the output; default: {split}-{n:06d}
    source: str = ""  # where the image came from, and the features: named by issues found when writing
    features_source: str = ""


def inspect_image(data: bytes, check_decode: bool) -> tuple[bytes, str, int, int, bool]:
    """Return (bytes to store, extension, width, height, re-encoded?) of an encoded image.

    JPEG, PNG and WebP are stored as they are; the size comes from the header.
    With ``check_decode`` the image is also decoded (JPEG at 1/8 scale, which still
    reads every byte of entropy-coded data), so truncated files are caught here and
    not in ``verify`` or training. Other formats (GIF, BMP, TIFF, ...) are
    re-encoded as PNG. Raises whatever PIL raises for undecodable data.
    """
    from PIL import Image

    if not data:
        raise ValueError("empty file")
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        fmt = img.format
        if fmt in PASS_THROUGH:
            if check_decode:
                if fmt in ("JPEG", "MPO"):
                    img.draft(None, (max(1, width // 8), max(1, height // 8)))
                img.load()
            return data, PASS_THROUGH[fmt], width, height, False
        img.load()
        mode = "RGBA" if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info else "RGB"
        buf = io.BytesIO()
        img.convert(mode).save(buf, format="PNG")
        return buf.getvalue(), "png", width, height, True


def load_record(opts: LoadOptions, rec: Record) -> Loaded | dict[str, Any]:
    """Read one record's image and features; a problem comes back as an :func:`issue` dict."""
    image: bytes | None = None
    ext = "png"
    size: tuple[int, int] | None = None
    notes: list[dict[str, Any]] = []
    if rec.image is not None:
        try:
            data = Path(rec.image).read_bytes()
        except FileNotFoundError:
            return issue("missing_image", rec.image_id, rec.image, "no such file")
        except OSError as e:
            return issue("unreadable_image", rec.image_id, rec.image, f"{type(e).__name__}: {e}")
        try:
            image, ext, width, height, reencoded = inspect_image(data, opts.check_decode)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            return issue("unreadable_image", rec.image_id, rec.image, f"{type(e).__name__}: {e}")
        size = (width, height)
        if reencoded:
            notes.append(issue("reencoded_image", rec.image_id, rec.image, "not JPEG/PNG/WebP"))
    feat = boxes = None
    if opts.want_features:
        if rec.features is None:
            return issue("missing_features", rec.image_id, rec.source, "no .npz with a matching file stem")
        try:
            feat, boxes, size = load_regions(rec.features, size, opts.feature_dtype, max_bytes=opts.max_array_bytes)
        except Exception as e:  # np.load: ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError ...
            return issue(
                "bad_features",
                rec.image_id,
                rec.features,
                f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e),
            )
    assert size is not None  # a record has an image or features
    meta = {
        "image_id": rec.image_id,
        "split": rec.split,
        "width": size[0],
        "height": size[1],
        "captions": list(rec.captions),
    }
    return Loaded(meta, image, ext, feat, boxes, notes, source=str(rec.source), features_source=str(rec.features))


# ---------------------------------------------------------------- ordering


def order_records(records: Sequence[Record], seed: int, split: str) -> list[Record]:
    """Sort by image id, then shuffle with a generator seeded by (seed, split)."""
    ordered = sorted(records, key=lambda r: r.image_id)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return [ordered[i] for i in rng.permutation(len(ordered))]


def records_digest(records: Sequence[Record]) -> str:
    """Fingerprint of an ordered record list: a resumed run must see the same inputs."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(asdict(r), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def sort_splits(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [s for s in SPLIT_ORDER if s in names] + sorted(names - set(SPLIT_ORDER))


# ---------------------------------------------------------------- progress log


class Progress:
    """``{split}/progress.jsonl``: a header line, then one line per completed shard, then a completion line.

    Each shard line records what a resumed run needs to continue exactly where
    this one stopped: the shard's sample count and byte size (checked against the
    file), the number of records consumed up to its last sample (``records_end``),
    the feature dimension known so far and the problems met among those records.
    The file is append-only; a torn last line (killed while appending) is ignored.
    """

    def __init__(self, split_dir: Path, header: dict[str, Any]) -> None:
        self.path = split_dir / PROGRESS_FILE
        self.header = header
        self.shards: list[dict[str, Any]] = []
        self.complete: dict[str, Any] | None = None

    def load(self) -> bool:
        """Read the log of an earlier run with the same header; keep its valid prefix. False if unusable."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return False
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                break
        if not entries or entries[0].get("header") != self.header:
            return False
        for entry in entries[1:]:
            if "complete" in entry:
                self.complete = entry
                break
            path = self.path.parent / str(entry.get("shard"))
            if (
                entry.get("shard") != shard_name(len(self.shards))
                or not path.is_file()
                or path.stat().st_size != entry.get("bytes")
            ):
                break
            self.shards.append(entry)
        if self.complete is not None and not (self.path.parent / SIZES_FILE).is_file():
            self.complete = None
        return True

    def start(self) -> None:
        """(Re)write the log with the header and the shard lines kept by :meth:`load`."""
        lines = [{"header": self.header}, *self.shards, *([self.complete] if self.complete else [])]
        tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in lines), encoding="utf-8")
        os.replace(tmp, self.path)

    def append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if "complete" in entry:
            self.complete = entry
        else:
            self.shards.append(entry)


def _after_shard(split: str, name: str) -> None:
    """Called after each shard is complete and logged. Tests replace it to simulate a killed run."""


# ---------------------------------------------------------------- conversion


@dataclass
class SplitResult:
    samples: int
    shards: int
    feature_dim: int | None
    issues: list[dict[str, Any]]


def write_split(
    split_dir: Path,
    records: Sequence[Any],
    issues: list[dict[str, Any]],
    header: dict[str, Any],
    feature_dim: int | None,
    load: Callable[[Sequence[Any]], Iterable[Loaded | dict[str, Any]]],
    *,
    shard_size: int,
    max_shard_bytes: int | None,
    overwrite: bool,
    log: Callable[[str], None] = print,
    reasons: Iterable[str] = REASONS,
) -> SplitResult:
    """Write one split from ``load(records)`` (a Loaded sample or an issue per record, in order), resuming
    from its progress log when it matches, then its skipped.json (issues counted in the order of
    ``reasons``); see the module docstring. Every converter writes through here."""
    split = split_dir.name
    split_dir.mkdir(parents=True, exist_ok=True)
    refuse_foreign_files(split_dir, overwrite)
    progress = Progress(split_dir, header)
    stale = progress.path.exists()  # a log of ours: the folder may be cleared
    resumed = not overwrite and progress.load()
    if stale and not resumed and not overwrite:
        log(f"{split}: inputs or parameters changed since the interrupted run; starting this split afresh")
    if resumed and progress.complete is not None:
        done = progress.complete
        items = [*issues, *(i for s in progress.shards for i in s["issues"]), *done["issues"]]
        return _skipped(split_dir, SplitResult(sum(s["samples"] for s in progress.shards), len(progress.shards),
                                               done["feature_dim"], items), reasons)
    if resumed and progress.shards:
        feature_dim = progress.shards[-1]["feature_dim"]
    start = progress.shards[-1]["records_end"] if progress.shards else 0
    progress.start()

    pending: list[int] = []  # record index of each sample in the open shard
    open_issues: list[dict[str, Any]] = []  # problems of records not yet covered by a logged shard

    def shard_done(name: str, count: int) -> None:
        assert len(pending) == count
        end = pending[-1] + 1
        logged = [i for i in open_issues if i["record"] < end]
        open_issues[:] = [i for i in open_issues if i["record"] >= end]
        progress.append({"shard": name, "samples": count, "bytes": (split_dir / name).stat().st_size,
                         "records_end": end, "feature_dim": feature_dim, "issues": logged})
        pending.clear()
        _after_shard(split, name)

    from tqdm import tqdm

    resume = {s["shard"]: s["samples"] for s in progress.shards} if resumed else None
    writer = ShardWriter(split_dir, shard_size=shard_size, max_shard_bytes=max_shard_bytes,
                         overwrite=overwrite or stale, resume=resume, on_shard_done=shard_done)
    with writer, tqdm(total=len(records), initial=start, desc=split, unit="img", disable=None, leave=False) as bar:
        for index, result in zip(range(start, len(records)), load(records[start:]), strict=True):
            bar.update()
            if isinstance(result, dict):
                open_issues.append({**result, "record": index})
                continue
            image_id = result.meta["image_id"]
            if result.feat is not None:
                dim = int(result.feat.shape[1])
                if feature_dim is None:
                    feature_dim = dim
                elif dim != feature_dim:
                    detail = f"feature dimension {dim} != {feature_dim} of the samples before"
                    open_issues.append({**issue("bad_features", image_id, result.features_source, detail),
                                        "record": index})
                    continue
            try:
                writer.write(result.key or sample_key(split, writer.n_samples), result.meta, image=result.image,
                             image_ext=result.image_ext, feat=result.feat, boxes=result.boxes, geometry=result.geometry)
            except ValueError as e:  # the loaders check what the writer checks; this is a safety net
                regions = str(e).startswith(("feat", "boxes", "geometry"))
                reason, where = ("bad_features", result.features_source) if regions else ("unreadable_image",
                                                                                            result.source)
                open_issues.append({**issue(reason, image_id, where, str(e)), "record": index})
                continue
            pending.append(index)
            open_issues.extend({**n, "record": index} for n in result.notes)
    progress.append({"complete": True, "feature_dim": feature_dim, "issues": open_issues})
    items = [*issues, *(i for s in progress.shards for i in s["issues"]), *open_issues]
    return _skipped(split_dir, SplitResult(writer.n_samples, len(writer.sizes), feature_dim, items), reasons)


def refuse_foreign_files(split_dir: Path, overwrite: bool) -> None:
    """A split folder holding files but no progress log of ours is someone else's: refused before
    anything is written into it (a progress log left by a refusal would make the next run take the
    folder for its own), unless ``overwrite``."""
    if overwrite or not split_dir.is_dir() or (split_dir / PROGRESS_FILE).exists():
        return
    foreign = sorted(p.name for p in split_dir.iterdir())
    if foreign:
        raise FileExistsError(f"{split_dir} holds files this converter did not write ({', '.join(foreign[:4])}"
                              f"{', ...' if len(foreign) > 4 else ''}); pass --overwrite to replace them, or choose"
                              " another output folder")


def _skipped(split_dir: Path, result: SplitResult, reasons: Iterable[str]) -> SplitResult:
    """Write the split's skipped.json (counts per reason, then every issue) and pass ``result`` on."""
    listing = {"counts": counts(result.issues, reasons), "items": public(result.issues)}
    write_json_atomic(split_dir / SKIPPED_FILE, listing)
    return result


@contextlib.contextmanager
def _loader(
    opts: LoadOptions, workers: int, n: int
) -> Iterator[Callable[[Sequence[Record]], Iterable[Loaded | dict[str, Any]]]]:
    """A function reading records in order: in this process, or in a pool of ``workers`` processes."""
    fn = functools.partial(load_record, opts)
    if workers <= 1 or n < 2:
        yield lambda records: map(fn, records)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
        chunk = max(1, min(32, n // (4 * workers)))
        # imap yields in input order whatever the finishing order, so the output is deterministic.
        yield lambda records: pool.imap(fn, records, chunksize=chunk)


def public(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issues as skipped.json lists them (without the internal record index)."""
    return [{k: v for k, v in i.items() if k != "record"} for i in items]


def counts(items: list[dict[str, Any]], reasons: Iterable[str] = REASONS) -> dict[str, int]:
    """Issues per reason, in the order of ``reasons`` (a converter's table), any others after them."""
    n = Counter(i["reason"] for i in items)
    order = list(reasons)
    return {r: n[r] for r in [*order, *sorted(set(n) - set(order))] if n[r]}


def previous_run(out_path: Path, generator: str, params: dict, overwrite: bool, out: Callable[[str], None]) -> dict | None:
    """The manifest of a complete earlier run into ``out_path`` with the same generator and params (the
    caller returns it: nothing to do), else None. A data set made otherwise is replaced only with
    ``overwrite``, and its manifest goes first: a crash while writing must not leave it vouching for
    half-written data. An unreadable manifest counts as another data set's."""
    manifest_path = out_path / MANIFEST_FILE
    if not manifest_path.exists():
        return None
    old, problems = Manifest.load(out_path)
    if not overwrite and old is not None and not problems and old.generator == generator and old.params == params:
        for split_dir in out_path.iterdir():
            if split_dir.is_dir():
                (split_dir / PROGRESS_FILE).unlink(missing_ok=True)
        out(f"{out_path}: already converted with these parameters; nothing to do (--overwrite to redo)")
        return old.to_dict()
    if not overwrite:
        raise FileExistsError(f"{out_path} holds a data set made with other parameters; pass --overwrite to replace it")
    manifest_path.unlink()
    return None


def clear_other_splits(out_path: Path, splits, overwrite: bool) -> None:
    """Remove the splits of an earlier, different conversion into ``out_path`` that this one does not
    write (with ``overwrite``, also bare shard folders), so the data set holds only its own splits."""
    for split_dir in sorted(p for p in out_path.iterdir() if p.is_dir() and p.name not in splits):
        if _is_ours(split_dir) or (overwrite and any(SHARD_RE.match(p.name) for p in split_dir.iterdir())):
            _clear_split_dir(split_dir)


def _is_ours(split_dir: Path) -> bool:
    return (split_dir / PROGRESS_FILE).is_file() or (split_dir / SKIPPED_FILE).is_file()


def _clear_split_dir(split_dir: Path) -> None:
    """Delete the files a conversion writes in a split folder (nothing else), and the folder if then empty."""
    for p in split_dir.iterdir():
        if (
            SHARD_RE.match(p.name)
            or p.name in (SIZES_FILE, PROGRESS_FILE, SKIPPED_FILE, PROGRESS_FILE + TMP_SUFFIX)
            or (p.name.startswith(SHARD_PREFIX) and p.name.endswith(TMP_SUFFIX))
        ):
            p.unlink()
    if not any(split_dir.iterdir()):
        split_dir.rmdir()


def run_conversion(
    out_dir: str | os.PathLike[str],
    *,
    generator: str,
    params: dict[str, Any],
    inputs: Inputs,
    seed: int,
    shard_size: int = 1000,
    max_shard_bytes: int | None = None,
    workers: int = 1,
    check_decode: bool = True,
    feature_dtype: str = "keep",
    overwrite: bool = False,
    allow_empty_splits: bool = False,
    max_array_mb: int = 512,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write ``inputs`` as a data set in ``out_dir`` (resuming an interrupted run) and return its manifest.

    ``params`` identify the conversion (the manifest records them); a complete
    data set with the same generator and params is left as it is, one with other
    params is only replaced with ``overwrite``.
    """
    out_path = Path(out_dir)
    params = {
        **params,
        "seed": seed,
        "shard_size": shard_size,
        "max_shard_bytes": max_shard_bytes,
        "check_decode": check_decode,
        "feature_dtype": feature_dtype,
        "version": CONVERTER_VERSION,
    }
    old = previous_run(out_path, generator, params, overwrite, out)
    if old is not None:
        return old
    out_path.mkdir(parents=True, exist_ok=True)

    # Splits whose every input failed are converted too: they end empty and are reported as such.
    splits = sort_splits({*inputs.splits, *(s for s in inputs.issues if s is not None)})
    bad = [s for s in splits if not valid_split_name(s)]
    if bad:
        raise ValueError(f"invalid split name(s) {bad}: use letters, digits, '-' and '_' (at most 80)")
    clear_other_splits(out_path, splits, overwrite)
    for split in splits:  # all of them before the first is written
        refuse_foreign_files(out_path / split, overwrite)

    opts = LoadOptions(want_features=inputs.want_features, check_decode=check_decode, feature_dtype=feature_dtype,
                       max_array_bytes=max_array_mb << 20)
    feature_dim: int | None = None
    results: dict[str, SplitResult] = {}
    for split in splits:
        records = order_records(inputs.splits.get(split, []), seed, split)
        header = {"generator": generator, "params": params, "records": len(records), "digest": records_digest(records)}
        # The pool starts before the progress bar, so no thread of ours exists yet when the workers fork.
        with _loader(opts, workers, len(records)) as load:
            result = write_split(out_path / split, records, inputs.issues.get(split, []), header, feature_dim, load,
                                 shard_size=shard_size, max_shard_bytes=max_shard_bytes, overwrite=overwrite, log=out)
        if result.feature_dim is not None:
            feature_dim = result.feature_dim
        results[split] = result
    unsplit = inputs.issues.get(None, [])
    if unsplit:
        write_json_atomic(out_path / SKIPPED_FILE, {"counts": counts(unsplit), "items": public(unsplit)})
    else:
        (out_path / SKIPPED_FILE).unlink(missing_ok=True)
    empty = {s: counts(r.issues) for s, r in results.items() if r.samples == 0}
    if empty and not allow_empty_splits:
        # No manifest: the data set is not complete. The listings say why each input was skipped.
        _summary(out_path, results, unsplit, out)
        raise ValueError(
            "split(s) ended empty: " + "; ".join(f"{s} (skipped: {c or 'no inputs'}; see {out_path / s / SKIPPED_FILE})"
                                                 for s, c in empty.items())
            + " (pass --allow-empty-splits to write them anyway)"
        )

    manifest = {
        "format": FORMAT_NAME,
        "feature_dim": feature_dim,
        "generator": generator,
        "params": params,
        "splits": {s: r.samples for s, r in results.items()},
        "skipped": {s: counts(r.issues) for s, r in results.items()},
    }
    write_json_atomic(out_path / MANIFEST_FILE, manifest, sort_keys=False)
    for split in splits:
        (out_path / split / PROGRESS_FILE).unlink(missing_ok=True)
    _summary(out_path, results, unsplit, out)
    return manifest


def _summary(
    out_path: Path, results: dict[str, SplitResult], unsplit: list[dict[str, Any]], out: Callable[[str], None]
) -> None:
    def problems(where: str, items: list[dict[str, Any]], listing: Path) -> None:
        for reason, n in counts(items).items():
            out(f"  {reason}: {n} ({REASONS[reason]})")
        for i in items[:MAX_LISTED]:
            detail = f": {i['detail']}" if i["detail"] else ""
            out(f"    {i['reason']} {i['image_id']} {i['input']}{detail}")
        if items:
            more = f"{len(items) - MAX_LISTED} more, " if len(items) > MAX_LISTED else ""
            out(f"    ({more}all listed in {listing})")

    for split, r in results.items():
        note = f", {len(r.issues)} problem(s)" if r.issues else ""
        out(f"{split}: {r.samples} samples in {r.shards} shard(s){note}")
        problems(split, r.issues, out_path / split / SKIPPED_FILE)
    if unsplit:
        out(f"(no split): {len(unsplit)} problem(s)")
        problems("", unsplit, out_path / SKIPPED_FILE)
    total = sum(r.samples for r in results.values())
    n_issues = sum(len(r.issues) for r in results.values()) + len(unsplit)
    out(
        f"wrote {total} samples to {out_path}"
        + (f"; {n_issues} input problem(s), see skipped.json" if n_issues else "")
    )


# ---------------------------------------------------------------- command line


def add_common_args(p: argparse.ArgumentParser, *, features_help: str | None = None) -> None:
    p.add_argument("--out", required=True, help="output data set folder (one sub-folder per split)")
    p.add_argument(
        "--features",
        metavar="DIR",
        help=features_help or "folder of per-image .npz region features (BUTD style), matched by file stem",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--max-shard-bytes", type=parse_bytes, default=None, help="also start a new shard before this size, e.g. 500M"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order (and of split assignment)")
    p.add_argument("--workers", type=int, default=1, help="processes reading images and features")
    p.add_argument("--feature-dtype", choices=("keep", "float16", "float32"), default="keep")
    p.add_argument(
        "--no-decode-check", action="store_true", help="read image headers only; do not decode to catch corrupt files"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a data set made with other parameters")
    p.add_argument("--allow-empty-splits", action="store_true",
                   help="write a split whose every input was skipped (an error otherwise)")
    p.add_argument("--max-array-mb", type=int, default=512,
                   help="refuse a features .npz declaring more than this before expanding it (default 512)")


def run_from_args(args: argparse.Namespace, generator: str, params: dict[str, Any], inputs: Inputs) -> int:
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    run_conversion(
        args.out,
        generator=generator,
        params={**params, "features": _abs(args.features)},
        inputs=inputs,
        seed=args.seed,
        shard_size=args.shard_size,
        max_shard_bytes=args.max_shard_bytes,
        workers=args.workers,
        check_decode=not args.no_decode_check,
        feature_dtype=args.feature_dtype,
        overwrite=args.overwrite,
        allow_empty_splits=args.allow_empty_splits,
        max_array_mb=args.max_array_mb,
    )
    return 0


def _abs(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else str(Path(path).resolve())
