"""``data_tools uniter``: UNITER's released preprocessed data (``img_db`` + ``txt_db`` LMDBs) -> shards.

``--img-db img_db/flickr30k`` holds ``feat_th{conf}_max{max}_min{min}[_compressed]/`` (an LMDB, one
value per feature file name: ``np.savez_compressed`` arrays in the compressed variant, msgpack with
msgpack-numpy arrays otherwise) and ``nbb_th{conf}_max{max}_min{min}.json``. Each ``--txt-db
txt_db/itm_flickr30k_train.db`` is an LMDB of lz4-compressed msgpack examples (``input_ids``,
``img_fname``, the raw text when present) with ``meta.json`` (its tokenizer), ``txt2img.json``,
``img2txts.json`` and ``id2len.json``. One sample per image, with all its captions and their
``token_ids``, keyed ``{split}-{index:06d}``; regions as UNITER's loader sees them: the first
``nbb = clip(#(conf > conf_th), min_bb, max_bb)`` rows, fp16 -> fp32, geometry ``norm_bb`` + w*h.

Nothing is unpickled: npz members are read with ``allow_pickle=False`` and msgpack-numpy object
or structured arrays are refused (UNITER's own reader unpickles them). Values are size-capped
before they are expanded (``--max-array-mb``); a bad value is a counted skip, never a crash.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iais_scale.data.format import (
    FORMAT_NAME,
    TOKENIZER_DIR,
    Manifest,
    decode_npy,
    validate_regions,
)
from iais_scale.data.tokenizer import load_tokenizer

from .convert import (
    PROGRESS_FILE,
    SKIPPED_FILE,
    Loaded,
    SplitResult,
    clear_other_splits,
    counts,
    order_records,
    parse_bytes,
    previous_run,
    sort_splits,
    valid_split_name,
    write_split,
)

GENERATOR = "uniter"
# Bump when the same inputs and parameters would give different shards.
UNITER_CONVERTER_VERSION = 1

REASONS: dict[str, str] = {
    "missing_features": "sample skipped (its img_fname is not in the img_db)",
    "bad_features": "sample skipped (undecodable value, wrong shapes, NaN/inf, D unlike the other samples)",
    "unsafe_value": "sample skipped (object/structured arrays would need unpickling: refused)",
    "too_large": "sample or caption skipped (over --max-array-mb before expansion)",
    "missing_text": "caption dropped (listed in the json files but not in the txt_db LMDB)",
    "bad_text": "caption dropped (undecodable lz4/msgpack, no usable input_ids or img_fname)",
    "duplicate_text": "caption dropped (the same text id listed twice in one split)",
    "no_captions": "sample skipped",
    "no_image_size": "sample kept with width = height = 1 (no image file in --images)",
}
# Keys under which a txt_db example may hold its raw text, first present wins.
TEXT_KEYS = ("raw", "sentence", "caption", "sent", "text")
SPLIT_ALIASES = {"restval": "train"}  # UNITER fine-tunes on train + restval, like the Karpathy converter
MAX_NPZ_MEMBERS = 64
_NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_DTYPE_RE = re.compile(r"[<>|=]?[fiub][0-9]{1,2}")


class Refused(ValueError):
    """A value that is not decoded; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(detail)


# ---------------------------------------------------------------- safe decoding


