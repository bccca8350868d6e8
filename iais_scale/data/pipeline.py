"""The training stream: WebDataset shards -> safe decoding -> shuffled matched pairs -> batches.

Both streams are endless, split by rank and by DataLoader worker, batched and collated in the
workers, and give **every rank the same number of batches** whatever the shard sizes, so an uneven
split can never leave one rank waiting in a collective (webdataset#225, DeepSpeed#2223). Each visit
of an image draws one of its captions, so two captions of one image never meet as false negatives
in a batch. ``make_train_stream(cfg.data, ...)`` builds the one the config asks for.

**Epoch mode** (``PairStream``, fine-tuning: every sample once per epoch). With N samples in the
split (``sizes.json``; for img2dataset folders ``successes`` of each ``{shard}_stats.json``, else
counted), R ranks and batch size b, every rank yields exactly ``B = floor(N / (R * b))`` batches per
epoch, then the next epoch starts; the rule is:

1. Epoch e lists the shards in an order drawn from ``(seed, e)`` and numbers their samples
   0 .. N-1 in that order (a shard's samples in tar order): the *epoch order*.
2. Rank r takes positions ``[r*B*b, (r+1)*B*b)``; the last ``N - R*B*b`` positions (< R*b samples)
   are dropped this epoch (a different remainder each epoch, as the shard order changes). Ranks own
   position ranges, not shards, so more ranks than shards, and shards of any sizes, are fine.
3. The rank's batches are numbered ``t = e*B + k`` across epochs; with W workers, batch t is made by
   worker ``t % W`` (the DataLoader takes batches from its workers in turn; after a resume at batch
   t0 DataLoader worker i plays worker ``(i + t0) % W``). The rank's range is
   cut, in worker order, into one contiguous chunk per worker of (its batches in epoch e) * b
   positions; the worker reads its chunk (skipping into a shard by tar headers only), decodes it,
   shuffles it through a buffer of ``shuffle_buffer`` samples that is drained at the end of the
   chunk, and cuts batches.
4. Wrap rule: when a chunk holds fewer usable samples than its batches need (bad samples, a
   truncated shard, a shard shorter than ``sizes.json`` says), the worker goes on reading the
   positions after its chunk, wrapping from N-1 to 0 of the same epoch order, until its batches are
   full; only then is a sample seen twice in an epoch. With clean data every sample of the rank's
   range is in exactly one batch of the epoch.

**Resampled mode** (``ResampledPairStream``, pretraining): an endless weighted mixture of several
shard sources (split folders). Each (rank, worker) draws shards with replacement from each source
with its own seeded RNG (webdataset's ``ResampledShards``), reads each drawn shard whole, and draws
every next sample's source with probability ``weight / sum(weights)``; the mixture is shuffled
through the buffer. The stream is cut into nominal epochs of ``B = max(1, floor(epoch_samples /
(R*b)))`` batches per rank (``epoch_samples`` defaults to the sources' total), numbered and assigned
to workers as above; every RNG is reseeded from (seed, epoch, rank, worker) at each epoch, so resume
replays at most one epoch.

**Length bucketing** (``bucket_by_length``): a worker takes ``max(1, shuffle_buffer // b)`` batches'
worth of shuffled samples at a time, sorts them by caption words + regions, cuts batches of
neighbours and shuffles the order of those batches (seeded): same batches count, same samples.

**Resume** (``start_batch``: batches this rank already consumed): the stream is a pure function of
(seed, rank, world size, worker count, batch size, data), so epochs before ``start_batch // B`` are
not read at all and, in that epoch, the worker replays its chunk up to the batch to resume from
(decoding, not collating) -- the sequence that follows is the uninterrupted one. ``position(t)``
gives (epoch, batch within epoch). One caveat: for ``image_input="patches"`` skipped batches are not
pixel-decoded, so an image that passes the cheap header check but fails the full decode inside the
replayed part (a rare, corrupt-but-complete file) shifts that worker's resumed epoch by a sample.

**Bad data** never stops the stream: each reason is counted and every batch carries its worker's
``sample_counts = (good, {reason: n})`` since the worker's previous batch, so that the trainer's
``BadSampleCounter`` counts all of them per rank and aborts past ``max_bad_fraction``. An unreadable,
truncated or short shard counts one ``bad_shard``. A worker that meets only bad samples (1000 in a
row) or no readable sample in a whole pass raises instead of hanging its rank.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import mmap
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import format as fmt
from .collate import Collator
from .samples import BadSample, ImageSample, decode_sample

if TYPE_CHECKING:
    from ..config import DataConfig

log = logging.getLogger(__name__)

STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard statistics beside each tar
MAX_BAD_IN_A_ROW = 1000
# WebDataset's grouping rule: the key is the path up to the first dot of the file name.
_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_ZERO_BLOCK = bytes(512)  # two of them close every complete tar


# --------------------------------------------------------------------------- shards


def _is_iais_layout(split_dir: Path) -> bool:
    for p in split_dir.iterdir():
        n = p.name
        if n == fmt.SIZES_FILE or fmt.SHARD_RE.match(n) or (n.startswith(fmt.SHARD_PREFIX) and n.endswith(fmt.TMP_SUFFIX)):
            return True
    return False


def _tar_number(field: bytes) -> int:
    """A numeric tar header field: octal text, or GNU base-256 when the high bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1 : i + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def _tar_entries(buf) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular member of an uncompressed tar held in ``buf``.

    ``buf`` is bytes or an mmap of the file. A lean reader of USTAR/GNU/PAX headers (about 20x
    faster than ``tarfile``, which parses every field in Python): long names from PAX ``path``
    records or GNU ``L`` members, PAX ``size``; directories, links and other types are passed over.
    Raises ``tarfile.ReadError`` for a bad checksum or a truncated file (including a missing
    end-of-archive marker).
    """
    offset, long_name, pax = 0, None, {}
    while True:
        header = buf[offset : offset + 512]
        if len(header) < 512:
            raise tarfile.ReadError(f"truncated: {len(header)} header bytes at offset {offset}")
        if header == _ZERO_BLOCK:
            if len(buf) < offset + 1024:
                raise tarfile.ReadError("truncated: end-of-archive marker incomplete")
            return
        stored = _tar_number(header[148:156])
        unsigned = sum(header) - sum(header[148:156]) + 256
        if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:]):
            raise tarfile.ReadError(f"invalid header checksum at offset {offset}")
        size, kind = _tar_number(header[124:136]), header[156:157]
        data_offset = offset + 512
        if kind in (b"x", b"g", b"L"):
            data = buf[data_offset : data_offset + size]
            if len(data) < size:
                raise tarfile.ReadError(f"truncated: extended header at offset {offset}")
            if kind == b"x":
                pax = _pax_records(data)
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            offset = data_offset + (size + 511) // 512 * 512
            continue
        name = long_name or pax.get("path")
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if "size" in pax:
            size = int(pax["size"])
        long_name, pax = None, {}
        offset = data_offset + (size + 511) // 512 * 512
        if kind in (b"0", b"\0", b"7"):
            yield name, data_offset, size


@contextlib.contextmanager
def _open_tar(path: str | Path) -> Iterator:
    """The tar file mapped read-only into memory (no read calls, the page cache serves slices)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise tarfile.ReadError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield mm


