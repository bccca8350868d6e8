"""The read side of the shard format: tar members -> samples, and a split's shards and sizes.

One tar reader and one grouping rule (``docs/data-format.md``, "Reading shards") for every reader:
the training streams, evaluation sets, ``data_tools verify/stats`` and the pictures. Shards may be
local files (skipped into by seeking) or any URL of ``storage`` (skipped into by reading headers
and discarding bytes). Hostile tars cannot hang or exhaust it: every header moves forward, sizes
are bounded, and any violation ends the shard with ``ShardError``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from . import format as fmt, storage

log = logging.getLogger(__name__)

STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard statistics beside each tar
IAIS_LAYOUT = "iais_scale-shards-v1"
IMG2DATASET_LAYOUT = "img2dataset"
LIST_LAYOUT = "shard list"

MAX_MEMBER_BYTES = 256 << 20  # default cap on one member (a sample's features or image)
_MAX_HEADER_DATA = 1 << 20  # PAX/GNU long-name records are small; a larger one is hostile
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# WebDataset's rule: the key is the member path up to the first dot of its file name.
_MEMBER_RE = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, fifos: size is ignored (as tarfile)


class ShardError(Exception):
    """A shard that cannot be read on: a bad or hostile header, or a truncated file."""


class TruncatedShard(ShardError):
    """The bytes end before the tar does (a cut file, or a transfer that ended early: worth a retry)."""


Note = Callable[[str, str], None]  # (kind, detail): format deviations that verify reports


# --------------------------------------------------------------------------- tar headers


def _number(field: bytes, offset: int) -> int:
    """A numeric header field: octal text, or GNU base-256 (positive only)."""
    if field[0] & 0x80:
        if field[0] != 0x80:
            raise ShardError(f"negative base-256 number in the header at offset {offset}")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardError(f"invalid number {text!r} in the header at offset {offset}") from None


def _pax(data: bytes, offset: int) -> dict[str, str]:
    """PAX records ``"LEN key=value\\n"``; each must be well-formed and move forward."""
    out, i = {}, 0
    while i < len(data) and data[i] != 0:
        space = data.find(b" ", i, i + 21)
        digits = data[i:space]
        if space < 0 or not digits.isdigit():
            raise ShardError(f"malformed PAX record at offset {offset}")
        length = int(digits)
        if length <= space - i + 1 or i + length > len(data):
            raise ShardError(f"PAX record length {length} out of bounds at offset {offset}")
        key, eq, value = data[space + 1 : i + length - 1].partition(b"=")
        if not eq:
            raise ShardError(f"malformed PAX record at offset {offset}")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


class _Cursor:
    """Sequential reads of a stream with an offset; skips seek where the stream can, else read."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.offset = f, 0
        try:
            self.can_seek = bool(f.seekable())
        except (OSError, ValueError):
            self.can_seek = False
        self.end = None  # where a seekable stream ends: no skip may go past it
        if self.can_seek:
            try:
                here = f.tell()
                self.end = f.seek(0, 2) - here
                f.seek(here)
            except (OSError, ValueError):
                self.can_seek = False

    def read(self, n: int) -> bytes:
        parts, left = [], n
        while left > 0:
            chunk = self.f.read(min(left, 1 << 24))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.can_seek:
            if self.offset + n > self.end:  # also a hostile size: never seek past the end
                raise TruncatedShard(f"truncated: {n} bytes to skip at offset {self.offset}, {self.end} in the file")
            self.f.seek(n, 1)
            self.offset += n
            return
        while n > 0:  # forward-only streams: read and discard, 1 MiB at a time
            got = len(self.read(min(n, 1 << 20)))
            if got == 0:
                raise TruncatedShard(f"truncated: data ends at offset {self.offset}")
            n -= got