def _get(obj: dict, name: str, default: Any = None) -> Any:
    """A msgpack-numpy field: keys are bytes (msgpack-numpy >= 0.4) or str (older writers)."""
    if name.encode() in obj:
        return obj[name.encode()]
    return obj.get(name, default)


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _numpy_hook(obj: dict) -> Any:
    """msgpack-numpy's array encoding -> a numeric array, without its ``pickle.loads`` path."""
    nd = _get(obj, "nd", None)
    if nd is None:
        return obj
    kind = _get(obj, "kind", b"")
    if kind not in (b"", ""):
        raise Refused("unsafe_value", f"msgpack-numpy array of kind {kind!r} (object or structured): not unpickled")
    descr = _get(obj, "type")
    if not isinstance(descr, (str, bytes)) or not _DTYPE_RE.fullmatch(_text(descr)):
        raise Refused("unsafe_value", f"msgpack-numpy dtype {descr!r}: only plain numeric arrays are read")
    dtype = np.dtype(_text(descr))
    data = _get(obj, "data")
    if not isinstance(data, bytes):
        raise ValueError("msgpack-numpy array without bytes data")
    if nd is not True:  # a numpy scalar
        if len(data) != dtype.itemsize:
            raise ValueError("msgpack-numpy scalar of the wrong size")
        return np.frombuffer(data, dtype)[0]
    shape = _get(obj, "shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"msgpack-numpy shape {shape!r}")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise ValueError(f"msgpack-numpy array {list(shape)} {dtype} needs {count * dtype.itemsize} bytes, has {len(data)}")
    return np.frombuffer(data, dtype, count).reshape(shape)


def unpack_msgpack(data: bytes, cap: int) -> Any:
    """msgpack bytes -> Python objects with msgpack-numpy arrays as read-only numeric arrays."""
    import msgpack

    if len(data) > cap:
        raise Refused("too_large", f"msgpack value of {len(data)} bytes > {cap}")
    return msgpack.unpackb(data, raw=False, object_hook=_numpy_hook, strict_map_key=False)


def decompress_lz4(data: bytes, cap: int) -> bytes:
    """An lz4 frame's content, refused past ``cap`` bytes before more is expanded."""
    import lz4.frame

    d = lz4.frame.LZ4FrameDecompressor()
    out = d.decompress(data, max_length=cap + 1)
    if len(out) > cap:
        raise Refused("too_large", f"lz4 frame expands beyond {cap} bytes")
    if not d.eof:
        raise ValueError("truncated lz4 frame")
    return out


def read_npz(data: bytes, cap: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Arrays ``names`` (those present) of an npz held in memory, ``allow_pickle=False``.

    The zip members' declared sizes are checked against ``cap`` (each and in total) before anything
    is decompressed, and no member is read past its declared size.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS:
            raise ValueError(f"npz with {len(infos)} members")
        total = sum(i.file_size for i in infos)
        if total > cap:
            raise Refused("too_large", f"npz members declare {total} bytes > {cap}")
        out = {}
        for info in infos:
            name = info.filename[:-4] if info.filename.endswith(".npy") else None
            if name not in names:
                continue
            with zf.open(info) as f:
                raw = f.read(info.file_size + 1)
            if len(raw) != info.file_size:
                raise ValueError(f"npz member {info.filename}: {len(raw)} bytes, {info.file_size} declared")
            out[name] = _load_npy(raw, info.filename)
    return out


def _load_npy(raw: bytes, where: str) -> np.ndarray:
    try:
        array = decode_npy(raw)
    except ValueError as e:  # an object array: decode_npy refuses to unpickle it
        raise Refused("unsafe_value", f"{where}: {e}") from None
    if array.dtype.kind not in "fiub":
        raise Refused("unsafe_value", f"{where}: dtype {array.dtype} refused (numbers only)")
    return array


def decode_image_value(data: bytes, cap: int) -> dict[str, np.ndarray]:
    """One img_db value (compressed npz or msgpack, told apart by their first bytes) -> arrays."""
    if len(data) > cap:
        raise Refused("too_large", f"value of {len(data)} bytes > {cap}")
    if data[:4] in _NPZ_MAGIC:
        return read_npz(data, cap, ("features", "norm_bb", "conf"))
    obj = unpack_msgpack(data, cap)
    if not isinstance(obj, dict):
        raise ValueError(f"msgpack value is a {type(obj).__name__}, not a dict of arrays")
    return {(_text(k) if isinstance(k, (bytes, str)) else repr(k)): v for k, v in obj.items()}


# ---------------------------------------------------------------- image db


def compute_num_bb(conf: np.ndarray, conf_th: float, min_bb: int, max_bb: int) -> int:
    """UNITER's box count: the boxes above ``conf_th``, at least ``min_bb``, at most ``max_bb``."""
    return int(min(max_bb, max(min_bb, int((conf > conf_th).sum()))))


@dataclass(frozen=True)
class BoxRule:
    conf_th: float = 0.2
    max_bb: int = 100
    min_bb: int = 10
    num_bb: int = 36  # conf_th == -1: a fixed number of boxes

    @property
    def suffix(self) -> str:
        return f"numbb{self.num_bb}" if self.conf_th == -1 else f"th{self.conf_th}_max{self.max_bb}_min{self.min_bb}"


def _is_lmdb(path: Path) -> bool:
    return (path / "data.mdb").is_file()


def locate_img_db(path: str | Path, rule: BoxRule) -> tuple[Path, dict[str, int] | None]:
    """(LMDB folder, {fname: nbb} or None) of an img_db set folder such as ``img_db/flickr30k``."""
    root = Path(path)
    if _is_lmdb(root):
        candidates, set_dir = [root], root.parent
    else:
        names = [f"feat_{rule.suffix}_compressed", f"feat_{rule.suffix}", "all_compressed", "all"]
        candidates, set_dir = [root / n for n in names], root
    db = next((c for c in candidates if _is_lmdb(c)), None)
    if db is None:
        raise FileNotFoundError(f"--img-db {root}: no LMDB among {', '.join(c.name for c in candidates)}")
    nbb = None
    # UNITER pairs feat_th* with nbb_th*.json; IAIS's reader also takes nbb.json beside an "all" LMDB.
    nbb_file = set_dir / (f"nbb_{rule.suffix}.json" if not db.name.startswith("all") else "nbb.json")
    if rule.conf_th != -1 and nbb_file.is_file():
        data = json.loads(nbb_file.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{nbb_file}: must map file names to box counts")
        nbb = {k: v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 1}
    return db, nbb


def _open_lmdb(path: Path):
    import lmdb

    # lock=False: a read-only data set folder must not need a lock file.
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, create=False, subdir=True, max_readers=8)


def image_regions(arrays: dict[str, Any], nbb: int | None, rule: BoxRule) -> tuple[np.ndarray, np.ndarray]:
    """(features [nbb, D] float32, geometry [nbb, 7]) as UNITER's ``_get_img_feat`` builds them."""
    feat, bb = arrays.get("features"), arrays.get("norm_bb")
    if not isinstance(feat, np.ndarray) or not isinstance(bb, np.ndarray):
        raise ValueError(f"needs arrays 'features' and 'norm_bb', has {sorted(arrays)}")
    if feat.ndim != 2 or bb.ndim != 2 or bb.shape[1] != 6 or feat.shape[0] != bb.shape[0] or feat.shape[0] < 1:
        raise ValueError(f"features {list(feat.shape)} / norm_bb {list(bb.shape)}: expected [n, D] and [n, 6]")
    if feat.dtype.kind != "f" or bb.dtype.kind != "f":
        raise ValueError(f"features {feat.dtype} / norm_bb {bb.dtype}: must be floating point")
    if rule.conf_th == -1:
        nbb = rule.num_bb
    elif nbb is None:
        conf = arrays.get("conf")
        if not isinstance(conf, np.ndarray) or conf.ndim != 1 or conf.shape[0] != feat.shape[0]:
            raise ValueError("no nbb json entry and no 'conf' [n] to count the boxes")
        nbb = compute_num_bb(conf, rule.conf_th, rule.min_bb, rule.max_bb)
    # UNITER slices [:nbb]: fewer stored rows simply give fewer regions.
    feat = feat[:nbb].astype(np.float32)
    bb = bb[:nbb].astype(np.float32)
    geometry = np.concatenate([bb, bb[:, 4:5] * bb[:, 5:]], axis=1)
    return feat, geometry


# ---------------------------------------------------------------- text db


@dataclass
class Text:
    txt_id: str
    img_fname: str
    ids: list[int]
    text: str | None
    source: str


@dataclass
class TxtDb:
    path: Path
    split: str
    meta: dict[str, Any]
    texts: list[Text] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)


def split_of_txt_db(path: Path) -> str:
    """``itm_flickr30k_train.db`` -> ``train`` (``restval`` joins ``train``)."""
    name = path.name[:-3] if path.name.endswith(".db") else path.name
    split = name.rsplit("_", 1)[-1]
    return SPLIT_ALIASES.get(split, split)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _issue(reason: str, image_id: str | None, where: str, detail: str = "") -> dict[str, Any]:
    assert reason in REASONS, reason
    return {"reason": reason, "image_id": image_id, "input": where, "detail": detail}


def _token_ids(value: Any) -> list[int] | None:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in value):
        return None
    return list(value)


