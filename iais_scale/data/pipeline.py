"""The training stream: WebDataset shards -> safe decoding -> shuffled matched pairs -> batches.

The stream is endless and split by rank and by worker: epoch e visits the shards in an order drawn
from ``seed + e``; each (rank, worker) reads its share. The trainer takes a fixed number of batches
per step budget, so every rank yields the same number of batches whatever the shard sizes, and an
uneven split can never leave one rank waiting in a collective (webdataset#225, DeepSpeed#2223).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import format as fmt
from .collate import Collator
from .samples import BadSample, decode_sample


def split_shards(split_dir: str | Path) -> tuple[list[str], int]:
    """The shard paths of a split folder (sorted) and its sample count from ``sizes.json``."""
    split_dir = Path(split_dir)
    sizes_file = split_dir / fmt.SIZES_FILE
    if not sizes_file.is_file():
        raise FileNotFoundError(f"{sizes_file} not found: is {split_dir} a split folder of shards?")
    sizes = json.loads(sizes_file.read_text())
    missing = [name for name in sizes if not (split_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{split_dir}: shards listed in {fmt.SIZES_FILE} are missing: {missing}")
    names = sorted(sizes)
    return [str(split_dir / n) for n in names], sum(sizes.values())


def _bad_shard_handler(counts: Counter) -> callable:
    def handler(exn: Exception) -> bool:
        counts["bad_shard"] += 1
        return True  # skip the rest of that shard and go on

    return handler


class PairStream(IterableDataset):
    """Endless matched pairs of one split for one rank, batched and collated in the workers.

    Each visit of an image draws one of its captions, so two captions of one image never meet as
    false negatives in a batch. Every batch carries the good/bad sample counts of its worker since
    the previous batch, so that the main process can count bad samples per rank and reason.
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
    ):
        self.urls, self.num_samples = split_shards(split_dir)
        self.collator, self.batch_size = collator, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        # Resume: the stream is a pure function of (seed, rank, worker), so skipping the batches
        # already consumed (without collating them) reproduces the exact sequence that follows.
        self.start_batch = start_batch

    def _samples(self, slot: int, n_slots: int, counts: Counter) -> Iterator[dict]:
        """Raw samples of this (rank, worker) slot, forever, epoch after epoch."""
        shard_level = len(self.urls) >= n_slots
        for epoch in range(1 << 62):
            order = list(self.urls)
            random.Random(self.seed + epoch).shuffle(order)
            if shard_level:  # enough shards: each slot reads its own
                order = order[slot::n_slots]
            source = wds.tarfile_to_samples(handler=_bad_shard_handler(counts))(iter({"url": u} for u in order))
            for i, raw in enumerate(source):
                if shard_level or i % n_slots == slot:  # few shards: split by sample index
                    yield raw

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        slot, n_slots = self.rank * n_workers + worker, self.world_size * n_workers
        rng = random.Random(f"{self.seed}-{slot}")
        counts: Counter = Counter()
        good = 0

        def pairs() -> Iterator[tuple]:
            nonlocal good
            for raw in self._samples(slot, n_slots, counts):
                try:
                    sample = decode_sample(raw, max_regions=self.collator.max_regions)
                except BadSample as e:
                    counts[e.reason] += 1
                    continue
                good += 1
                yield sample, rng.choice(sample.captions)

        shuffled = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(pairs())
        # The DataLoader takes batches from its workers in turn: global batch k is worker k % W's.
        skip = max(0, -(-(self.start_batch - worker) // n_workers))
        items: list = []
        for item in shuffled:
            items.append(item)
            if len(items) == self.batch_size and skip > 0:
                skip, items = skip - 1, []
            elif len(items) == self.batch_size:
                batch = self.collator.pairs(items)
                batch["sample_counts"] = (good, dict(counts))
                good, items = 0, []
                counts.clear()
                yield batch


def train_loader(stream: PairStream, num_workers: int) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,  # the stream batches itself
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        multiprocessing_context="fork" if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )

