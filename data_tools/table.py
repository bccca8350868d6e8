"""``data_tools table``: a Parquet / CSV / JSON-lines table of image paths and captions.

One row per (image, caption); the rows of one image (same ``--id-col`` value,
or the same path when there is no id column) become one sample with all their
captions, in row order. A caption cell may also hold a list of captions. Image
paths are relative to the table's folder (or ``--image-root``) or absolute.
The split comes from ``--split-col``; without one, each image goes to ``test``
with probability ``--test-fraction``, to ``val`` with ``--val-fraction`` and to
``train`` otherwise, decided by hashing its id with ``--seed`` (so adding rows
never moves other images between splits). Rows of one image with different
split values stay in the image's first split (listed as ``split_conflict``).
With ``--features DIR`` and ``--id-col`` the image column may be left out:
samples then hold features only, found as ``{id}.npz``.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from .convert import Inputs, _abs, add_common_args, issue, run_from_args

GENERATOR = "table"


def read_table(path: Path, columns: list[str]) -> dict[str, list[Any]]:
    """The named columns of a .parquet / .csv / .tsv / .jsonl file as Python lists (via pyarrow)."""
    import pyarrow as pa

    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        _check_columns(path, names, columns)
        table = pq.read_table(path, columns=columns)
    elif suffix in (".csv", ".tsv"):
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","),
            # Read everything as text: "007" is an id, not the number 7.
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}),
        )
        _check_columns(path, table.column_names, columns)
    elif suffix in (".jsonl", ".ndjson", ".json"):
        import pyarrow.json as pajson

        table = pajson.read_json(path)
        _check_columns(path, table.column_names, columns)
    else:
        raise ValueError(f"--input {path}: expected .parquet, .csv, .tsv or .jsonl")
    return {c: table.column(c).to_pylist() for c in columns}


def _check_columns(path: Path, have: list[str], want: list[str]) -> None:
    missing = [c for c in want if c not in have]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; it has {have}")


def hash_split(image_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of one image from a hash of (seed, image id)."""
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).strip() or None


def collect(
    path: str | Path,
    *,
    image_col: str | None,
    caption_col: str,
    split_col: str | None = None,
    id_col: str | None = None,
    image_root: str | Path | None = None,
    features: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
) -> Inputs:
    path = Path(path)
    if image_col is None and (features is None or id_col is None):
        raise ValueError("--image-col is required unless --features and --id-col are given")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1):
        raise ValueError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction}: need >= 0 and sum <= 1")
    columns = [c for c in (image_col, caption_col, split_col, id_col) if c is not None]
    columns = list(dict.fromkeys(columns))
    data = read_table(path, columns)
    root = Path(image_root) if image_root is not None else path.parent
    n_rows = len(data[caption_col])

    inputs = Inputs(features, image_root=root)
    groups: dict[str, dict[str, Any]] = {}  # image id -> {image, split, captions, row}
    for row in range(n_rows):
        where = f"{path.name}:row {row}"
        image = _text(data[image_col][row]) if image_col is not None else None
        image_id = _text(data[id_col][row]) if id_col is not None else image
        if image_id is None:
            inputs.note(None, issue("missing_image", None, where, "no image path" if id_col is None else "no id"))
            continue
        if split_col is not None:
            split = _text(data[split_col][row])
        else:
            split = hash_split(image_id, seed, val_fraction, test_fraction)
        caption = data[caption_col][row]
        captions = list(caption) if isinstance(caption, (list, tuple)) else [caption]
        group = groups.get(image_id)
        if group is None:
            groups[image_id] = {"image": image, "split": split, "captions": captions, "row": row}
            continue
        if split != group["split"]:
            inputs.note(
                group["split"],
                issue("split_conflict", image_id, where, f"split {split!r}, first seen in {group['split']!r}"),
            )
        group["captions"].extend(captions)

    for image_id, g in groups.items():
        image = None
        if image_col is not None:
            image = Path(g["image"]) if Path(g["image"]).is_absolute() else root / g["image"]
        stems = [image.stem, image_id] if image is not None else [image_id]
        source = f"{path.name}:row {g['row']}"
        if not isinstance(g["split"], str):
            inputs.note(None, issue("bad_split", image_id, source, f"split {g['split']!r}"))
            continue
        inputs.add(g["split"], image_id, g["captions"], image=image, feature_stems=stems, source=source)
    return inputs


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "table",
        help="convert a .parquet/.csv/.jsonl table of image paths and captions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="FILE.parquet, FILE.csv, FILE.tsv or FILE.jsonl")
    p.add_argument("--image-col", help="column of image paths (relative to the table's folder or absolute)")
    p.add_argument("--caption-col", required=True, help="column of captions (a string or a list of strings)")
    p.add_argument("--split-col", help="column of split names (default: assign by hash, see --val-fraction)")
    p.add_argument("--id-col", help="column of image ids (default: the image path)")
    p.add_argument("--image-root", help="folder that relative image paths start from (default: the table's folder)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="without --split-col: share of images for val")
    p.add_argument("--test-fraction", type=float, default=0.0, help="without --split-col: share of images for test")
    add_common_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    inputs = collect(
        args.input,
        image_col=args.image_col,
        caption_col=args.caption_col,
        split_col=args.split_col,
        id_col=args.id_col,
        image_root=args.image_root,
        features=args.features,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
    )
    params = {
        "input": _abs(args.input),
        "image_col": args.image_col,
        "caption_col": args.caption_col,
        "split_col": args.split_col,
        "id_col": args.id_col,
        "image_root": _abs(args.image_root),
    }
    if args.split_col is None:
        params.update(val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    return run_from_args(args, GENERATOR, params, inputs)
