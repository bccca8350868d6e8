"""``data_tools verify``: decode and check every sample of a data set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .scan import IMG2DATASET_LAYOUT, scan_dataset


def verify(path: str | Path, *, workers: int = 1, out: Callable[[str], None] = print) -> int:
    """Print each problem as ``shard:key: reason`` and a summary; return the number of problems."""
    scan = scan_dataset(path, decode_images=True, workers=workers, on_problem=out)
    for name, report in scan.splits.items():
        status = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
        if report.layout == IMG2DATASET_LAYOUT:
            status += " (img2dataset layout: captions from .txt, counts from *_stats.json, no sizes.json)"
        out(f"{name}: {report.shards} shard(s), {report.samples} samples, {report.captions} captions: {status}")
    n_samples = sum(r.samples for r in scan.splits.values())
    n_shards = sum(r.shards for r in scan.splits.values())
    where = f"{n_samples} samples in {n_shards} shard(s) of {len(scan.splits)} split(s) under {path}"
    out(f"FAILED: {scan.n_problems} problem(s) in {where}" if scan.n_problems else f"OK: {where}")
    return scan.n_problems
