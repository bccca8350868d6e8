"""Training-loader throughput per core: region-feature shards and JPEG shards through the stream.

1. Region features: the demo data set (``make_demo`` into a temp dir) through ``PairStream`` with the
   region collator (decode json + npy, shuffle, tokenize, pad).
2. JPEG: ~300 photo-like 640x480 JPEGs (gradients, blobs and noise) written with ``ShardWriter``,
   through ``PairStream`` with the ``patches`` collator (header check, shuffle, decode with ``draft``,
   resize the shorter side to 384 and centre-crop, normalise, tokenize) -- beside PIL's own
   decode + resize of the same images (the ceiling) and the ratio to it.

3. Where the shards live: both streams again from the same shards served over HTTP by a loopback
   server in a process of its own (``http://127.0.0.1:PORT/.../shard-{000000..00000N}.tar``) and
   through ``pipe:cat PATH``, as ratios to the local folder.
4. What prefetch buys: region shards of 250 samples from a server that waits ``--latency-ms``
   before the first byte of every request (a distant store), with ``prefetch`` on and off.

Everything runs in this process (``num_workers=0``, one torch thread), so each figure is per core;
the training DataLoader runs one such loop per worker. The CPU-time figures include fsspec's event
loop thread (the HTTP client) but not the server or ``cat``.

    python benchmarks/loader.py [--region-samples 4000] [--jpegs 300] [--image-size 384] [--repeats 3]
                                [--latency-ms 50] [--no-remote] [--prefetch-samples 4000]

Targets (one core): >= 2,000 samples/s for region features, >= 150 samples/s for the JPEGs; from
an HTTP URL or a pipe within 0.8x of the local folder.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from iais_scale.data.collate import Collator  # noqa: E402
from iais_scale.data.demo import make_demo  # noqa: E402
from iais_scale.data.format import ShardWriter  # noqa: E402
from iais_scale.data.image_fields import PixelFields, RegionFields  # noqa: E402
from iais_scale.data.pipeline import DEFAULT_IO, PairStream  # noqa: E402
from iais_scale.data.tokenizer import load_tokenizer  # noqa: E402
from iais_scale.data.transforms import ImageTransform  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def photo_like_jpegs(n: int, width: int = 640, height: int = 480, seed: int = 0) -> list[bytes]:
    """JPEGs (quality 90) with smooth gradients, a few soft blobs and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(n):
        img = np.empty((height, width, 3), np.float32)
        for c in range(3):
            a, b, base = rng.uniform(-0.3, 0.3, 2).tolist() + [rng.uniform(40, 200)]
            img[..., c] = base + a * (x - width / 2) + b * (y - height / 2)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(30, 150)
            blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
            img += blob[..., None] * rng.uniform(-90, 90, 3)
        img += rng.normal(0, 6, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Rate:
    """Best samples/s over repeats, by wall clock and by this process's CPU time (one thread: the
    per-core figure, less disturbed when other processes share the cores)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def add(self, n: int, wall: float, cpu: float) -> None:
        self.wall, self.cpu = max(self.wall, n / wall), max(self.cpu, n / cpu)

    def __str__(self) -> str:
        return f"{self.wall:8.0f} samples/s wall, {self.cpu:8.0f} samples/s of CPU time"


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def stream_rate(stream: PairStream, n_batches: int, repeats: int) -> Rate:
    """Samples/s over ``repeats`` runs of ``n_batches`` batches (after one warm-up batch)."""
    rate = Rate()
    for _ in range(repeats):
        it = iter(stream)
        next(it)
        w0, c0 = _clocks()
        n = sum(len(b["keys"]) for b in islice(it, n_batches))
        w1, c1 = _clocks()
        rate.add(n, w1 - w0, c1 - c0)
    return rate


def pil_rate(images: list[bytes], size: int, repeats: int) -> Rate:
    """PIL alone: open, draft, RGB, resize the shorter side to ``size`` and crop, to an array."""
    rate = Rate()
    for _ in range(repeats):
        w0, c0 = _clocks()
        for data in images:
            im = Image.open(io.BytesIO(data))
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=box))
        w1, c1 = _clocks()
        rate.add(len(images), w1 - w0, c1 - c0)
    return rate


@contextmanager
def http_server(folder: Path, latency_s: float = 0.0):
    """The loopback server of the tests (``tests/http_server.py``) in a process of its own, so that
    serving takes no time of this process; yields its base URL."""
    cmd = [sys.executable, str(REPO / "tests" / "http_server.py"), str(folder), "--latency-s", str(latency_s)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def shard_list(prefix: str, n: int) -> str:
    return f"{prefix}/shard-{{000000..{n - 1:06d}}}.tar"


def sources(split_dir: Path, base_url: str, root: Path) -> dict[str, str]:
    """The same split as a local folder, an HTTP shard list and a ``pipe:cat`` shard list."""
    n = len(list(split_dir.glob("shard-*.tar")))
    return {"local": str(split_dir),
            "http": shard_list(f"{base_url}/{split_dir.relative_to(root).as_posix()}", n),
            "pipe:cat": "pipe:cat " + shard_list(str(split_dir), n)}


def compare_sources(title: str, split_dir: Path, base_url: str, root: Path, collator: Collator, batch_size: int,
                    n_batches: int | None, repeats: int) -> None:
    rates = {}
    for name, spec in sources(split_dir, base_url, root).items():
        stream = PairStream(spec, collator, batch_size, shuffle_buffer=1000)
        rates[name] = stream_rate(stream, min(n_batches or 10**9, stream.batches_per_epoch - 1), repeats)
    for name, rate in rates.items():
        ratio = "" if name == "local" else (f"   {rate.wall / rates['local'].wall:5.2f}x local wall,"
                                            f" {rate.cpu / rates['local'].cpu:5.2f}x CPU (target >= 0.8)")
        print(f"{title:<9} {name:<9}: {rate}{ratio}")


def prefetch_gain(tmp: Path, tokenizer, latency_s: float, repeats: int, samples: int = 4000) -> None:
    """Shards of 250 region samples (about the time of one round trip to read) from a server with a
    first-byte latency: prefetch on vs off."""
    root = make_demo(tmp / "small", n_train=samples, n_val=1, n_test=1, n_swap_groups=0, shard_size=250)
    regions = Collator(tokenizer, 40, RegionFields(36))
    n_shards = len(list((root / "train").glob("shard-*.tar")))
    with http_server(tmp, latency_s) as url:
        spec = shard_list(f"{url}/small/train", n_shards)
        rates = {}
        for prefetch in (False, True):
            stream = PairStream(spec, regions, 32, shuffle_buffer=1000, io=replace(DEFAULT_IO, prefetch=prefetch))
            rates[prefetch] = stream_rate(stream, stream.batches_per_epoch - 1, repeats)
    print(f"prefetch  ({n_shards} shards of 250 samples, {latency_s * 1000:.0f} ms before each response's first byte)")
    print(f"  prefetch off      : {rates[False]}")
    print(f"  prefetch on       : {rates[True]}   {rates[True].wall / rates[False].wall:5.2f}x wall")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--region-samples", type=int, default=4000)
    ap.add_argument("--jpegs", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=50.0, help="first-byte latency of the prefetch comparison")
    ap.add_argument("--no-remote", action="store_true", help="only the local-folder figures")
    ap.add_argument("--prefetch-samples", type=int, default=4000, help="samples of the prefetch comparison (250/shard)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo(Path(tmp) / "demo", n_train=args.region_samples, n_val=1, n_test=1, n_swap_groups=0,
                         shard_size=1000)
        tokenizer = load_tokenizer(root / "tokenizer")
        regions = Collator(tokenizer, 40, RegionFields(36))
        stream = PairStream(root / "train", regions, args.batch_size, shuffle_buffer=1000)
        n = min(stream.batches_per_epoch - 1, 2000 // args.batch_size)
        region = stream_rate(stream, n, args.repeats)

        images = photo_like_jpegs(args.jpegs)
        with ShardWriter(Path(tmp) / "jpeg" / "train", shard_size=100) as w:
            for i, data in enumerate(images):
                w.write(f"train-{i:06d}", {"image_id": str(i), "split": "train", "width": 640, "height": 480,
                                           "captions": [f"a photo of a scene with {i % 7} soft blobs"]},
                        image=data, image_ext="jpg")
        patches = Collator(tokenizer, 40, PixelFields(ImageTransform(args.image_size)))
        bs = min(args.batch_size, 16)
        stream = PairStream(Path(tmp) / "jpeg" / "train", patches, bs, shuffle_buffer=1000)
        jpeg = stream_rate(stream, stream.batches_per_epoch - 1, args.repeats)
        pil = pil_rate(images, args.image_size, args.repeats)

        kb = np.mean([len(d) for d in images]) / 1024
        print(f"one core (in-process, 1 torch thread), batch size {args.batch_size} (regions) / {bs} (JPEG)")
        print(f"region features   : {region}   (target >= 2000; {args.region_samples} demo samples)")
        print(f"JPEG -> {args.image_size} px    : {jpeg}   (target >= 150; {len(images)} x 640x480, {kb:.0f} KiB each)")
        print(f"PIL decode+resize : {pil}   (the ceiling)")
        print(f"loader / PIL      : {jpeg.wall / pil.wall:8.2f} wall, {jpeg.cpu / pil.cpu:8.2f} CPU time")
        if not args.no_remote:
            print("where the shards live (same shards, same stream; ratios to the local folder):")
            with http_server(Path(tmp)) as url:
                compare_sources("regions", root / "train", url, Path(tmp), regions, args.batch_size,
                                2000 // args.batch_size, args.repeats)
                compare_sources("JPEG", Path(tmp) / "jpeg" / "train", url, Path(tmp), patches, bs, None, args.repeats)
            prefetch_gain(Path(tmp), tokenizer, args.latency_ms / 1000, args.repeats, args.prefetch_samples)
    print(f"load average      : {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

if __name__ == "__main__":
    main()
