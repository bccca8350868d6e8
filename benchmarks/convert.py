"""Benchmark of ``python -m data_tools karpathy``: conversion speed with one worker, JPEGs passed through.

Builds a Karpathy-style input in a temporary folder (``--n`` PIL-drawn 384 px JPEG
photos-alike with 5 captions each, split 80/10/10, in ``dataset_flickr30k.json``
form), converts it with ``--workers 1`` (everything in this one process, decode
check on, which is the default), and reports samples per second per core. Then it
hashes the ``.jpg`` member of every sample and compares it with the source file:
the converter must store the original bytes, never a re-encoded image.

    python benchmarks/convert.py [--n 300] [--size 384] [--shard-size 100] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from data_tools.__main__ import main  # noqa: E402
from iais_scale.data.shards import read_shard  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
THINGS = ["dog", "ball", "car", "kite", "tree", "boat"]


def make_input(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``root/images/*.jpg`` and ``root/dataset_flickr30k.json``; returns the JSON path."""
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    entries = []
    for i in range(n):
        # A smooth background, a few shapes and mild noise: compresses like a photo (tens of KB at q=90).
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx * rng.uniform(0.2, 1) + yy * rng.uniform(0.2, 1))[..., None] / 2
        pixels = c0 * (1 - t) + c1 * t + rng.integers(-8, 9, (size, size, 3), dtype=np.int16)
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(2, 6)):
            x, y = rng.integers(0, size - 40, 2)
            w, h = rng.integers(20, size // 2, 2)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=fill)
        img = img.filter(ImageFilter.SMOOTH)
        name = f"{1000000 + i}.jpg"
        img.save(images / name, format="JPEG", quality=90)
        split = "train" if i % 10 < 8 else "val" if i % 10 == 8 else "test"
        sentences = [
            {
                "raw": f"a {rng.choice(COLOURS)} {rng.choice(THINGS)} next to a {rng.choice(COLOURS)} {rng.choice(THINGS)}"
            }
            for _ in range(5)
        ]
        for s in sentences:
            s["tokens"] = s["raw"].split()
        entries.append({"filename": name, "imgid": i, "split": split, "sentences": sentences})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path


def check_pass_through(out: Path, images: Path) -> tuple[int, int]:
    """(samples whose .jpg member hashes like the source file, samples checked)."""
    same = total = 0
    for shard in sorted(out.glob("*/shard-*.tar")):
        for sample in read_shard(str(shard)):  # the one shard reader
            image_id = json.loads(sample["json"])["image_id"]
            source = (images / f"{image_id}.jpg").read_bytes()
            total += 1
            same += hashlib.sha256(sample["jpg"]).digest() == hashlib.sha256(source).digest()
    return same, total


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="number of images")
    parser.add_argument("--size", type=int, default=384, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="iais_convert_bench_"))
    try:
        t0 = time.perf_counter()
        json_path = make_input(tmp / "input", args.n, args.size)
        mb = sum(p.stat().st_size for p in (tmp / "input" / "images").iterdir()) / 2**20
        print(
            f"input: {args.n} JPEGs of {args.size}x{args.size} ({mb:.1f} MiB) made in {time.perf_counter() - t0:.1f} s"
        )

        # Warm the page cache and the imports, so the timing is the conversion itself.
        for p in (tmp / "input" / "images").iterdir():
            p.read_bytes()
        import webdataset  # noqa: F401

        out = tmp / "out"
        cmd = ["karpathy", "--json", str(json_path), "--images", str(tmp / "input" / "images")]
        cmd += ["--out", str(out), "--shard-size", str(args.shard_size), "--workers", "1"]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        rc = main(cmd)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if rc != 0:
            print(f"conversion failed with exit code {rc}")
            return 1
        n = sum(json.loads((out / "manifest.json").read_text())["splits"].values())
        print(f"karpathy, 1 worker: {n} samples in {wall:.2f} s wall ({cpu:.2f} s CPU)")
        print(f"  {n / wall:.0f} samples/s/core ({n / cpu:.0f} per CPU-second), {mb / wall:.1f} MiB/s")

        same, total = check_pass_through(out, tmp / "input" / "images")
        verdict = "PASS" if same == total == args.n else "FAIL"
        print(f"JPEG pass-through: {same}/{total} samples byte-identical to their source files (sha256): {verdict}")
        return 0 if verdict == "PASS" else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main_())
