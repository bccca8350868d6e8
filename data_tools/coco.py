"""``data_tools coco``: a COCO captions file (``captions_train2014.json``, ...) and its images.

The file holds ``images`` (``id``, ``file_name``, ``width``, ``height``) and
``annotations`` (``image_id``, ``caption``). Each image becomes one sample with
all its captions (in annotation order), in one split named by ``--split``
(default: ``train`` or ``val`` from the file name). The image file is
``IMAGES/file_name``, stored as it is; the image id is the file name without its
extension (``COCO_val2014_000000391895``). Region features are looked up as
``{stem}.npz``, then ``{id}.npz``. Annotations of unknown images are listed, as
are images without captions.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from .convert import Inputs, _abs, add_common_args, issue, run_from_args

GENERATOR = "coco"


def split_from_name(path: Path) -> str:
    m = re.search(r"(train|val|test)", path.name)
    if not m:
        raise ValueError(f"cannot tell the split from {path.name!r}; pass --split NAME")
    return m.group(1)


def collect(captions: str | Path, images: str | Path | None, features: str | Path | None, split: str | None) -> Inputs:
    path = Path(captions)
    data = json.loads(path.read_text(encoding="utf-8"))
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise ValueError(f"{path}: needs 'images' and 'annotations' lists (a COCO captions file)")
    if images is None and features is None:
        raise ValueError("give --images, --features or both")
    root = None if images is None else Path(images)
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a directory")
    split = split or split_from_name(path)
    inputs = Inputs(features, image_root=root)
    by_id: dict[Any, list[Any]] = {}
    files: dict[Any, str] = {}
    for i, img in enumerate(data["images"]):
        name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(name, str) or not name or img.get("id") is None:
            inputs.note(
                split, issue("unknown_image", None, f"{path.name}:images[{i}]", "entry without id or file_name")
            )
            continue
        if img["id"] in files:
            inputs.note(
                split, issue("duplicate_image", Path(name).stem, f"{path.name}:images[{i}]", f"id {img['id']} repeated")
            )
            continue
        files[img["id"]] = name
        by_id[img["id"]] = []
    for i, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in by_id:
            inputs.note(
                split, issue("unknown_image", str(image_id), f"{path.name}:annotations[{i}]", "image_id not in images")
            )
            continue
        by_id[image_id].append(ann.get("caption"))
    for image_id, name in files.items():
        stem = Path(name).stem
        inputs.add(
            split,
            stem,
            by_id[image_id],
            image=None if root is None else root / name,
            feature_stems=(stem, str(image_id)),
            source=f"{path.name}:image {image_id} ({name})",
        )
    return inputs


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "coco",
        help="convert a COCO captions_*.json and its images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--captions", required=True, help="captions_*.json")
    p.add_argument("--images", help="folder of the file_name images (e.g. val2014/)")
    p.add_argument("--split", help="split name (default: train/val/test from the file name)")
    add_common_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, generator: str = GENERATOR) -> int:
    inputs = collect(args.captions, args.images, args.features, args.split)
    split = args.split or split_from_name(Path(args.captions))
    params = {"captions": _abs(args.captions), "images": _abs(args.images), "split": split}
    return run_from_args(args, generator, params, inputs)
