"""``data_tools karpathy``: Karpathy-split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``, ...).

The JSON holds ``{"images": [{"filename", "filepath"?, "split", "imgid", "cocoid"?,
"sentences": [{"raw", "tokens"}, ...]}, ...]}``. Each image becomes one sample
in its split (``restval`` goes to ``train`` unless ``--restval-to keep``) with
the ``raw`` text of every sentence as its captions (``tokens`` joined by spaces
when ``raw`` is missing). The image file is ``IMAGES/filepath/filename`` when
that exists, else ``IMAGES/filename``; it is stored as it is (JPEG stays JPEG).
The image id is the file name without its extension.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .convert import Inputs, _abs, add_common_args, issue, run_from_args

GENERATOR = "karpathy"


def collect(
    json_path: str | Path, images: str | Path | None, features: str | Path | None, restval_to: str = "train"
) -> Inputs:
    """Records of every image of the JSON, by split."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: no 'images' list (not a Karpathy-split JSON)")
    if images is None and features is None:
        raise ValueError("give --images, --features or both")
    root = None if images is None else Path(images)
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a directory")
    inputs = Inputs(features, image_root=root)
    for i, entry in enumerate(entries):
        where = f"{json_path.name}:images[{i}]"
        filename = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(filename, str) or not filename:
            inputs.note(None, issue("unknown_image", None, where, "entry without a filename"))
            continue
        split = entry.get("split")
        if split == "restval" and restval_to == "train":
            split = "train"
        stem = Path(filename).stem
        if not isinstance(split, str) or not split:
            inputs.note(None, issue("bad_split", stem, where, f"split {split!r}"))
            continue
        captions: list[Any] = []
        for sentence in entry.get("sentences") or []:
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                raw = " ".join(str(t) for t in sentence["tokens"])
            captions.append(raw)
        image = None
        if root is not None:
            image = root / filename
            filepath = entry.get("filepath")
            if isinstance(filepath, str) and filepath and (root / filepath / filename).exists():
                image = root / filepath / filename
        stems = [stem] + [str(entry[k]) for k in ("cocoid",) if k in entry]
        inputs.add(split, stem, captions, image=image, feature_stems=stems, source=f"{where} ({filename})")
    return inputs


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "karpathy",
        help="convert a Karpathy-split JSON (dataset_flickr30k.json, dataset_coco.json) and its images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", required=True, help="dataset_*.json")
    p.add_argument(
        "--images", help="image folder (Flickr30k: flickr30k-images/; COCO: the folder holding train2014/ val2014/)"
    )
    p.add_argument(
        "--restval-to", choices=("train", "keep"), default="train", help="where restval images go (default train)"
    )
    add_common_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, generator: str = GENERATOR) -> int:
    inputs = collect(args.json, args.images, args.features, args.restval_to)
    params = {"json": _abs(args.json), "images": _abs(args.images), "restval_to": args.restval_to}
    return run_from_args(args, generator, params, inputs)