def count_samples(path: str | Path) -> int:
    """Number of samples (key groups) in a tar, from its headers only."""
    n, key, exts = 0, None, set()
    with _open_tar(path) as buf:
        for name, _, _ in _tar_entries(buf):
            match = _MEMBER_RE.match(name)
            if match is None:
                continue
            k, ext = match.group(1), match.group(2).lower()
            if k != key or ext in exts:
                n, key, exts = n + 1, k, set()
            exts.add(ext)
    return n


def shard_sizes(split_dir: str | Path) -> dict[str, int]:
    """{shard path: sample count} of a split folder, in shard-name order.

    ``iais_scale-shards-v1`` folders: ``sizes.json`` (authoritative). img2dataset output folders
    (``00000.tar`` + ``00000_stats.json``, no ``sizes.json``): ``successes`` of each stats file,
    else the samples counted in the tar's headers.
    """
    split_dir = Path(split_dir)
    sizes_file = split_dir / fmt.SIZES_FILE
    if split_dir.is_dir() and not _is_iais_layout(split_dir):
        tars = sorted(split_dir.glob(f"*{fmt.SHARD_SUFFIX}"))
        if tars:
            out = {}
            for tar in tars:
                stats = tar.with_name(tar.name[: -len(fmt.SHARD_SUFFIX)] + STATS_SUFFIX)
                n = None
                if stats.is_file():
                    try:
                        n = json.loads(stats.read_text(encoding="utf-8")).get("successes")
                    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                        n = None
                if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                    n = count_samples(tar)
                out[str(tar)] = n
            return out
    if not sizes_file.is_file():
        raise FileNotFoundError(f"{sizes_file} not found: is {split_dir} a split folder of shards?")
    sizes = json.loads(sizes_file.read_text())
    missing = [name for name in sizes if not (split_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{split_dir}: shards listed in {fmt.SIZES_FILE} are missing: {missing}")
    return {str(split_dir / name): sizes[name] for name in sorted(sizes)}


def split_shards(split_dir: str | Path) -> tuple[list[str], int]:
    """The shard paths of a split folder (sorted) and its sample count (see ``shard_sizes``)."""
    sizes = shard_sizes(split_dir)
    return list(sizes), sum(sizes.values())


def read_shard(
    path: str, start: int = 0, stop: int | None = None, counts: Counter | None = None
) -> Iterator[dict]:
    """Raw samples ``start <= i < stop`` of one tar: ``{"__key__", "__url__", ext: bytes, ...}``.

    Nothing is decoded (``.pyd``/``.pkl`` members are bytes like any other). The file is mapped
    into memory; samples before ``start`` are passed over by their headers alone. A shard that cannot be read, is truncated, or ends before ``stop`` adds one ``bad_shard``
    to ``counts``; the complete samples before the damage are still yielded.
    """
    counts = counts if counts is not None else Counter()
    index, key, exts, sample = -1, None, set(), None
    try:
        with _open_tar(path) as buf:
            for name, offset, size in _tar_entries(buf):
                match = _MEMBER_RE.match(name)
                if match is None:
                    continue
                k, ext = match.group(1), match.group(2).lower()
                if k != key or ext in exts:  # a new sample starts
                    if sample is not None:
                        yield sample
                    sample, key, exts, index = None, k, set(), index + 1
                    if stop is not None and index >= stop:
                        return
                    if index >= start:
                        sample = {"__key__": k, "__url__": path}
                exts.add(ext)
                if sample is not None:
                    data = buf[offset : offset + size]
                    if len(data) != size:
                        raise tarfile.ReadError(f"{name}: unexpected end of data")
                    sample[ext] = data
    except (tarfile.TarError, OSError, ValueError) as e:
        counts["bad_shard"] += 1
        log.warning("%s: unreadable shard, skipping the rest of it (%s)", path, e)
        return
    if sample is not None:
        yield sample
    if stop is not None and index + 1 < stop:
        counts["bad_shard"] += 1
        log.warning("%s: ended after %d samples, %d expected", path, index + 1, stop)


# --------------------------------------------------------------------------- stream pieces


class _Tally:
    """Good samples and bad ones by reason since the worker's previous batch."""

    def __init__(self) -> None:
        self.good = 0
        self.bad: Counter[str] = Counter()

    def take(self) -> tuple[int, dict[str, int]]:
        out = (self.good, dict(self.bad))
        self.reset()
        return out

    def reset(self) -> None:
        self.good = 0
        self.bad.clear()


def _decode(
    raws: Iterable[dict], tally: _Tally, rng: random.Random, decode_kw: dict
) -> Iterator[tuple[ImageSample, str]]:
    """Good (sample, one caption drawn by ``rng``) pairs; bad samples are counted and skipped."""
    bad_in_row = 0
    for raw in raws:
        try:
            sample = decode_sample(raw, **decode_kw)
        except BadSample as e:
            tally.bad[e.reason] += 1
            bad_in_row += 1
            if bad_in_row >= MAX_BAD_IN_A_ROW:
                raise RuntimeError(
                    f"{bad_in_row} bad samples in a row (last: {e}; counts since the last batch:"
                    f" {dict(tally.bad)}); does the data fit image_input={decode_kw.get('image_input')!r}?"
                    " run `python -m data_tools verify` on the shards"
                ) from None
            continue
        bad_in_row = 0
        tally.good += 1
        yield sample, rng.choice(sample.captions)


def _shuffled(items: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: fill ``bufsize`` items, then emit a random one per item read; drain at the end."""
    if bufsize <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        if len(buf) < bufsize:
            buf.append(x)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf


def _read_positions(
    order: Sequence[tuple[str, int]], cum: Sequence[int], a: int, b: int | None, counts: Counter
) -> Iterator[dict]:
    """Raw samples at positions ``[a, b)`` of an epoch order (``b=None``: endless, wrapping mod N)."""
    total = cum[-1]
    p, empty_since = a, 0
    while b is None or p < b:
        q = p % total
        s = bisect.bisect_right(cum, q) - 1  # the shard holding position q (empty shards skipped)
        start = q - cum[s]
        n = cum[s + 1] - q if b is None else min(cum[s + 1] - q, b - p)
        got = False
        for raw in read_shard(order[s][0], start, start + n, counts):
            got = True
            yield raw
        empty_since = 0 if got else empty_since + n
        if empty_since >= total:
            raise RuntimeError(f"no readable sample in a whole pass over the {total} samples of the shards")
        p += n


def _resampled_raws(urls: Sequence[str], rng: random.Random, counts: Counter, name: str) -> Iterator[dict]:
    """Whole shards drawn with replacement, forever (webdataset's ResampledShards)."""
    empty = 0
    while True:
        got = False
        for raw in read_shard(rng.choice(urls), counts=counts):
            got = True
            yield raw
        empty = 0 if got else empty + 1
        if empty >= max(10, 2 * len(urls)):
            raise RuntimeError(f"source {name}: no readable sample in {empty} shards drawn in a row")


def _length(item: tuple[ImageSample, str]) -> int:
    sample, caption = item
    return len(caption.split()) + sample.features.shape[0]


# --------------------------------------------------------------------------- streams


class _BatchStream(IterableDataset):
    """Shared machinery: epochs of ``batches_per_epoch`` batches per rank, workers, resume, counts."""

    def __init__(
        self,
        collator: Collator,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        start_batch: int,
        bucket_by_length: bool,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch: must be >= 0, got {start_batch}")
        self.collator, self.batch_size = collator, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch
        self.bucket_by_length = bucket_by_length
        self.batches_per_epoch = 1  # set by the subclass
        self._decode_kw = dict(
            max_regions=collator.max_regions, image_input=collator.image_input, keep_image=collator.needs_pixels
        )

    def position(self, batches_seen: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of this rank's next batch after ``batches_seen``."""
        return divmod(batches_seen, self.batches_per_epoch)

    def _tag(self, epoch: int, worker: int, n_workers: int) -> str:
        return f"{self.seed}:{epoch}:{self.rank}:{self.world_size}:{worker}:{n_workers}"

    def _items(self, epoch: int, worker: int, n_workers: int, tally: _Tally) -> Iterator[tuple[ImageSample, str]]:
        """This worker's good (sample, caption) pairs of ``epoch``, in batching order, never ending."""
        raise NotImplementedError

    @staticmethod
    def _owned(x: int, worker: int, n_workers: int) -> int:
        """How many of the rank's batches t < x belong to ``worker`` (t % n_workers == worker)."""
        return max(0, (x - worker + n_workers - 1) // n_workers)

    def _batches_in_epoch(self, epoch: int, worker: int, n_workers: int) -> int:
        lo, hi = epoch * self.batches_per_epoch, (epoch + 1) * self.batches_per_epoch
        return self._owned(hi, worker, n_workers) - self._owned(lo, worker, n_workers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes its first batch from worker 0, then 1, ...: after a resume at batch t0
        # the worker it asks first must make batch t0, so worker ids are rotated by t0.
        worker = (worker + self.start_batch) % n_workers
        tally = _Tally()
        for epoch in itertools.count(self.start_batch // self.batches_per_epoch):
            n = self._batches_in_epoch(epoch, worker, n_workers)
            if n == 0:
                continue
            lo = epoch * self.batches_per_epoch
            skip = self._owned(max(self.start_batch, lo), worker, n_workers) - self._owned(lo, worker, n_workers)
            items = self._items(epoch, worker, n_workers, tally)
            yield from self._epoch_batches(items, n, min(skip, n), random.Random(f"buckets:{self._tag(epoch, worker, n_workers)}"), tally)

    def _take(self, items: Iterator, count: int, load: bool, tally: _Tally) -> list:
        """The next ``count`` usable items; with ``load`` the pixels are decoded and failures replaced."""
        out: list = []
        while len(out) < count:
            sample, caption = next(items)
            if load:
                try:
                    sample.pixels = self.collator.load_pixels(sample)
                except BadSample as e:
                    tally.good -= 1  # counted good by its header check; it is bad after all
                    tally.bad[e.reason] += 1
                    continue
            out.append((sample, caption))
        return out

    def _epoch_batches(self, items: Iterator, n: int, skip: int, rng: random.Random, tally: _Tally) -> Iterator[dict]:
        bs = self.batch_size
        window = max(1, self.shuffle_buffer // bs) if self.bucket_by_length else 1
        for first in range(0, n, window):
            nb = min(window, n - first)
            load = self.collator.needs_pixels and first + nb > skip  # skipped batches: no pixels
            chunk = self._take(items, nb * bs, load, tally)
            if self.bucket_by_length:
                chunk.sort(key=_length)
                groups = [chunk[j * bs : (j + 1) * bs] for j in range(nb)]
                rng.shuffle(groups)
            else:
                groups = [chunk]
            for j, group in enumerate(groups):
                if first + j < skip:  # resume: consumed before the checkpoint, counted then
                    tally.reset()
                    continue
                batch = self.collator.pairs(group)
                batch["sample_counts"] = tally.take()
                yield batch


class PairStream(_BatchStream):
    """Epoch mode: every sample of one split once per epoch, ``batches_per_epoch`` batches per rank.

    See the module docstring for the exact rule (rank ranges of the epoch order, worker chunks, the
    wrap rule, the dropped remainder).
    """

    def __init__(
        self,
        split_dir: str | Path,
        collator: Collator,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        start_batch: int = 0,
        bucket_by_length: bool = False,
    ):
        super().__init__(
            collator, batch_size, rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
            start_batch=start_batch, bucket_by_length=bucket_by_length,
        )
        self.sizes = shard_sizes(split_dir)
        self.urls, self.num_samples = list(self.sizes), sum(self.sizes.values())
        self.batches_per_epoch = self.num_samples // (world_size * batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{split_dir}: {self.num_samples} samples are fewer than one batch per rank"
                f" ({world_size} ranks x batch size {batch_size})"
            )

    def epoch_order(self, epoch: int) -> list[tuple[str, int]]:
        """(shard, size) in the order of ``epoch``: its samples are positions 0 .. N-1 of the epoch."""
        order = sorted(self.sizes.items())
        random.Random(f"{self.seed}:shards:{epoch}").shuffle(order)
        return order

    def chunk(self, epoch: int, worker: int, n_workers: int) -> tuple[int, int]:
        """Positions ``[a, b)`` of the epoch order that ``worker`` of this rank reads in ``epoch``."""
        bs = self.batch_size
        a = self.rank * self.batches_per_epoch * bs
        a += sum(self._batches_in_epoch(epoch, w, n_workers) for w in range(worker)) * bs
        return a, a + self._batches_in_epoch(epoch, worker, n_workers) * bs

    def _items(self, epoch: int, worker: int, n_workers: int, tally: _Tally) -> Iterator[tuple[ImageSample, str]]:
        tag = self._tag(epoch, worker, n_workers)
        order = self.epoch_order(epoch)
        cum = list(itertools.accumulate((n for _, n in order), initial=0))
        a, b = self.chunk(epoch, worker, n_workers)
        captions = random.Random(f"captions:{tag}")
        main = _decode(_read_positions(order, cum, a, b, tally.bad), tally, captions, self._decode_kw)
        extra = _decode(_read_positions(order, cum, b, None, tally.bad), tally, captions, self._decode_kw)
        return itertools.chain(_shuffled(main, self.shuffle_buffer, random.Random(f"shuffle:{tag}")), extra)


class ResampledPairStream(_BatchStream):
    """Resampled mode: an endless weighted mixture of shard sources, shards drawn with replacement.

    ``sources`` are (split folder, weight) pairs; see the module docstring.
    """

    def __init__(
        self,
        sources: Sequence[tuple[str | Path, float]],
        collator: Collator,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        start_batch: int = 0,
        epoch_samples: int | None = None,
        bucket_by_length: bool = False,
    ):
        super().__init__(
            collator, batch_size, rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
            start_batch=start_batch, bucket_by_length=bucket_by_length,
        )
        if not sources:
            raise ValueError("sources: name at least one (path, weight)")
        self.sources = [(str(path), float(weight)) for path, weight in sources]
        bad = [f"{p} (weight {w})" for p, w in self.sources if not w > 0]
        if bad:
            raise ValueError(f"sources: weights must be positive: {', '.join(bad)}")
        self.source_sizes = [shard_sizes(path) for path, _ in self.sources]
        empty = [p for (p, _), sizes in zip(self.sources, self.source_sizes) if not sizes]
        if empty:
            raise ValueError(f"sources: no shards in {', '.join(empty)}")
        self.num_samples = sum(sum(s.values()) for s in self.source_sizes)
        self.epoch_samples = epoch_samples if epoch_samples is not None else self.num_samples
        self.batches_per_epoch = max(1, self.epoch_samples // (world_size * batch_size))

    def _items(self, epoch: int, worker: int, n_workers: int, tally: _Tally) -> Iterator[tuple[ImageSample, str]]:
        tag = self._tag(epoch, worker, n_workers)
        captions = random.Random(f"captions:{tag}")
        streams = [
            _decode(_resampled_raws(list(sizes), random.Random(f"shards:{i}:{tag}"), tally.bad, path),
                    tally, captions, self._decode_kw)
            for i, ((path, _), sizes) in enumerate(zip(self.sources, self.source_sizes))
        ]
        cum = list(itertools.accumulate(w for _, w in self.sources))
        mix = random.Random(f"mix:{tag}")

        def mixture() -> Iterator[tuple[ImageSample, str]]:
            while True:
                i = min(bisect.bisect_right(cum, mix.random() * cum[-1]), len(streams) - 1)
                yield next(streams[i])

        return _shuffled(mixture(), self.shuffle_buffer, random.Random(f"shuffle:{tag}"))


def make_train_stream(
    data: DataConfig,
    collator: Collator,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int = 0,
) -> PairStream | ResampledPairStream:
    """The training stream ``data.mode`` asks for: epoch mode over ``{root}/{train_split}``, or the
    resampled mixture of ``data.sources`` (paths relative to the working directory, like ``root``)."""
    common = dict(
        rank=rank, world_size=world_size, seed=seed, shuffle_buffer=data.shuffle_buffer,
        start_batch=start_batch, bucket_by_length=data.bucket_by_length,
    )
    if data.mode == "resampled":
        return ResampledPairStream(
            [(s.path, s.weight) for s in data.sources], collator, batch_size, epoch_samples=data.epoch_samples, **common
        )
    return PairStream(Path(data.root) / data.train_split, collator, batch_size, **common)


def train_loader(stream: IterableDataset, num_workers: int) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,  # the stream batches itself
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        multiprocessing_context="fork" if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )
