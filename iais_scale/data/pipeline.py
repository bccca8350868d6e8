"""The training stream: shards -> safe decoding -> shuffled matched pairs -> batches.

Both modes give every rank the same number of batches per epoch, split by rank and DataLoader
worker, and are pure functions of (seed, layout, start) so that a resume replays them exactly.
The rules (epoch order, rank ranges, worker chunks, the wrap rule, resume and continuation on
another world size) are specified in ``docs/data-format.md`` ("Training streams").
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import storage
from .collate import Collator
from .image_fields import ImageFields
from .samples import BadSample, ImageSample, decode_sample
from .shards import MAX_MEMBER_BYTES, Split, read_shard, resolve_split

log = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 1000


@dataclass(frozen=True)
class IoOptions:
    """How shards are read: retries of remote reads, read-ahead, the member size cap."""

    retries: int = 3
    backoff_s: float = 1.0
    prefetch: bool = True
    max_member_bytes: int = MAX_MEMBER_BYTES
    timeout_s: float = storage.TIMEOUT_S  # a remote read that receives nothing this long fails


DEFAULT_IO = IoOptions()


@dataclass
class StreamStart:
    """Where a stream starts: batches are counted from ``origin_epoch``; that epoch covers the
    positions ``plan`` of its epoch order (None: all of them) and later epochs all positions;
    ``consumed`` batches of this rank are skipped (replayed, not emitted)."""

    origin_epoch: int = 0
    plan: np.ndarray | None = None  # sorted int64 positions of the origin epoch still to come
    consumed: int = 0


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


def _decode(raws: Iterable[tuple[int, dict]], tally: _Tally, rng: random.Random, fields: ImageFields,
            drawable: Callable[[ImageSample], list[str]] | None = None) -> Iterator[tuple]:
    """Good (sample, one caption drawn by ``rng``, position); bad samples are counted and skipped.

    ``drawable`` narrows the captions a draw may pick (a sample left with none is ``caption_too_long``);
    without it, or when it keeps them all, the draws are those of the full caption list.
    """
    bad_in_row = 0
    for position, raw in raws:
        try:
            sample = decode_sample(raw, fields)
            captions = sample.captions if drawable is None else drawable(sample)
            if not captions:
                raise BadSample("caption_too_long", f"{sample.key}: every caption is over the word-piece limit")
        except BadSample as e:
            tally.bad[e.reason] += 1
            bad_in_row += 1
            if bad_in_row >= MAX_BAD_IN_A_ROW:
                raise RuntimeError(
                    f"{bad_in_row} bad samples in a row (last: {e}; counts since the last batch:"
                    f" {dict(tally.bad)}); do the samples carry {fields.needs}, which the model reads?"
                    " run `python -m data_tools verify` on the shards"
                ) from None
            continue
        bad_in_row = 0
        tally.good += 1
        # A Caption carries its stored token ids to the collator.
        yield sample, rng.choice(captions), position


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


def _runs(positions: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive positions."""
    a = b = None
    for p in positions:
        if a is not None and p == b:
            b += 1
            continue
        if a is not None:
            yield a, b
        a, b = p, p + 1
    if a is not None:
        yield a, b