def read_txt_db(path: str | Path, split: str | None, cap: int) -> TxtDb:
    """Every example of one txt_db, in ``img2txts.json`` order (else ``txt2img.json``, ``id2len.json``)."""
    path = Path(path)
    if not _is_lmdb(path):
        raise FileNotFoundError(f"--txt-db {path}: not an LMDB folder (no data.mdb)")
    meta = _load_json(path / "meta.json")
    db = TxtDb(path, split or split_of_txt_db(path), meta if isinstance(meta, dict) else {})
    txt2img = _load_json(path / "txt2img.json")
    txt2img = txt2img if isinstance(txt2img, dict) else {}
    img2txts = _load_json(path / "img2txts.json")
    if isinstance(img2txts, dict):
        order = [str(t) for ids in img2txts.values() if isinstance(ids, list) for t in ids]
    elif txt2img:
        order = [str(t) for t in txt2img]
    else:
        id2len = _load_json(path / "id2len.json")
        order = [str(t) for t in id2len] if isinstance(id2len, dict) else []
    env = _open_lmdb(path)
    try:
        with env.begin(buffers=False) as txn:
            if not order:
                order = [k.decode("utf-8", "replace") for k, _ in txn.cursor() if not k.startswith(b"__")]
            for txt_id in order:
                where = f"{path.name}:{txt_id}"
                value = txn.get(txt_id.encode("utf-8"))
                if value is None:
                    db.issues.append(_issue("missing_text", None, where, "id not in the LMDB"))
                    continue
                try:
                    example = unpack_msgpack(decompress_lz4(value, cap), cap)
                    if not isinstance(example, dict):
                        raise ValueError(f"example is a {type(example).__name__}, not a dict")
                    ids = _token_ids(example.get("input_ids"))
                    if ids is None:
                        raise ValueError("no input_ids (a non-empty list of token ids)")
                    img = example.get("img_fname", txt2img.get(txt_id))
                    if not isinstance(img, str) or not img:
                        raise ValueError(f"img_fname {img!r}")
                except Refused as e:
                    db.issues.append(_issue(e.reason, None, where, str(e)))
                    continue
                except Exception as e:  # lz4, msgpack and our checks raise many types
                    db.issues.append(_issue("bad_text", None, where, f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                text = next((example[k] for k in TEXT_KEYS if isinstance(example.get(k), str) and example[k].strip()),
                            None)
                db.texts.append(Text(txt_id, img, ids, text.strip() if text else None, where))
    finally:
        env.close()
    return db


def tokenizer_info(meta: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of a txt_db's tokenizer (UNITER's ``meta.json``)."""
    v_range = meta.get("v_range")
    info = {
        "name": meta.get("toker") or meta.get("tokenizer") or meta.get("bert"),
        "vocab_size": v_range[1] if isinstance(v_range, (list, tuple)) and len(v_range) == 2 else None,
    }
    for ours, theirs in (("cls_id", "CLS"), ("sep_id", "SEP"), ("mask_id", "MASK"), ("unk_id", "UNK")):
        info[ours] = meta.get(theirs)
    return info


def placeholder_text(ids: list[int]) -> str:
    """The caption text of ids without raw text and no local tokenizer to decode them."""
    return "[token ids] " + " ".join(str(t) for t in ids)


# ---------------------------------------------------------------- collecting


@dataclass
class Entry:
    """One image of a split: its img_db key and its captions (text, ids, txt_db id)."""

    image_id: str
    img_fname: str
    captions: list[str]
    token_ids: list[list[int]]
    txt_ids: list[str]
    size: tuple[int, int] | None = None


def _image_id(img_fname: str) -> str:
    stem = img_fname[:-4] if img_fname.endswith(".npz") else img_fname
    return stem.replace("/", "_")


def _index_images(folder: str | Path | None) -> dict[str, Path]:
    """Image files under ``folder`` by stem and by numeric id (trailing digits, leading zeros dropped)."""
    if folder is None:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root}: not a directory")
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and p.is_file():
            out.setdefault(p.stem, p)
            m = re.search(r"(\d+)$", p.stem)
            if m:
                out.setdefault(m.group(1).lstrip("0") or "0", p)
    return out


def _image_size(index: dict[str, Path], image_id: str) -> tuple[int, int] | None:
    m = re.search(r"(\d+)$", image_id)
    path = index.get(image_id) or (index.get(m.group(1).lstrip("0") or "0") if m else None)
    if path is None:
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # an unreadable image is as good as none: the size stays unknown
        return None


def collect(txt_dbs: list[TxtDb], decode: Callable[[list[int]], str] | None) -> tuple[
        dict[str, list[Entry]], dict[str, list[dict[str, Any]]]]:
    """Entries per split (one per image, captions in txt_db order) and the text problems per split."""
    splits: dict[str, dict[str, Entry]] = {}
    issues: dict[str, list[dict[str, Any]]] = {}
    seen: dict[str, set[str]] = {}
    for db in txt_dbs:
        entries = splits.setdefault(db.split, {})
        notes = issues.setdefault(db.split, [])
        notes.extend(db.issues)
        for t in db.texts:
            if t.txt_id in seen.setdefault(db.split, set()):
                notes.append(_issue("duplicate_text", _image_id(t.img_fname), t.source, "text id already read"))
                continue
            seen[db.split].add(t.txt_id)
            e = entries.get(t.img_fname)
            if e is None:
                e = entries[t.img_fname] = Entry(_image_id(t.img_fname), t.img_fname, [], [], [])
            text = t.text if t.text is not None else (decode(t.ids) if decode else None)
            e.captions.append(text.strip() if text and text.strip() else placeholder_text(t.ids))
            e.token_ids.append(t.ids)
            e.txt_ids.append(t.txt_id)
    return {s: list(v.values()) for s, v in splits.items()}, issues


def _digest(entries: list[Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps([e.image_id, e.img_fname, e.captions, e.token_ids, e.txt_ids, e.size]).encode())
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- writing


@dataclass
class Options:
    rule: BoxRule
    cap: int
    feature_dtype: str = "float32"
    shard_size: int = 1000
    max_shard_bytes: int | None = None


def load_entry(txn: Any, nbb: dict[str, int] | None, entry: Entry, opts: Options, where: str, split: str,
               want_size: bool) -> Loaded | dict[str, Any]:
    """One image's sample (features, geometry, its captions and token ids), or the issue that skips it."""
    src = f"{where}:{entry.img_fname}"
    value = txn.get(entry.img_fname.encode("utf-8"))
    if value is None:
        return _issue("missing_features", entry.image_id, src, "no such key in the img_db")
    try:
        arrays = decode_image_value(bytes(value), opts.cap)
        n = None if nbb is None else nbb.get(entry.img_fname)
        feat, geometry = image_regions(arrays, n, opts.rule)
        if opts.feature_dtype == "float16":
            feat = feat.astype(np.float16)
        validate_regions(feat, None, 1, 1, geometry)
    except Refused as e:
        return _issue(e.reason, entry.image_id, src, str(e))
    except Exception as e:  # zipfile, numpy, msgpack and our checks raise many types
        return _issue("bad_features", entry.image_id, src, f"{type(e).__name__}: {str(e)[:200]}")
    width, height = entry.size or (1, 1)  # sizes only from --images; geometry is already normalised
    meta = {"image_id": entry.image_id, "split": split, "width": width, "height": height,
            "captions": entry.captions, "token_ids": entry.token_ids,
            "uniter": {"img_fname": entry.img_fname, "txt_ids": entry.txt_ids}}
    notes = [_issue("no_image_size", entry.image_id, entry.img_fname)] if want_size and entry.size is None else []
    return Loaded(meta, None, "png", feat, None, notes, geometry=geometry, source=src, features_source=src)


def _load_tokenizer(path: str | Path | None, info: dict[str, Any]):
    """A local tokenizer folder, checked against the txt_db's ``meta.json`` ([CLS]/[SEP] ids, vocab)."""
    if path is None:
        return None
    tok = load_tokenizer(path)
    problems = []
    if info.get("vocab_size") is not None and len(tok) != info["vocab_size"]:
        problems.append(f"{len(tok)} tokens, the txt_db's tokenizer has {info['vocab_size']}")
    for name, ours in (("cls_id", tok.cls_token_id), ("sep_id", tok.sep_token_id)):
        if info.get(name) is not None and ours != info[name]:
            problems.append(f"{name} {ours} != {info[name]} in meta.json")
    if problems:
        raise ValueError(f"--tokenizer {path}: not the txt_db's tokenizer ({'; '.join(problems)})")
    return tok


def convert(
    img_db: str | Path, txt_dbs: list[str | Path], out_dir: str | Path, *, split: str | None = None,
    rule: BoxRule = BoxRule(), tokenizer: str | Path | None = None, images: str | Path | None = None,
    max_array_mb: int = 512, feature_dtype: str = "float32", seed: int = 0, shard_size: int = 1000,
    max_shard_bytes: int | None = None, overwrite: bool = False, out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert UNITER's img_db + txt_dbs into a data set in ``out_dir``; returns the manifest dict."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if max_array_mb < 1:
        raise ValueError(f"--max-array-mb must be >= 1, got {max_array_mb}")
    if split is not None and not valid_split_name(split):
        raise ValueError(f"--split {split!r}: use letters, digits, '-' and '_'")
    out_path = Path(out_dir)
    absolute = lambda p: None if p is None else str(Path(p).resolve())  # noqa: E731
    params = {
        "img_db": absolute(img_db), "txt_dbs": [absolute(t) for t in txt_dbs], "split": split,
        "conf_th": rule.conf_th, "max_bb": rule.max_bb, "min_bb": rule.min_bb, "num_bb": rule.num_bb,
        "tokenizer": absolute(tokenizer), "images": absolute(images), "max_array_mb": max_array_mb,
        "feature_dtype": feature_dtype, "seed": seed, "shard_size": shard_size, "max_shard_bytes": max_shard_bytes,
        "version": UNITER_CONVERTER_VERSION,
    }
    old = previous_run(out_path, GENERATOR, params, overwrite, out)
    if old is not None:
        return old

    cap = max_array_mb << 20
    db_path, nbb = locate_img_db(img_db, rule)
    dbs = [read_txt_db(t, split, cap) for t in txt_dbs]
    infos = [tokenizer_info(db.meta) for db in dbs]
    if any(i != infos[0] for i in infos[1:]):
        raise ValueError(f"the txt_dbs name different tokenizers: {infos}")
    info = infos[0] if infos else {}
    tok = _load_tokenizer(tokenizer, info)
    decode = (lambda ids: tok.decode(ids, clean_up_tokenization_spaces=True)) if tok is not None else None
    entries, text_issues = collect(dbs, decode)
    bad = [s for s in entries if not valid_split_name(s)]
    if bad:
        raise ValueError(f"split name(s) {bad} from the txt_db names are not [A-Za-z0-9_-]; pass --split NAME")
    image_index = _index_images(images)
    if image_index:
        for split_entries in entries.values():
            for e in split_entries:
                e.size = _image_size(image_index, e.image_id)

    out_path.mkdir(parents=True, exist_ok=True)
    splits = sort_splits(entries)
    clear_other_splits(out_path, splits, overwrite)
    opts = Options(rule, cap, feature_dtype, shard_size, max_shard_bytes)
    results: dict[str, SplitResult] = {}
    feature_dim: int | None = None
    env = _open_lmdb(db_path)
    try:
        with env.begin(buffers=True) as txn:
            for name in splits:
                ordered = order_records(entries[name], seed, name)
                header = {"generator": GENERATOR, "params": params, "records": len(ordered), "digest": _digest(ordered)}
                read = functools.partial(load_entry, txn, nbb, opts=opts, where=db_path.name, split=name,
                                         want_size=images is not None)
                result = write_split(out_path / name, ordered, text_issues.get(name, []), header, feature_dim,
                                     functools.partial(map, read), shard_size=opts.shard_size,
                                     max_shard_bytes=opts.max_shard_bytes, overwrite=overwrite, log=out,
                                     reasons=REASONS)
                feature_dim = result.feature_dim if result.feature_dim is not None else feature_dim
                results[name] = result
    finally:
        env.close()

    if tok is not None:
        tok_dir = out_path / TOKENIZER_DIR
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        tok.save_pretrained(str(tok_dir))
    manifest = Manifest(
        splits={s: r.samples for s, r in results.items()}, feature_dim=feature_dim, generator=GENERATOR,
        params=params, skipped={s: counts(r.issues, REASONS) for s, r in results.items()},
        extra={"tokenizer": {**info, "files": TOKENIZER_DIR if tok is not None else None}},
    )
    assert manifest.format == FORMAT_NAME
    manifest.write(out_path)
    for name in splits:
        (out_path / name / PROGRESS_FILE).unlink(missing_ok=True)
    _summary(out_path, results, out)
    return manifest.to_dict()


def _summary(out_path: Path, results: dict[str, SplitResult], out: Callable[[str], None]) -> None:
    for name, r in results.items():
        note = f", {len(r.issues)} problem(s)" if r.issues else ""
        out(f"{name}: {r.samples} samples in {r.shards} shard(s){note}")
        for reason, n in counts(r.issues, REASONS).items():
            out(f"  {reason}: {n} ({REASONS[reason]})")
        for i in r.issues[:5]:
            out(f"    {i['reason']} {i['image_id']} {i['input']}" + (f": {i['detail']}" if i["detail"] else ""))
        if r.issues:
            out(f"    (all listed in {out_path / name / SKIPPED_FILE})")
    out(f"wrote {sum(r.samples for r in results.values())} samples to {out_path}")


# ---------------------------------------------------------------- command line


def add_parser(sub: Any) -> None:
    p = sub.add_parser("uniter", help="convert UNITER's released img_db + txt_db (LMDB) data",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-db", required=True, help="img_db set folder (img_db/flickr30k) or one LMDB folder in it")
    p.add_argument("--txt-db", required=True, action="append", help="txt_db folder (itm_flickr30k_test.db); repeatable")
    p.add_argument("--out", required=True, help="output data set folder")
    p.add_argument("--split", help="put every --txt-db into this split (default: from each name; restval -> train)")
    p.add_argument("--conf-th", type=float, default=0.2, help="box confidence threshold (-1: fixed --num-bb)")
    p.add_argument("--max-bb", type=int, default=100)
    p.add_argument("--min-bb", type=int, default=10)
    p.add_argument("--num-bb", type=int, default=36, help="boxes per image when --conf-th -1")
    p.add_argument("--tokenizer", metavar="DIR", help="local folder of the txt_db's tokenizer (bert-base-cased):"
                   " copied to OUT/tokenizer and used to decode captions stored without raw text")
    p.add_argument("--images", metavar="DIR", help="image files, only to record each sample's width/height")
    p.add_argument("--max-array-mb", type=int, default=512, help="refuse values expanding beyond this (default 512)")
    p.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32",
                   help="stored feature dtype (UNITER's loader sees float32; float16 halves the disk, losslessly"
                        " for its fp16 img_db)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--max-shard-bytes", type=parse_bytes, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rule = BoxRule(args.conf_th, args.max_bb, args.min_bb, args.num_bb)
    convert(args.img_db, args.txt_db, args.out, split=args.split, rule=rule, tokenizer=args.tokenizer,
            images=args.images, max_array_mb=args.max_array_mb, feature_dtype=args.feature_dtype, seed=args.seed,
            shard_size=args.shard_size, max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite)
    return 0
