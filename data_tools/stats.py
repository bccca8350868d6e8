"""``data_tools stats``: per-split counts and caption / region statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .scan import IAIS_LAYOUT, scan_dataset


def compute_stats(path: str | Path, *, workers: int = 1) -> tuple[dict[str, dict[str, Any]], int]:
    """Statistics per split and the number of problems met on the way (images are not decoded)."""
    scan = scan_dataset(path, decode_images=False, workers=workers)
    stats = {
        name: {
            "shards": r.shards,
            "samples": r.samples,
            "captions": r.captions,
            "caption_words": r.caption_words.as_dict(),
            "regions": r.regions.as_dict(),
            "images": r.images,
            # Only named when it is not our own format, so existing consumers see the same keys.
            **({"layout": r.layout} if r.layout != IAIS_LAYOUT else {}),
        }
        for name, r in scan.splits.items()
    }
    return stats, scan.n_problems


def _fmt(agg: dict[str, float | None]) -> str:
    if agg["mean"] is None:
        return "-"
    return f"{agg['min']:g}/{agg['mean']:.2f}/{agg['max']:g}"


def format_table(stats: dict[str, dict[str, Any]]) -> str:
    """A plain-text table, one row per split."""
    header = ["split", "shards", "samples", "captions", "words min/mean/max", "regions min/mean/max", "images"]
    rows = [
        [
            name,
            str(s["shards"]),
            str(s["samples"]),
            str(s["captions"]),
            _fmt(s["caption_words"]),
            _fmt(s["regions"]),
            str(s["images"]),
        ]
        for name, s in stats.items()
    ]
    if any("layout" in s for s in stats.values()):
        header.append("layout")
        for row, s in zip(rows, stats.values(), strict=True):
            row.append(s.get("layout", IAIS_LAYOUT))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    return "\n".join(lines)