class _Reader:
    """Reads positions of one epoch order: shard by shard, runs skipped into by headers, the next
    remote shard that will be read opened ahead while the current one is read."""

    def __init__(self, order: Sequence[tuple[str, int]], io: IoOptions, counts: Counter):
        self.order, self.io, self.counts = order, io, counts
        self.cum = list(itertools.accumulate((n for _, n in order), initial=0))
        self.total = self.cum[-1]
        self.prefetcher = storage.Prefetcher(timeout_s=io.timeout_s) if io.prefetch else None

    def _shard(self, q: int) -> int:
        return bisect.bisect_right(self.cum, q) - 1  # empty shards are skipped

    def _segments(self, runs: Iterable[tuple[int, int | None]]) -> Iterator[tuple[int, int, int]]:
        """(shard, first sample in it, count) of each piece of the runs [a, b) (b None: endless),
        positions modulo N (wrapping)."""
        for a, b in runs:
            p = a
            while b is None or p < b:
                q = p % self.total
                s = self._shard(q)
                n = self.cum[s + 1] - q if b is None else min(self.cum[s + 1] - q, b - p)
                yield s, q - self.cum[s], n
                p += n

    def read(self, runs: Iterable[tuple[int, int | None]]) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) of each run [a, b) (b None: endless), positions modulo N (wrapping)."""
        empty_since = 0
        segments = self._segments(runs)
        following = next(segments, None)
        while following is not None:
            s, start, n = following
            following = next(segments, None)
            # Only a shard that will be read next is opened ahead (not the one after a chunk's end).
            if self.prefetcher is not None and following is not None and following[0] != s:
                self.prefetcher.ahead(self.order[following[0]][0])
            got = False
            for raw in read_shard(self.order[s][0], start, start + n, self.counts, retries=self.io.retries,
                                  backoff_s=self.io.backoff_s, prefetcher=self.prefetcher,
                                  max_member_bytes=self.io.max_member_bytes, timeout_s=self.io.timeout_s,
                                  declared_end=start + n == self.order[s][1]):
                got = True
                yield (self.cum[s] + raw["__index__"]), raw
            empty_since = 0 if got else empty_since + n
            if empty_since >= self.total:
                raise RuntimeError(f"no readable sample in a whole pass over the {self.total} samples of the shards")

    def close(self) -> None:
        """Close the streams opened ahead (their connections) and the prefetch thread."""
        if self.prefetcher is not None:
            self.prefetcher.close()


def _length(item: tuple) -> int:
    sample, caption = item[0], item[1]
    return len(caption.split()) + sample.features.shape[0]


# --------------------------------------------------------------------------- streams


class _BatchStream(IterableDataset):
    """Shared machinery: epochs of equal batch counts per rank, workers, resume, bad-sample counts."""

    def __init__(self, collator: Collator, batch_size: int, *, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int, start: StreamStart | None, bucket_by_length: bool, io: IoOptions,
                 max_caption_tokens: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        start = start or StreamStart()
        if start.consumed < 0:
            raise ValueError(f"start.consumed: must be >= 0, got {start.consumed}")
        self.collator, self.batch_size = collator, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.start, self.bucket_by_length, self.io = shuffle_buffer, start, bucket_by_length, io
        self.batches_per_epoch = 1  # set by the subclass
        if max_caption_tokens is not None and max_caption_tokens < 1:
            raise ValueError(f"max_caption_tokens: must be at least 1 or None, got {max_caption_tokens}")
        self.max_caption_tokens = max_caption_tokens

    def _drawable(self) -> Callable[[ImageSample], list[str]] | None:
        """The captions a training draw may pick: those within ``max_caption_tokens`` word pieces (as
        UNITER's ``TxtTokLmdb(max_txt_len=60)`` drops longer training captions); None: all."""
        limit = self.max_caption_tokens
        if limit is None:
            return None

        def drawable(sample: ImageSample) -> list[str]:
            counts = self.collator.word_pieces(sample.captions)
            return [c for c, n in zip(sample.captions, counts, strict=True) if n <= limit]

        return drawable

    # ---------------------------------------------------------------- batch numbering

    def epoch_batches(self, epoch: int) -> int:
        """Batches of this rank in ``epoch`` (the origin epoch may cover only part of the data)."""
        if epoch == self.start.origin_epoch and self.start.plan is not None:
            return len(self.start.plan) // (self.world_size * self.batch_size)
        return self.batches_per_epoch

    def position(self, batches: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of this rank's batch number ``batches`` since the origin."""
        epoch = self.start.origin_epoch
        while batches >= self.epoch_batches(epoch):
            batches -= self.epoch_batches(epoch)
            epoch += 1
        return epoch, batches

    def _first(self, epoch: int) -> int:
        """The number (since the origin) of this rank's first batch of ``epoch``."""
        return sum(self.epoch_batches(e) for e in range(self.start.origin_epoch, epoch))

    def _tag(self, epoch: int, worker: int, n_workers: int) -> str:
        return f"{self.seed}:{epoch}:{self.rank}:{self.world_size}:{worker}:{n_workers}"

    @staticmethod
    def _owned(x: int, worker: int, n_workers: int) -> int:
        """How many of the batch numbers t < x belong to ``worker`` (t % n_workers == worker)."""
        return max(0, (x - worker + n_workers - 1) // n_workers)

    def _worker_batches(self, epoch: int, worker: int, n_workers: int) -> int:
        lo = self._first(epoch)
        hi = lo + self.epoch_batches(epoch)
        return self._owned(hi, worker, n_workers) - self._owned(lo, worker, n_workers)

    # ---------------------------------------------------------------- iteration

    def _items(self, epoch: int, worker: int, n_workers: int, tally: _Tally) -> Iterator[tuple]:
        """This worker's good (sample, caption, position) of ``epoch``, in batching order, endless."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes its first batch from worker 0, then 1, ...: after a resume at batch t0
        # the worker it asks first must make batch t0, so worker ids are rotated by t0.
        worker = (worker + self.start.consumed) % n_workers
        tally = _Tally()
        epoch_of_start, _ = self.position(self.start.consumed)
        for epoch in itertools.count(epoch_of_start):
            n = self._worker_batches(epoch, worker, n_workers)
            if n == 0:
                continue
            lo = self._first(epoch)
            skip = self._owned(max(self.start.consumed, lo), worker, n_workers) - self._owned(lo, worker, n_workers)
            items = self._items(epoch, worker, n_workers, tally)
            rng = random.Random(f"buckets:{self._tag(epoch, worker, n_workers)}")
            try:
                yield from self._epoch_batches(epoch, items, n, min(skip, n), rng, tally)
            finally:
                items.close()  # the epoch's readers: streams opened ahead, connections

    def _take(self, items: Iterator, count: int, load: bool, tally: _Tally) -> list:
        """The next ``count`` usable items; with ``load`` each is prepared for its batch (pixels decoded)
        and failures replaced."""
        out: list = []
        while len(out) < count:
            item = next(items)
            if load:
                try:
                    self.collator.image_fields.prepare(item[0])
                except BadSample as e:
                    tally.good -= 1  # counted good by its header check; it is bad after all
                    tally.bad[e.reason] += 1
                    continue
            out.append(item)
        return out

    def _epoch_batches(self, epoch: int, items: Iterator, n: int, skip: int, rng: random.Random,
                       tally: _Tally) -> Iterator[dict]:
        bs = self.batch_size
        window = max(1, self.shuffle_buffer // bs) if self.bucket_by_length else 1
        for first in range(0, n, window):
            nb = min(window, n - first)
            load = first + nb > skip  # skipped batches: no pixels
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
                batch = self.collator.pairs([(s, c) for s, c, _ in group])
                batch["sample_counts"] = tally.take()
                batch["epoch"] = epoch
                batch["positions"] = [p for _, _, p in group]
                yield batch


class PairStream(_BatchStream):
    """Epoch mode: every sample of one split once per epoch, equal batch counts on every rank."""

    def __init__(self, split: str | Split, collator: Collator, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000, start: StreamStart | None = None,
                 bucket_by_length: bool = False, io: IoOptions = DEFAULT_IO, max_caption_tokens: int | None = None):
        super().__init__(collator, batch_size, rank=rank, world_size=world_size, seed=seed,
                         shuffle_buffer=shuffle_buffer, start=start, bucket_by_length=bucket_by_length, io=io,
                         max_caption_tokens=max_caption_tokens)
        self.split = split if isinstance(split, Split) else resolve_split(str(split))
        self.sizes: dict[str, int] = dict(self.split.sizes)  # type: ignore[arg-type]  (resolved with sizes)
        self.urls, self.num_samples = list(self.sizes), sum(self.sizes.values())
        self.batches_per_epoch = self.num_samples // (world_size * batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{self.split.spec}: {self.num_samples} samples are fewer than one batch per rank"
                f" ({world_size} ranks x batch size {batch_size})"
            )
        plan = self.start.plan
        if plan is not None and len(plan) and (plan.min() < 0 or plan.max() >= self.num_samples):
            raise ValueError(f"start.plan: positions outside the split's {self.num_samples} samples")

    def epoch_order(self, epoch: int) -> list[tuple[str, int]]:
        """(shard, size) in the order of ``epoch``: its samples are positions 0 .. N-1 of the epoch."""
        order = sorted(self.sizes.items())
        random.Random(f"{self.seed}:shards:{epoch}").shuffle(order)
        return order

    def _plan(self, epoch: int) -> Sequence[int]:
        if epoch == self.start.origin_epoch and self.start.plan is not None:
            return self.start.plan
        return range(self.num_samples)

    def chunk(self, epoch: int, worker: int, n_workers: int) -> Sequence[int]:
        """Positions of the epoch order that ``worker`` of this rank reads in ``epoch``."""
        bs = self.batch_size
        a = self.rank * self.epoch_batches(epoch) * bs
        a += sum(self._worker_batches(epoch, w, n_workers) for w in range(worker)) * bs
        return self._plan(epoch)[a : a + self._worker_batches(epoch, worker, n_workers) * bs]

    def _items(self, epoch: int, worker: int, n_workers: int, tally: _Tally) -> Iterator[tuple]:
        tag = self._tag(epoch, worker, n_workers)
        reader = _Reader(self.epoch_order(epoch), self.io, tally.bad)
        mine = self.chunk(epoch, worker, n_workers)
        captions = random.Random(f"captions:{tag}")
        drawable = self._drawable()
        main = _decode(reader.read(_runs(mine)), tally, captions, self.collator.image_fields, drawable)
        # Wrap rule: a chunk short of usable samples goes on with the positions after it.
        after = (mine[-1] + 1) if len(mine) else 0
        extra = _decode(reader.read([(after, None)]), tally, captions, self.collator.image_fields, drawable)
        try:
            yield from itertools.chain(_shuffled(main, self.shuffle_buffer, random.Random(f"shuffle:{tag}")), extra)
        finally:
            main.close()
            extra.close()
            reader.close()


class ResampledPairStream(_BatchStream):
    """Resampled mode: an endless weighted mixture of shard sources, shards drawn with replacement."""

    def __init__(self, sources: Sequence[tuple[str | Split, float]], collator: Collator, batch_size: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 start: StreamStart | None = None, epoch_samples: int | None = None,
                 bucket_by_length: bool = False, io: IoOptions = DEFAULT_IO, max_caption_tokens: int | None = None):
        super().__init__(collator, batch_size, rank=rank, world_size=world_size, seed=seed,
                         shuffle_buffer=shuffle_buffer, start=start, bucket_by_length=bucket_by_length, io=io,
                         max_caption_tokens=max_caption_tokens)
        if not sources:
            raise ValueError("sources: name at least one (path, weight)")
        bad = [f"{p} (weight {w})" for p, w in sources if not float(w) > 0]
        if bad:
            raise ValueError(f"sources: weights must be positive: {', '.join(bad)}")
        if self.start.plan is not None:
            raise ValueError("start.plan: resampled streams draw with replacement; there is no plan")
        need = epoch_samples is None
        self.splits = [s if isinstance(s, Split) else resolve_split(str(s), need_sizes=need) for s, _ in sources]
        self.weights = [float(w) for _, w in sources]
        empty = [s.spec for s in self.splits if not s.urls]
        if empty:
            raise ValueError(f"sources: no shards in {', '.join(empty)}")
        self.num_samples = None if not need else sum(s.total or 0 for s in self.splits)
        self.epoch_samples = epoch_samples if epoch_samples is not None else self.num_samples
        self.batches_per_epoch = max(1, self.epoch_samples // (world_size * batch_size))

    def _draws(self, split: Split, rng: random.Random, counts: Counter) -> Iterator[tuple[int, dict]]:
        """Whole shards drawn with replacement, forever; the next draw is opened ahead."""
        prefetcher = storage.Prefetcher(timeout_s=self.io.timeout_s) if self.io.prefetch else None
        empty, url = 0, rng.choice(split.urls)
        try:
            while True:
                following = rng.choice(split.urls)  # drawn one ahead: the same sequence of shards
                if prefetcher is not None and following != url:
                    prefetcher.ahead(following)
                got = False
                for raw in read_shard(url, counts=counts, retries=self.io.retries, backoff_s=self.io.backoff_s,
                                      prefetcher=prefetcher, max_member_bytes=self.io.max_member_bytes,
                                      timeout_s=self.io.timeout_s):
                    got = True
                    yield -1, raw
                empty = 0 if got else empty + 1
                if empty >= max(10, 2 * len(split.urls)):
                    raise RuntimeError(f"source {split.spec}: no readable sample in {empty} shards drawn in a row")
                url = following
        finally:
            if prefetcher is not None:
                prefetcher.close()

    def _items(self, epoch: int, worker: int, n_workers: int, tally: _Tally) -> Iterator[tuple]:
        tag = self._tag(epoch, worker, n_workers)
        captions = random.Random(f"captions:{tag}")
        drawable = self._drawable()
        streams = [_decode(self._draws(split, random.Random(f"shards:{i}:{tag}"), tally.bad), tally, captions,
                           self.collator.image_fields, drawable) for i, split in enumerate(self.splits)]
        cum = list(itertools.accumulate(self.weights))
        mix = random.Random(f"mix:{tag}")

        def mixture() -> Iterator[tuple]:
            try:
                while True:
                    i = min(bisect.bisect_right(cum, mix.random() * cum[-1]), len(streams) - 1)
                    yield next(streams[i])
            finally:
                for stream in streams:  # their prefetchers: streams opened ahead, threads
                    stream.close()

        return _shuffled(mixture(), self.shuffle_buffer, random.Random(f"shuffle:{tag}"))


class StreamSettings(Protocol):
    """What the training stream reads of the experiment's ``data:`` section (``config.DataConfig``)."""

    mode: str
    sources: Sequence  # of (path, weight) records
    train_split: str
    epoch_samples: int | None
    shuffle_buffer: int
    bucket_by_length: bool
    max_train_caption_tokens: int | None
    io_retries: int
    io_backoff_s: float
    io_timeout_s: float
    prefetch_shards: bool
    max_member_mb: int

    def split_spec(self, split: str) -> str: ...


def io_options(data: StreamSettings) -> IoOptions:
    return IoOptions(retries=data.io_retries, backoff_s=data.io_backoff_s, prefetch=data.prefetch_shards,
                     max_member_bytes=data.max_member_mb << 20, timeout_s=data.io_timeout_s)


def make_train_stream(data: StreamSettings, collator: Collator, batch_size: int, rank: int, world_size: int, seed: int,
                      start: StreamStart | None = None) -> PairStream | ResampledPairStream:
    """The training stream ``data.mode`` asks for: epoch mode over the train split, or the resampled
    mixture of ``data.sources``."""
    common = dict(rank=rank, world_size=world_size, seed=seed, shuffle_buffer=data.shuffle_buffer, start=start,
                  bucket_by_length=data.bucket_by_length, io=io_options(data),
                  max_caption_tokens=data.max_train_caption_tokens)
    if data.mode == "resampled":
        return ResampledPairStream([(s.path, s.weight) for s in data.sources], collator, batch_size,
                                   epoch_samples=data.epoch_samples, **common)
    return PairStream(data.split_spec(data.train_split), collator, batch_size, **common)


def train_loader(stream: IterableDataset, num_workers: int, worker_init_fn=None) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,  # the stream batches itself
        num_workers=num_workers,
        worker_init_fn=worker_init_fn,
        persistent_workers=num_workers > 0,
        multiprocessing_context="fork" if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )


@dataclass
class Consumed:
    """Which positions of the current epoch this rank's trainer has taken (for a continuation on
    another world size): a bitmap over the epoch order, reset when a new epoch starts."""

    epoch: int = -1
    bits: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))

    def add(self, epoch: int, positions: Sequence[int], num_samples: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.bits = epoch, np.zeros(num_samples, np.bool_)
        if positions:
            self.bits[np.asarray(positions, np.int64)] = True


class StreamProgress:
    """Where this rank's training stream is, as the trainer saves and restores it: batches taken
    since the stream's origin, the origin (epoch and the positions it covers), and which positions
    of the current epoch were taken (for a continuation on another layout)."""

    def __init__(self, batches: int = 0, origin_epoch: int = 0, plan: np.ndarray | None = None) -> None:
        self.batches, self.origin_epoch, self.plan = batches, origin_epoch, plan
        self.consumed = Consumed()

    def start(self) -> StreamStart:
        return StreamStart(self.origin_epoch, self.plan, self.batches)

    def take(self, batch: dict, num_samples: int | None) -> None:
        """Count one batch of the stream; its bookkeeping keys (``positions``, ``epoch``) are removed."""
        self.batches += 1
        positions, epoch = batch.pop("positions", None), batch.pop("epoch", None)
        if num_samples is not None and positions and positions[0] >= 0:
            self.consumed.add(epoch, positions, num_samples)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "origin_epoch": self.origin_epoch, "has_plan": self.plan is not None,
                "plan": self.plan if self.plan is not None else np.zeros(0, np.int64),
                "consumed_epoch": self.consumed.epoch,
                "consumed": np.packbits(self.consumed.bits), "consumed_len": int(self.consumed.bits.size)}

    def load_state_dict(self, state: dict) -> None:
        """The same layout (world size, micro-batch, workers): the stream replays exactly."""
        self.batches, self.origin_epoch = state["batches"], state["origin_epoch"]
        self.plan = np.asarray(state["plan"], np.int64) if state["has_plan"] else None
        self.consumed = _consumed(state)

    @classmethod
    def continuation(cls, saved: list[dict], resampled: bool) -> tuple[StreamProgress, str]:
        """The stream of a run on another layout, from every saved rank's state: the interrupted epoch
        continues with the samples no rank had taken, split over the new ranks (docs/data-format.md);
        a resampled stream restarts its nominal epoch. Returns it and a line that says so."""
        epoch = max(s["consumed_epoch"] for s in saved)
        if resampled or epoch < 0:
            return cls(origin_epoch=max(epoch, 0)), f"the stream restarts its nominal epoch {max(epoch, 0)} on the new layout"
        taken = None
        for s in saved:
            bits = _consumed(s)
            if bits.epoch == epoch:
                taken = bits.bits if taken is None else taken | bits.bits
        first = saved[0]
        if first["has_plan"] and first["origin_epoch"] == epoch:
            planned = np.asarray(first["plan"], np.int64)
        else:
            planned = np.arange(taken.size if taken is not None else 0, dtype=np.int64)
        remaining = planned[~taken[planned]] if taken is not None else planned
        return cls(origin_epoch=epoch, plan=remaining.astype(np.int64)), (
            f"epoch {epoch} continues with the {len(remaining)} of its samples no rank had taken, split over the"
            " new ranks; later epochs follow the new layout")


def _consumed(state: dict) -> Consumed:
    bits = np.unpackbits(np.asarray(state["consumed"], np.uint8), count=state["consumed_len"]).astype(bool)
    return Consumed(state["consumed_epoch"], bits)