def iter_members(
    f: IO[bytes], *, want: Callable[[str], bool] = lambda name: True, note: Note | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, bytes | None, int]]:
    """(name, data, size) of each regular member of an uncompressed tar stream, in order.

    ``data`` is None for members that ``want`` declines (their bytes are skipped) and for members
    over ``max_member_bytes`` (noted as ``member_too_large``). Other member types are noted and
    passed over. Raises ``ShardError`` for a bad checksum, a hostile field or a truncated file.
    """
    cur = _Cursor(f)
    long_name, pax = None, {}
    while True:
        at = cur.offset
        header = cur.read(_BLOCK)
        if len(header) < _BLOCK:
            raise TruncatedShard(f"truncated: {len(header)} header bytes at offset {at} (no end-of-archive marker)")
        if header == _ZERO_BLOCK:
            if len(cur.read(_BLOCK)) < _BLOCK:
                raise TruncatedShard("truncated: end-of-archive marker incomplete")
            return
        stored = _number(header[148:156], at)
        unsigned = sum(header) - sum(header[148:156]) + 256
        signed = unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:])
        if stored not in (unsigned, signed):
            raise ShardError(f"invalid header checksum at offset {at}")
        size, kind = _number(header[124:136], at), header[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            if size > _MAX_HEADER_DATA:
                raise ShardError(f"extended header of {size} bytes at offset {at}")
            data = cur.read(size)
            if len(data) < size:
                raise TruncatedShard(f"truncated: extended header at offset {at}")
            cur.skip(-size % _BLOCK)
            if kind == b"x":
                pax = _pax(data, at)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = long_name or pax.get("path")
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if "size" in pax:
            text = pax["size"]
            if not (text.isascii() and text.isdigit() and len(text) <= 20):  # 20 digits: beyond any file
                raise ShardError(f"PAX size {text[:40]!r} of {name!r} at offset {at}")
            size = int(text)
        long_name, pax = None, {}
        padded = size + (-size % _BLOCK)
        if kind not in _REGULAR:
            if note is not None:
                note("not_a_file", f"member {name!r} is not a regular file (type {kind!r})")
            cur.skip(0 if kind in _NO_DATA else padded)
            continue
        if size > max_member_bytes:
            if note is not None:
                note("member_too_large", f"member {name!r}: {size} bytes > limit {max_member_bytes}")
            cur.skip(padded)
            yield name, None, size
            continue
        if not want(name):
            cur.skip(padded)
            yield name, None, size
            continue
        data = cur.read(size)
        if len(data) < size:
            raise TruncatedShard(f"truncated: member {name!r} at offset {at}")
        cur.skip(padded - size)
        yield name, data, size


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name by WebDataset's rule, or None."""
    match = _MEMBER_RE.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


class _Grouper:
    """The grouping rule's state: the current sample's key, extensions and index."""

    def __init__(self, start: int) -> None:
        self.start, self.key, self.exts, self.index = start, None, set(), -1

    def starts_sample(self, key: str, ext: str) -> bool:
        return key != self.key or ext in self.exts

    def wants(self, name: str) -> bool:
        """Whether a member's bytes are needed: it belongs to a sample at or after ``start``."""
        parts = split_name(name)
        if parts is None:
            return False
        return self.index + self.starts_sample(*parts) >= self.start


def iter_samples(
    f: IO[bytes], url: str, *, start: int = 0, stop: int | None = None, note: Note | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES, past_stop: Counter | None = None,
) -> Iterator[dict]:
    """Raw samples ``start <= i < stop`` of one tar: ``{"__key__", "__url__", "__index__", ext: bytes}``.

    Consecutive members with one key form a sample; a repeated extension starts a new one. A
    member over the size limit makes its sample carry ``"__too_large__"`` (decoding refuses it).
    Samples before ``start`` are passed over by their headers. Nothing is decoded. With
    ``past_stop`` (``stop`` is the shard's declared size), samples after ``stop`` are counted there
    as ``past_declared_size`` by their headers instead of being silently left unread.
    """
    g = _Grouper(start)
    sample = None  # the sample being read: yielded once the next one starts, or at the end
    past = 0
    for name, data, size in iter_members(f, want=g.wants, note=note, max_member_bytes=max_member_bytes):
        parts = split_name(name)
        if parts is None:
            if note is not None:
                note("bad_name", f"member {name!r} is not named KEY.EXT")
            continue
        k, ext = parts
        if g.starts_sample(k, ext):
            if k == g.key and note is not None:
                note("duplicate_member", f"{k}: member .{ext} repeated: a new sample starts")
            g.key, g.exts, g.index = k, set(), g.index + 1
            if stop is not None and g.index >= stop:
                if past_stop is None:
                    break
                # Past the declared size: counted by the headers alone, before the last wanted
                # sample is given (a reader that has all it wants stops reading there).
                past += 1
                g.start = math.inf
            else:
                if sample is not None:
                    yield sample
                sample = {"__key__": k, "__url__": url, "__index__": g.index} if g.index >= g.start else None
        g.exts.add(ext)
        if sample is not None and sample["__index__"] == g.index:
            if data is None and size > max_member_bytes:
                sample.setdefault("__too_large__", []).append(ext)
            else:
                sample[ext] = data
    if past:
        past_stop["past_declared_size"] += past
        log.warning("%s: holds %d sample(s) past the %s its listing (sizes.json) declares; they are not read"
                    " (run `python -m data_tools verify` and fix the listing)", url, past, stop)
    if sample is not None:
        yield sample


# --------------------------------------------------------------------------- one shard, robustly


def read_shard(
    url: str, start: int = 0, stop: int | None = None, counts: Counter | None = None, *,
    retries: int = 0, backoff_s: float = 1.0, prefetcher: storage.Prefetcher | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES, timeout_s: float = storage.TIMEOUT_S, declared_end: bool = False,
) -> Iterator[dict]:
    """Raw samples ``start <= i < stop`` of the shard at ``url`` (see ``iter_samples``).

    A remote shard (a URL or a ``pipe:`` command) whose transfer fails or ends early is reopened up
    to ``retries`` times (exponential back-off), continuing after the last sample it gave, so the
    samples are exactly those of a clean read. A bad header is not retried (the bytes would be the
    same). A shard that still fails, or ends before ``stop``, adds one ``bad_shard`` to ``counts``,
    and the samples it lost (``stop`` minus those given; 1 where ``stop`` is unknown) as
    ``lost_samples``, so that ``data.max_bad_fraction`` sees them; it yields the complete samples
    before the damage. ``declared_end``: ``stop`` is the size the shard's listing declares, and
    samples found past it are counted (``past_declared_size``) and logged. Local shards are not
    retried.
    """
    counts = counts if counts is not None else Counter()
    remote = not storage.is_local(url)
    attempts = retries if remote else 0
    position = start
    for attempt in range(attempts + 1):
        f = None
        try:
            f = (prefetcher.get(url) if (prefetcher is not None and attempt == 0)
                 else storage.open_read(url, timeout_s))
            for sample in iter_samples(f, url, start=position, stop=stop, max_member_bytes=max_member_bytes,
                                       past_stop=counts if declared_end else None):
                yield sample
                position = sample["__index__"] + 1
            f, done = None, f
            done.close()  # a pipe command's failing exit status shows here
            break
        except GeneratorExit:  # the reader has what it wanted: close without a word
            _close_quietly(f)
            raise
        except Exception as e:  # ShardError, OSError, the transports' own errors
            _close_quietly(f)
            if stop is not None and position >= stop:  # damage past what was asked for: all of it was given
                log.warning("%s: damaged after its %d declared samples (%s: %s)", url, stop, type(e).__name__, e)
                break
            transient = not isinstance(e, ShardError) or isinstance(e, TruncatedShard)
            if attempt < attempts and transient:
                delay = backoff_s * 2**attempt
                log.warning("%s: read failed at sample %d (%s: %s); retry %d of %d in %.1f s", url, position,
                            type(e).__name__, e, attempt + 1, attempts, delay)
                time.sleep(delay)
                continue
            lost = stop - position if stop is not None else 1
            counts.update(bad_shard=1, lost_samples=lost)
            log.warning("%s: unreadable shard, skipping the rest of it: %s sample(s) lost (%s: %s)", url,
                        lost if stop is not None else "at least 1", type(e).__name__, e)
            return
    if stop is not None and position < stop:
        counts.update(bad_shard=1, lost_samples=stop - position)
        log.warning("%s: ended after %d samples, %d expected", url, position, stop)



def _close_quietly(f: IO[bytes] | None) -> None:
    if f is not None:
        try:
            f.close()
        except Exception as e:  # already failing or done: the close adds nothing
            log.debug("closing a shard stream: %s: %s", type(e).__name__, e)


def count_samples(url: str) -> int:
    """Samples (key groups) of a tar, from its headers only."""
    return sum(1 for _ in headers_only(url))


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """The shards of one split, in order, with their sample counts (None: unknown)."""

    spec: str
    sizes: dict[str, int | None]
    layout: str

    @property
    def urls(self) -> list[str]:
        return list(self.sizes)

    @property
    def total(self) -> int | None:
        return None if any(n is None for n in self.sizes.values()) else sum(self.sizes.values())


def _is_shard_list(spec: str) -> bool:
    urls = storage.expand(spec)
    return len(urls) > 1 or "::" in spec or "{" in spec or urls[0].endswith(fmt.SHARD_SUFFIX)


def _img2dataset_count(stats_url: str) -> int | None:
    if storage.scheme(stats_url) == "pipe":
        return None
    try:
        n = json.loads(storage.read_bytes(stats_url)).get("successes")
    except Exception:  # missing, unreadable, not JSON, not an object
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _sizes_json(folder: str, *, ours: bool) -> dict[str, int] | None:
    if storage.scheme(folder) == "pipe":
        return None  # no sizes.json is derived from a command: pipe: shards are counted
    url = storage.join(folder, fmt.SIZES_FILE)
    try:
        data = storage.read_bytes(url)
    except (FileNotFoundError, IsADirectoryError):
        return None
    except storage.MissingHandler:
        raise
    except Exception as e:  # OSError, the transports' own errors (an HTTP 403 or 500 ...)
        if not storage.exists(url):
            return None
        raise FileNotFoundError(f"{url}: unreadable ({type(e).__name__}: {e})") from e
    return fmt.parse_sizes(data, url, ours=ours)


def resolve_split(spec: str, *, need_sizes: bool = True, count_missing: bool = True) -> Split:
    """The shards of a split spec: a folder (local or URL) of our shards or of img2dataset output,
    or a shard list (``.../shard-{000000..000511}.tar``, several joined by ``::``).

    Sizes come from ``sizes.json`` beside the shards, else img2dataset's ``{shard}_stats.json``,
    else (``count_missing``) from counting the tar headers. Raises FileNotFoundError or ValueError.
    """
    spec = str(spec)
    problem = next(filter(None, map(storage.missing_handler, storage.expand(spec))), None)
    if problem:
        raise ValueError(problem)
    if _is_shard_list(spec):
        return _shard_list(spec, need_sizes, count_missing)
    folder = spec.rstrip("/") if not storage.is_local(spec) else spec
    entries = storage.listdir(folder)
    if storage.is_local(folder) and entries is None:
        raise FileNotFoundError(f"{folder}: not a folder of shards")
    names = [storage.basename(e) for e in entries] if entries is not None else None
    ours = names is None or any(n == fmt.SIZES_FILE or fmt.SHARD_RE.match(n) for n in names)
    sizes = _sizes_json(folder, ours=True) if ours else None
    if sizes is not None:
        urls = {storage.join(folder, name): n for name, n in sizes.items()}
        if entries is not None:
            missing = [name for name in sizes if storage.join(folder, name) not in set(entries)]
            if missing:
                raise FileNotFoundError(f"{folder}: shards listed in {fmt.SIZES_FILE} are missing: {missing}")
        return Split(spec, urls, IAIS_LAYOUT)
    if names is None:
        if storage.scheme(folder) == "pipe":
            raise FileNotFoundError(f"{folder}: a pipe: source must name its shards (.../shard-{{000000..000099}}.tar)")
        raise FileNotFoundError(
            f"{storage.join(folder, fmt.SIZES_FILE)} not found, and {storage.scheme(folder)}:// folders cannot be"
            " listed: name the shards as a list (e.g. .../shard-{000000..000099}.tar) or add a sizes.json"
        )
    if ours:
        raise FileNotFoundError(f"{storage.join(folder, fmt.SIZES_FILE)} not found: is {folder} a split folder of shards?")
    tars = sorted(e for e in entries if e.endswith(fmt.SHARD_SUFFIX))
    if not tars:
        raise FileNotFoundError(f"{folder}: no shards (neither {fmt.SIZES_FILE} nor *.tar)")
    return Split(spec, _stats_sizes(tars, need_sizes, count_missing), IMG2DATASET_LAYOUT)


def _stats_sizes(urls: list[str], need_sizes: bool, count_missing: bool) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for url in urls:
        stats = url[: -len(fmt.SHARD_SUFFIX)] + STATS_SUFFIX if url.endswith(fmt.SHARD_SUFFIX) else None
        n = _img2dataset_count(stats) if need_sizes and stats else None
        if n is None and need_sizes and count_missing:
            n = _count_for_sizes(url)
        out[url] = n
    return out


def _count_for_sizes(url: str) -> int:
    """A shard's sample count when nothing states it: its headers counted. A damaged shard counts
    the samples begun before the damage (the loader then meets the damage: one ``bad_shard``);
    a shard that cannot be opened is a FileNotFoundError or ValueError, as ``resolve_split`` says."""
    n = 0
    try:
        for _ in headers_only(url):
            n += 1
    except (FileNotFoundError, ValueError):
        raise
    except ShardError as e:
        log.warning("%s: %s; sized by the %d sample(s) before it", url, e, n)
    except Exception as e:  # OSError, the transports' own errors
        raise ValueError(f"{url}: cannot count its samples ({type(e).__name__}: {e})") from e
    return n


def _shard_list(spec: str, need_sizes: bool, count_missing: bool) -> Split:
    urls = storage.expand(spec)
    if len(set(urls)) != len(urls):
        raise ValueError(f"{spec}: a shard is listed twice")
    listed: dict[str, dict[str, int] | None] = {}
    sizes: dict[str, int | None] = {}
    for url in urls:
        folder = storage.parent(url)
        if folder not in listed:
            listed[folder] = _sizes_json(folder, ours=False) if need_sizes else None
        sizes[url] = (listed[folder] or {}).get(storage.basename(url))
    unknown = [u for u, n in sizes.items() if n is None]
    if unknown and need_sizes:
        sizes.update(_stats_sizes(unknown, True, count_missing))
    return Split(spec, sizes, LIST_LAYOUT)


def layout_of(path: str) -> str | None:
    """The layout of a local split folder (ours or img2dataset's), None for any other folder."""
    p = storage.local_path(path)
    if not p.is_dir():
        return None
    names = [c.name for c in p.iterdir()]
    if any(n == fmt.SIZES_FILE or fmt.SHARD_RE.match(n) or (n.startswith(fmt.SHARD_PREFIX) and n.endswith(fmt.TMP_SUFFIX))
           for n in names):
        return IAIS_LAYOUT
    if any(n.endswith(fmt.SHARD_SUFFIX) or n.endswith(STATS_SUFFIX) for n in names):
        return IMG2DATASET_LAYOUT
    return None


def split_keys(split: Split) -> Counter:
    """How often each sample key occurs in a split (headers only)."""
    return Counter(s["__key__"] for url in split.urls for s in headers_only(url))


def headers_only(url: str) -> Iterator[dict]:
    """Every sample of a shard as ``{"__key__", "__index__"}``, reading headers only."""
    index, key, exts = -1, None, set()
    with storage.open_read(url) as f:
        for name, _, _ in iter_members(f, want=lambda n: False):
            parts = split_name(name)
            if parts is None:
                continue
            k, ext = parts
            if k != key or ext in exts:
                index, key, exts = index + 1, k, set()
                yield {"__key__": k, "__index__": index}
            exts.add(ext)
