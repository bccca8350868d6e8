"""``python -m data_tools features``: a feature-only data set, from ``.npz`` files or a vision backbone.

``python -m data_tools features --dir DIR --captions FILE --out DIR`` converts a Karpathy-split JSON
or a COCO captions file whose images exist only as ``.npz`` region features (``regions.py``); with
images, use the ``--features DIR`` option of ``karpathy``, ``coco`` or ``table`` instead.

``python -m data_tools features --backbone NAME_OR_FOLDER --images-from SHARDS_DIR --out DIR``
runs a frozen vision backbone over the images of existing shards and writes its grid cells as
region features with their geometry (``extract_backbone_features``; docs/models.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from iais_scale.data.format import MANIFEST_FILE, TOKENIZER_DIR, Manifest, normalised_geometry, relation_data_reason
from iais_scale.data.samples import decode_sample
from iais_scale.data.shards import read_shard, resolve_split

from . import coco, karpathy
from .convert import (
    PROGRESS_FILE,
    Loaded,
    add_common_args,
    clear_other_splits,
    counts as issue_counts,
    issue,
    previous_run,
    write_split,
)

# ---------------------------------------------------------------- standalone command


def detect_captions_format(path: Path) -> str:
    """``karpathy`` or ``coco`` from the JSON's structure."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return "coco"
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and (not images or "sentences" in images[0]):
        return "karpathy"
    raise ValueError(f"{path}: neither a Karpathy-split JSON nor a COCO captions file")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "features",
        help="feature-only data set: .npz region features + captions, or a vision backbone's grid features",
        description="Join per-image .npz region features with a Karpathy-split JSON or a COCO captions "
        "file (detected from its content); samples hold features and no image. With --backbone: run a "
        "frozen vision backbone over the images of a data set's shards (--images-from) and write its grid "
        "cells as region features with their geometry (see docs/models.md).",
    )
    p.add_argument("--dir", help="folder of .npz files, one per image, named by image file stem")
    p.add_argument("--captions", help="dataset_*.json (Karpathy) or captions_*.json (COCO)")
    p.add_argument("--split", help="COCO only: split name (default: from the file name); with --backbone: the"
                   " splits to extract (comma-separated; default all), or the split name of a bare shard folder")
    p.add_argument("--restval-to", choices=("train", "keep"), default="train", help="Karpathy only")
    g = p.add_argument_group("grid features of a vision backbone")
    g.add_argument("--backbone", metavar="NAME_OR_FOLDER",
                   help="hf:FOLDER (a transformers vision model; a bare folder too) or timm:NAME")
    g.add_argument("--images-from", metavar="SHARDS_DIR",
                   help="a data set folder (manifest.json + split folders of shards) or one folder of shards")
    g.add_argument("--weights", default="pretrained", help="'pretrained' (default), 'random' or a state-dict file")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="average-pool the grid to at most this many cells (as model.backbone_max_tokens)")
    g.add_argument("--batch-size", type=int, default=64, help="images per backbone forward (default 64)")
    g.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:N")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="backbone compute precision (auto: bf16 on a GPU, fp32 on the CPU)")
    g.add_argument("--drop-images", action="store_true", help="do not copy the images into the output shards")
    add_common_args(p, features_help=argparse.SUPPRESS)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.backbone or args.images_from:
        if not (args.backbone and args.images_from):
            raise ValueError("--backbone and --images-from go together")
        if args.dir or args.captions:
            raise ValueError("--backbone extracts features from images: --dir/--captions do not apply")
        extract_backbone_features(
            args.images_from, args.out, args.backbone, weights=args.weights, max_tokens=args.max_tokens,
            split=args.split, batch_size=args.batch_size, device=args.device, precision=args.precision,
            feature_dtype=args.feature_dtype, shard_size=args.shard_size, workers=max(1, args.workers),
            keep_images=not args.drop_images, overwrite=args.overwrite)
        return 0
    if not (args.dir and args.captions):
        raise ValueError("features: give --dir and --captions (.npz features), or --backbone and --images-from")
    args.features = args.dir
    args.images = None
    kind = detect_captions_format(Path(args.captions))
    if kind == "karpathy":
        args.json = args.captions
        return karpathy.run(args, generator="features")
    return coco.run(args, generator="features")


