"""The shard writer, the demo data generator and its tokenizer."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from iais_scale.data.demo import COLOURS, FEATURE_DIM, SHAPES, SIZES, SPLITS, make_demo
from iais_scale.data.format import (
    FORMAT_NAME,
    ShardWriter,
    decode_npy,
    read_sizes,
    sample_key,
    validate_sample,
)

SMALL = dict(n_train=40, n_val=12, n_test=12, n_swap_groups=6, shard_size=16)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "demo", seed=3, **SMALL)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_split(split_dir: Path) -> list[dict[str, Any]]:
    """All samples of a split as {"meta", "image", "feat", "boxes"} in shard order."""
    samples: dict[str, dict[str, Any]] = {}
    for name in read_sizes(split_dir):
        with tarfile.open(split_dir / name) as tf:
            for info in tf:
                key, ext = info.name.split(".", 1)
                f = tf.extractfile(info)
                assert f is not None
                data = f.read()
                s = samples.setdefault(key, {})
                if ext == "json":
                    s["meta"] = json.loads(data)
                elif ext == "png":
                    s["image"] = Image.open(io.BytesIO(data)).convert("RGB")
                else:
                    s[ext.split(".")[0]] = decode_npy(data)
    return list(samples.values())


def _decode_regions(sample: dict[str, Any]) -> dict[tuple[str, str, str], np.ndarray]:
    """Map (size, colour, shape) -> box for the object regions, read back from the features."""
    colours, sizes = list(COLOURS), list(SIZES)
    objects = {}
    for row, box in zip(sample["feat"].astype(np.float32), sample["boxes"], strict=True):
        c, sh, sz = int(row[:6].argmax()), int(row[6:10].argmax()), int(row[10:12].argmax())
        template = np.zeros(FEATURE_DIM, dtype=np.float32)
        template[[c, 6 + sh, 10 + sz]] = 1.0
        # Objects sit ~0.4 (noise 0.1 in 16 dims) from their one-hot template,
        # distractors (noise 0.3) ~2 or more; 0.6 separates them with a wide margin.
        if float(((row - template) ** 2).sum()) < 0.6:
            objects[(sizes[sz], colours[c], SHAPES[sh])] = box
    return objects


def _holds(caption: str, objects: dict[tuple[str, str, str], np.ndarray]) -> bool:
    """Is ``a S C SH REL a S C SH`` true of the objects (by their pixel boxes)?"""
    words = caption.split()
    a, b = tuple(words[1:4]), tuple(words[-3:])
    rel = " ".join(words[4:-4])
    if a not in objects or b not in objects:
        return False
    ax1, ay1, ax2, ay2 = objects[a]
    bx1, by1, bx2, by2 = objects[b]
    return {
        "left of": ax2 <= bx1,
        "right of": bx2 <= ax1,
        "above": ay2 <= by1,
        "below": by2 <= ay1,
    }[rel]


# ---------------------------------------------------------------- ShardWriter


def _meta(split: str, i: int, **extra: Any) -> dict[str, Any]:
    return {"image_id": f"img{i}", "split": split, "width": 32, "height": 32, "captions": [f"caption {i}"], **extra}


def _write(out: Path, n: int, **kwargs: Any) -> dict[str, int]:
    rng = np.random.default_rng(0)
    with ShardWriter(out, **kwargs) as w:
        for i in range(n):
            feat = rng.normal(size=(3, 8)).astype(np.float16)
            boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 30], [1, 2, 3, 4]], dtype=np.float32)
            w.write(sample_key(out.name, i), _meta(out.name, i), feat=feat, boxes=boxes)
    return read_sizes(out)


def test_writer_rollover_sizes_and_no_tmp(tmp_path: Path) -> None:
    sizes = _write(tmp_path / "train", 7, shard_size=3)
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    names = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert names == [*sizes, "sizes.json"]  # no .tmp left behind
    with tarfile.open(tmp_path / "train" / "shard-000001.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members[:3]] == ["train-000003.boxes.npy", "train-000003.feat.npy", "train-000003.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_writer_byte_limit_rollover(tmp_path: Path) -> None:
    # Each sample is 3 members of one data block each: 3 * 1024 bytes.
    sizes = _write(tmp_path / "val", 5, shard_size=100, max_shard_bytes=2 * 3 * 1024)
    assert list(sizes.values()) == [2, 2, 1]


def test_writer_is_deterministic(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "train", 5, shard_size=2)
    _write(tmp_path / "b" / "train", 5, shard_size=2)
    assert _file_hashes(tmp_path / "a") == _file_hashes(tmp_path / "b")


def test_writer_abort_on_error_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "train"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(out, shard_size=2) as w:
            for i in range(3):
                w.write(sample_key("train", i), _meta("train", i), image=b"\x89PNG fake")
            raise RuntimeError("boom")
    # The complete first shard stays, the unfinished one and sizes.json do not exist.
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    with pytest.raises(FileExistsError):
        ShardWriter(out)
    assert _write(out, 1, overwrite=True) == {"shard-000000.tar": 1}


def test_writer_rejects_bad_samples(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "train")
    feat = np.zeros((2, 4), dtype=np.float32)
    boxes = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="split"):
        w.write("k0", _meta("val", 0))
    with pytest.raises(ValueError, match="key"):
        w.write("bad.key", _meta("train", 0))
    with pytest.raises(ValueError, match="NaN"):
        w.write("k0", _meta("train", 0), feat=np.full((2, 4), np.nan, dtype=np.float32), boxes=boxes)
    with pytest.raises(ValueError, match="boxes"):
        w.write("k0", _meta("train", 0), feat=feat, boxes=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="feat needs boxes, geometry or both"):
        w.write("k0", _meta("train", 0), feat=feat)
    w.write("k0", _meta("train", 0), feat=feat, boxes=boxes)
    with pytest.raises(ValueError, match="twice"):
        w.write("k0", _meta("train", 0), feat=feat, boxes=boxes)
    assert w.close() == {"shard-000000.tar": 1}


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"captions": []}, "captions"),
        ({"captions": ["ok", "  "]}, "captions[1]"),
        ({"width": 0}, "width"),
        ({"height": True}, "height"),
        ({"image_id": 3}, "image_id"),
        ({"swap": {"group": 0, "index": 2}}, "swap.index"),
        ({"phrases": "x"}, "phrases"),
    ],
)
def test_validate_sample_names_the_key(change: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name.replace('[', '.').replace(']', '.')}"):
        validate_sample({**_meta("train", 0), **change})
    meta = _meta("train", 0)
    del meta["split"]
    with pytest.raises(ValueError, match="^split: missing"):
        validate_sample(meta)


# ---------------------------------------------------------------- demo data


def test_demo_layout_and_manifest(demo_dir: Path) -> None:
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_NAME
    assert manifest["feature_dim"] == FEATURE_DIM
    assert manifest["generator"] == "demo"
    assert manifest["params"]["seed"] == 3
    assert manifest["splits"] == {"train": 40, "val": 12, "test": 12, "swap": 12}
    for split in SPLITS:
        sizes = read_sizes(demo_dir / split)
        assert sum(sizes.values()) == manifest["splits"][split]
        assert all(n <= SMALL["shard_size"] for n in sizes.values())
    assert list(read_sizes(demo_dir / "train").values()) == [16, 16, 8]


def test_demo_samples_are_consistent(demo_dir: Path) -> None:
    for split in ("train", "val", "test"):
        samples = _read_split(demo_dir / split)
        for i, s in enumerate(samples):
            meta = s["meta"]
            validate_sample(meta)
            assert meta["image_id"] == f"demo-{split}-{i:06d}"
            assert (meta["width"], meta["height"]) == s["image"].size == (64, 64)
            assert len(meta["captions"]) == 2 and meta["captions"][0] != meta["captions"][1]
            assert s["feat"].dtype == np.float16 and s["feat"].shape[1] == FEATURE_DIM
            assert s["boxes"].dtype == np.float32 and s["boxes"].shape == (s["feat"].shape[0], 4)
            objects = _decode_regions(s)
            assert 2 <= len(objects) <= 4 and 1 <= s["feat"].shape[0] - len(objects) <= 2
            for caption in meta["captions"]:
                assert _holds(caption, objects), caption
            for (_size, colour, _shape), box in objects.items():
                cx, cy = int((box[0] + box[2] - 1) / 2), int((box[1] + box[3] - 1) / 2)
                assert s["image"].getpixel((cx, cy)) == COLOURS[colour]
        if split != "train":
            # Evaluation captions are true of their own image only.
            for i, s in enumerate(samples):
                for j, other in enumerate(samples):
                    if i != j:
                        objects = _decode_regions(other)
                        assert not any(_holds(c, objects) for c in s["meta"]["captions"])


def test_demo_swap_pairs(demo_dir: Path) -> None:
    samples = _read_split(demo_dir / "swap")
    assert len(samples) == 2 * SMALL["n_swap_groups"]
    for g in range(SMALL["n_swap_groups"]):
        s0, s1 = samples[2 * g], samples[2 * g + 1]
        assert s0["meta"]["swap"] == {"group": g, "index": 0} and s1["meta"]["swap"] == {"group": g, "index": 1}
        (c0,), (c1,) = s0["meta"]["captions"], s1["meta"]["captions"]
        w0, w1 = c0.split(), c1.split()
        assert w0[1:4] == w1[-3:] and w0[-3:] == w1[1:4] and w0[4:-4] == w1[4:-4]  # argument order only
        o0, o1 = _decode_regions(s0), _decode_regions(s1)
        assert _holds(c0, o0) and _holds(c1, o1) and not _holds(c0, o1) and not _holds(c1, o0)
        # Same region features, only geometry and order differ.
        assert sorted(map(bytes, s0["feat"])) == sorted(map(bytes, s1["feat"]))


def test_demo_is_deterministic(tmp_path: Path, demo_dir: Path) -> None:
    again = make_demo(tmp_path / "again", seed=3, **SMALL)
    assert _file_hashes(again) == _file_hashes(demo_dir)
    other = make_demo(tmp_path / "other", seed=4, **SMALL)
    h_other = _file_hashes(other)
    assert all(h_other[k] != v for k, v in _file_hashes(demo_dir).items() if k.endswith(".tar"))


def test_demo_is_idempotent(tmp_path: Path) -> None:
    small = {**SMALL, "n_train": 10, "n_val": 2, "n_test": 2, "n_swap_groups": 1}
    out = make_demo(tmp_path / "d", **small)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert make_demo(out, **small) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        make_demo(out, **{**small, "n_train": 12})
    make_demo(out, overwrite=True, **{**small, "n_train": 12})
    assert read_sizes(out / "train") == {"shard-000000.tar": 12}
    # No manifest = an interrupted run: regenerated without asking.
    (out / "manifest.json").unlink()
    (out / "val" / "shard-000000.tar.tmp").write_bytes(b"partial")
    make_demo(out, **small)
    assert not (out / "val" / "shard-000000.tar.tmp").exists()
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"] == 10


def test_tokenizer_loads_with_autotokenizer(demo_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir / "tokenizer", local_files_only=True)
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    captions = _read_split(demo_dir / "val")[0]["meta"]["captions"]
    enc = tok(captions, padding=True)
    assert set(enc) >= {"input_ids", "attention_mask", "token_type_ids"}
    ids = enc["input_ids"][0]
    assert ids[0] == tok.cls_token_id and tok.sep_token_id in ids and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == captions[0]
    assert tok.convert_ids_to_tokens(tok("A Small RED circle")["input_ids"])[1:-1] == ["a", "small", "red", "circle"]