# ---------------------------------------------------------------- grid features of a vision backbone

BACKBONE_GENERATOR = "backbone_features"


def _split_sources(images_from: str, split: str | None) -> tuple[dict[str, str], Manifest | None]:
    """{split: shard folder} of ``--images-from`` (a data set with manifest.json, or one folder of
    shards) and the source manifest (None for a bare folder)."""
    root = Path(images_from)
    manifest = Manifest.read(root) if (root / MANIFEST_FILE).is_file() else None
    if manifest is not None:
        names = [s for s in manifest.splits if (root / s).is_dir()]
        if split:
            wanted = split.split(",")
            missing = [s for s in wanted if s not in names]
            if missing:
                raise ValueError(f"--split {split}: {missing} not in {root} (splits: {names})")
            names = wanted
        return {s: str(root / s) for s in names}, manifest
    if not root.is_dir():
        raise FileNotFoundError(f"--images-from {root}: not a folder")
    return {split or "train": str(root)}, None


def _image_ext(data: bytes) -> str:
    if data[:4] == b"\x89PNG":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def _crop_geometry(cells: np.ndarray, box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Pixel boxes [n, 4] in the whole image of the grid cells ``cells`` (their geometry [n, 7],
    normalised to the crop ``box``: the evaluation crop, in pixels)."""
    x1, y1, x2, y2 = box
    cw, ch = (x2 - x1) / width, (y2 - y1) / height
    ox, oy = x1 / width, y1 / height
    gx1, gy1 = ox + cells[:, 0] * cw, oy + cells[:, 1] * ch
    gx2, gy2 = ox + cells[:, 2] * cw, oy + cells[:, 3] * ch
    boxes = np.stack([gx1, gy1, gx2, gy2], 1) * np.array([width, height, width, height], np.float64)
    return boxes.astype(np.float32)


def extract_backbone_features(
    images_from: str,
    out_dir: str,
    backbone: str,
    *,
    weights: str = "pretrained",
    max_tokens: int | None = None,
    split: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    feature_dtype: str = "float16",
    shard_size: int = 1000,
    workers: int = 4,
    keep_images: bool = True,
    overwrite: bool = False,
    out: Any = print,
) -> dict[str, Any]:
    """Run a frozen vision backbone over the images of a data set's shards and write a region-feature
    data set: per sample ``feat.npy`` [N, D] (the backbone's grid cells, average-pooled to at most
    ``max_tokens``), ``geometry.npy`` [N, 7] and ``boxes.npy`` [N, 4] of the cells in the image (the
    evaluation crop mapped back into the image: normalised by the image size, docs/data-format.md),
    the sample's metadata (captions, ids, annotations) and, with ``keep_images``, its image.

    The features equal what a ``model.image_input: backbone`` model with this backbone frozen and
    ``backbone_max_tokens`` computes from the same image (evaluation transform); a ``regions`` model
    trained on them costs no vision forward per step. Batched, on the GPU when there is one;
    resumable like the other converters (``{split}/progress.jsonl``: a rerun continues after the
    last complete shard; identical inputs and parameters give identical shards). Returns the
    manifest.
    """
    import time
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    # The model and torch only here: the converters and `--help` start without them (seconds).
    import torch

    from iais_scale.data import image_fields, transforms
    from iais_scale.model import backbone as vision, backbone_source

    if batch_size < 1 or shard_size < 1:
        raise ValueError("--batch-size and --shard-size must be at least 1")
    if feature_dtype == "keep":
        feature_dtype = "float16"
    sources, src_manifest = _split_sources(images_from, split)
    fields = backbone_source.backbone_fields(backbone)
    params = {
        "backbone": backbone, "weights": weights if weights in ("pretrained", "random") else str(Path(weights).resolve()),
        "max_tokens": max_tokens or 0, "feature_dtype": feature_dtype, "shard_size": shard_size,
        "keep_images": keep_images, "source": str(Path(images_from).resolve()), "splits": sorted(sources),
        "transform": {k: fields[k] for k in ("image_size", "image_mean", "image_std", "image_resample", "image_crop_pct")},
    }
    out_path = Path(out_dir)
    old = previous_run(out_path, BACKBONE_GENERATOR, params, overwrite, out)
    if old is not None:
        return old
    out_path.mkdir(parents=True, exist_ok=True)
    clear_other_splits(out_path, sources, overwrite)

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        precision, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    config = SimpleNamespace(**fields, backbone_max_tokens=max_tokens or 0, backbone_trainable_blocks=0,
                             gradient_checkpointing_every=0)
    out(f"loading the backbone {backbone} ({weights if weights in ('pretrained', 'random') else 'weights from'}"
        f"{'' if weights in ('pretrained', 'random') else ' ' + weights})...")  # (a large one takes a while)
    model = vision.VisionBackbone(config)
    report = backbone_source.load_backbone_weights(model, backbone, weights)
    out(f"backbone {report}")
    model = model.to(dev, dtype).eval()
    transform = transforms.ImageTransform.from_backbone(config)
    out(f"transform: {transform.size} px, {transform.resample}, crop {transform.crop_pct}, mean {list(transform.mean)},"
        f" std {list(transform.std)}; {dev}, {dtype}")

    counts: dict[str, int] = {}
    skipped: dict[str, dict[str, int]] = {}
    total_images, t0 = 0, time.perf_counter()
    job = _Extraction(model, image_fields.PixelFields(transform), dev, params, int(fields["region_feature_dim"]), feature_dtype, batch_size,
                      shard_size, keep_images, overwrite)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for name, folder in sources.items():
            out(f"{name}: extracting features from {folder}...")
            n, items, images = job.split(name, folder, out_path / name, pool)
            counts[name], skipped[name] = n, issue_counts(items)
            total_images += images
            out(f"{name}: {n} samples ({len(items)} skipped)")
    # The source's tokenizer, fresh on every run: one left by an overwritten data set (or cut short by a
    # crash; the manifest is written after it) must not stay.
    shutil.rmtree(out_path / TOKENIZER_DIR, ignore_errors=True)
    if (Path(images_from) / TOKENIZER_DIR).is_dir():
        shutil.copytree(Path(images_from) / TOKENIZER_DIR, out_path / TOKENIZER_DIR)
    # The source's relational captions stay relational (no flips: see iais_scale.config); unknown stays unknown.
    extra: dict[str, Any] = {"source_generator": src_manifest.generator if src_manifest else None}
    if relation_data_reason(None, src_manifest) is not None:
        extra["relation_captions"] = True
    manifest = Manifest(splits=counts, feature_dim=int(fields["region_feature_dim"]), generator=BACKBONE_GENERATOR,
                        params=params, skipped={k: v for k, v in skipped.items() if v}, extra=extra)
    manifest.write(out_path)
    for name in sources:
        (out_path / name / PROGRESS_FILE).unlink(missing_ok=True)
    elapsed = time.perf_counter() - t0
    out(f"wrote {sum(counts.values())} samples to {out_path}: {total_images} images in {elapsed:.1f} s"
        f" ({total_images / max(elapsed, 1e-9):.1f} images/s)")
    return manifest.to_dict()


class _Extraction:
    """One ``extract_backbone_features`` run: the backbone, its transform, the output parameters. Each
    split is written by ``convert.write_split`` (resumable, issues logged per shard) from ``_load``."""

    def __init__(self, model, pixels, device, params: dict, dim: int, feature_dtype: str, batch_size: int,
                 shard_size: int, keep_images: bool, overwrite: bool) -> None:
        self.model, self.pixels, self.device, self.params, self.dim = model, pixels, device, params, dim
        self.transform = pixels.transform
        self.feature_dtype, self.batch_size, self.shard_size = feature_dtype, batch_size, shard_size
        self.keep_images, self.overwrite = keep_images, overwrite

    def split(self, name: str, folder: str, split_dir: Path, pool) -> tuple[int, list[dict[str, Any]], int]:
        """Extract one split (resuming after its last logged shard); returns (samples, issues, images run)."""
        shards = resolve_split(folder)
        header = {"generator": BACKBONE_GENERATOR, "params": self.params, "records": shards.total,
                  "digest": json.dumps(shards.sizes, sort_keys=True)}
        self.folder, self.name, self.images = folder, name, 0
        result = write_split(split_dir, range(shards.total), [], header, self.dim,
                             lambda todo: self._load(shards, todo, pool), shard_size=self.shard_size,
                             max_shard_bytes=None, overwrite=self.overwrite)
        return result.samples, result.issues, self.images

    def _load(self, shards, todo: range, pool):
        """A sample (``Loaded``) or an issue for every record of ``todo``, in order: images decoded on the
        pool, the backbone run over ``batch_size`` of them at a time."""
        entries: list[tuple] = []  # (index, sample, pixels, problem) decoded, awaiting the backbone
        records = self._records(shards, todo.start)
        while chunk := list(itertools.islice(records, self.batch_size)):
            entries += pool.map(self._decode, chunk)
            if sum(e[3] is None for e in entries) >= self.batch_size:
                yield from self._run(entries)
                entries = []
        yield from self._run(entries)

    def _records(self, shards, start: int):
        """(record index, raw sample or None) of a split from record ``start`` on, shard by shard; None
        for each record a damaged shard did not deliver, so every record is accounted for."""
        index = 0
        for url, size in shards.sizes.items():
            size = size or 0
            if index + size <= start:
                index += size
                continue
            expected = max(0, start - index)
            for raw in read_shard(url, start=expected, stop=size):  # records past its size are not its
                for missing in range(expected, raw["__index__"]):
                    yield index + missing, None
                yield raw["__index__"] + index, raw
                expected = raw["__index__"] + 1
            for missing in range(expected, size):
                yield index + missing, None
            index += size

    def _decode(self, item):
        index, raw = item
        where = f"{self.folder}#{index}"
        if raw is None:
            return index, None, None, issue("unreadable_image", None, where, "the shard ended or broke before it")
        try:
            sample = decode_sample(raw, self.pixels)
            return index, sample, self.transform.pixels(sample.image, key=sample.key), None
        except Exception as e:  # BadSample, BadImage
            kind = "missing_image" if getattr(e, "reason", "") == "missing_image" else "unreadable_image"
            return index, None, None, issue(kind, raw.get("__key__"), where, str(e)[:300])

    def _run(self, entries: list[tuple]):
        """The backbone over the decoded images of ``entries``; yields each entry's sample or issue, in order."""
        import torch

        decoded = [e for e in entries if e[3] is None]
        outputs, cells = [], None
        for i in range(0, len(decoded), self.batch_size):  # at most batch_size images per forward
            part = decoded[i : i + self.batch_size]
            px = torch.from_numpy(np.stack([e[2] for e in part])).permute(0, 3, 1, 2).contiguous().to(self.device)
            with torch.no_grad():
                out, cells = self.model(px)
            outputs += list(out.float().cpu().numpy())
            cells = cells.cpu().numpy().astype(np.float64)  # the grid's cells: the same for every image
            self.images += len(part)
        feats = iter(outputs)
        for index, sample, _, problem in entries:
            if problem is not None:
                yield problem
                continue
            feat = next(feats)
            box = self.transform.eval_box(sample.width, sample.height)
            pixel_boxes = _crop_geometry(cells, box, sample.width, sample.height)
            f = feat.astype(self.feature_dtype)
            if not np.isfinite(f).all():  # float16 overflow: this sample's features stay float32
                f = feat.astype(np.float32)
            meta = {**sample.meta, "split": self.name, "width": sample.width, "height": sample.height,
                    "image_id": sample.meta.get("image_id") or sample.image_id}
            meta.pop("img2dataset", None)
            where = f"{self.folder}#{index}"
            yield Loaded(meta, sample.image if self.keep_images else None, _image_ext(sample.image), f, pixel_boxes,
                         geometry=normalised_geometry(pixel_boxes, sample.width, sample.height), key=sample.key,
                         source=where, features_source=where)
