"""``data_tools uniter``: miniature img_db / txt_db folders in UNITER's exact layout, written with the real
lmdb, msgpack, msgpack-numpy and lz4 packages, converted and read back through read_split + the Collator;
hostile values (object arrays, npz bombs, broken lz4/msgpack) are counted skips and never unpickled."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from data_tools import uniter
from data_tools.__main__ import main
from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import RegionFields
from iais_scale.data.retrieval import RetrievalSet, read_split
from iais_scale.data.tokenizer import train_wordpiece

lmdb = pytest.importorskip("lmdb")
msgpack = pytest.importorskip("msgpack")
msgpack_numpy = pytest.importorskip("msgpack_numpy")
lz4_frame = pytest.importorskip("lz4.frame")

D = 8
CONF_TH, MAX_BB, MIN_BB = 0.2, 5, 2
TEXTS = {
    "train": {
        "flickr30k_000000001000.npz": ["A man rides a red bike .", "Someone on a bicycle"],
        "flickr30k_000000001001.npz": ["Two dogs play in the snow ."],
    },
    "test": {
        "flickr30k_000000001002.npz": ["A woman reads a book in the park .", "A person reading outdoors ."],
        "flickr30k_000000001003.npz": ["Children run on the beach ."],
        "flickr30k_000000001004.npz": ["A cat sleeps ."],  # its img_db value is hostile (see the fixture)
    },
}
# conf > 0.2 counts per image: 3 (kept), 1 (raised to MIN_BB), 7 (cut to MAX_BB), 4, 2.
N_CONFIDENT = {"1000": 3, "1001": 1, "1002": 7, "1003": 4, "1004": 2}


class Payload:
    """Unpickling this object creates the file ``path`` (what a malicious img_db value would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def butd(stem: str, seed: int) -> dict[str, np.ndarray]:
    """A bottom-up-attention npz as UNITER's convert_imgdir.py reads it: 10 boxes, float32."""
    rng = np.random.default_rng(seed)
    n = 10
    conf = np.concatenate([rng.uniform(0.5, 1.0, N_CONFIDENT[stem]), rng.uniform(0.0, 0.15, n - N_CONFIDENT[stem])])
    xy = rng.uniform(0, 0.5, (n, 2))
    wh = rng.uniform(0.05, 0.5, (n, 2))
    norm_bb = np.concatenate([xy, xy + wh, wh], 1)
    return {"features": rng.normal(size=(n, D)).astype(np.float32), "norm_bb": norm_bb.astype(np.float32),
            "conf": conf.astype(np.float32), "soft_labels": rng.uniform(size=(n, 4)).astype(np.float32)}


def uniter_dump(arrays: dict[str, np.ndarray], nbb: int | None) -> dict[str, np.ndarray]:
    """convert_imgdir.py's load_npz: float32 -> float16, rows cut to nbb (None: keep all)."""
    return {k: (a.astype(np.float16) if a.dtype == np.float32 else a)[:nbb] for k, a in arrays.items()}


def expected_regions(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What UNITER's DetectFeatLmdb + _get_img_feat give: fp16 values as fp32, nbb rows, norm_bb + w*h."""
    nbb = uniter.compute_num_bb(arrays["conf"].astype(np.float16), CONF_TH, MIN_BB, MAX_BB)
    feat = arrays["features"].astype(np.float16)[:nbb].astype(np.float32)
    bb = torch.tensor(arrays["norm_bb"].astype(np.float16)[:nbb]).float()
    return feat, torch.cat([bb, bb[:, 4:5] * bb[:, 5:]], dim=-1).numpy()


def npz_bytes(dump: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **dump)
    return buf.getvalue()


def lying_npz(declared: int) -> bytes:
    """A small npz whose zip directory declares ``features.npy`` to expand to ``declared`` bytes."""
    data = bytearray(npz_bytes({"features": np.zeros((2, D), np.float16), "norm_bb": np.zeros((2, 6), np.float16)}))
    for sig, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(sig)
        struct.pack_into("<I", data, at + size_at, declared)
    return bytes(data)


def write_lmdb(path: Path, items: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)
    env.close()


def uniter_ids(tok, text: str) -> list[int]:
    """prepro.py's bert_tokenize: word by word, ids without [CLS]/[SEP]."""
    ids = []
    for word in text.strip().split():
        ids += tok(word, add_special_tokens=False)["input_ids"]
    return ids


@pytest.fixture(scope="module")
def tokenizer(tiny_demo):
    return AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))


@pytest.fixture(scope="module")
def uniter_data(tmp_path_factory, tokenizer) -> dict:
    """img_db (compressed npz with nbb json, msgpack 'all' without) and txt_dbs for train and test."""
    root = tmp_path_factory.mktemp("uniter")
    arrays = {f: butd(f[-8:-4], i) for i, f in enumerate(sorted(k for t in TEXTS.values() for k in t))}
    suffix = f"th{CONF_TH}_max{MAX_BB}_min{MIN_BB}"
    markers = {"converter": root / "PWNED_by_converter", "control": root / "PWNED_control"}

    def object_array_value(marker: Path) -> bytes:
        dump = uniter_dump(arrays["flickr30k_000000001004.npz"], None)
        dump["features"] = np.array([Payload(marker)], dtype=object)
        return msgpack.dumps(dump, default=msgpack_numpy.encode, use_bin_type=True)

    # Compressed variant: values already cut to nbb, as convert_imgdir.py --compress writes them.
    comp = root / "img_db_npz" / "flickr30k"
    comp.mkdir(parents=True)
    nbb = {f: uniter.compute_num_bb(a["conf"].astype(np.float16), CONF_TH, MIN_BB, MAX_BB) for f, a in arrays.items()}
    values = {f.encode(): npz_bytes(uniter_dump(a, nbb[f])) for f, a in arrays.items()}
    values[b"flickr30k_000000001004.npz"] = lying_npz(0x7FFF0000)  # a 2 GiB "bomb" by its declared size
    values[b"__keys__"] = json.dumps(list(arrays)).encode()
    write_lmdb(comp / f"feat_{suffix}_compressed", values)
    (comp / f"nbb_{suffix}.json").write_text(json.dumps(nbb))

    # msgpack variant, all boxes kept ("all": no nbb json, UNITER counts the boxes from conf).
    pack = root / "img_db_msgpack" / "flickr30k"
    pack.mkdir(parents=True)
    values = {f.encode(): msgpack.dumps(uniter_dump(a, None), default=msgpack_numpy.encode, use_bin_type=True)
              for f, a in arrays.items()}
    values[b"flickr30k_000000001004.npz"] = object_array_value(markers["converter"])
    values[b"__keys__"] = json.dumps(list(arrays)).encode()
    write_lmdb(pack / "all", values)

    # The control: msgpack-numpy (what UNITER's reader uses) does run the payload.
    msgpack_numpy.unpackb(object_array_value(markers["control"]), raw=False)
    assert markers["control"].exists()
    markers["control"].unlink()

    txt = root / "txt_db"
    meta = {"toker": "demo-wordpiece", "UNK": tokenizer.unk_token_id, "CLS": tokenizer.cls_token_id,
            "SEP": tokenizer.sep_token_id, "MASK": tokenizer.mask_token_id, "v_range": [5, len(tokenizer)]}
    ids: dict[str, list[int]] = {}
    for split, images in TEXTS.items():
        db = txt / f"itm_flickr30k_{split}.db"
        items, id2len, txt2img, img2txts = {}, {}, {}, {}
        for fname, captions in images.items():
            for caption in captions:
                tid = f"{split}{len(items)}"
                ids[caption] = uniter_ids(tokenizer, caption)
                example = {"input_ids": ids[caption], "img_fname": fname, "id": tid}
                if "Someone" not in caption:  # one caption stored without its raw text
                    example["raw"] = caption
                items[tid.encode()] = lz4_frame.compress(msgpack.dumps(example, use_bin_type=True))
                id2len[tid], txt2img[tid] = len(ids[caption]), fname
                img2txts.setdefault(fname, []).append(tid)
        if split == "test":  # hostile text entries: not lz4, lz4 of not-msgpack, no input_ids
            items[b"bad0"] = b"\x00garbage"
            items[b"bad1"] = lz4_frame.compress(b"\xc1\xc1")
            items[b"bad2"] = lz4_frame.compress(msgpack.dumps({"img_fname": "flickr30k_000000001003.npz"}))
            for tid in ("bad0", "bad1", "bad2"):
                txt2img[tid] = "flickr30k_000000001003.npz"
                img2txts["flickr30k_000000001003.npz"].append(tid)
        db.mkdir(parents=True)
        write_lmdb(db, items)
        for name, obj in (("meta", meta), ("id2len", id2len), ("txt2img", txt2img), ("img2txts", img2txts)):
            (db / f"{name}.json").write_text(json.dumps(obj))
    return {"root": root, "arrays": arrays, "ids": ids, "markers": markers, "txt": txt,
            "img_npz": comp, "img_msgpack": pack}


def convert(data: dict, img_db: Path, out: Path, *extra: str) -> int:
    txt = data["txt"]
    return main(["uniter", "--img-db", str(img_db), "--txt-db", str(txt / "itm_flickr30k_train.db"),
                 "--txt-db", str(txt / "itm_flickr30k_test.db"), "--out", str(out), "--conf-th", str(CONF_TH),
                 "--max-bb", str(MAX_BB), "--min-bb", str(MIN_BB), "--shard-size", "2", *extra])


@pytest.mark.parametrize("variant", ["img_npz", "img_msgpack"])
def test_uniter_dbs_convert_to_exactly_what_uniter_reads(uniter_data, tokenizer, tmp_path, variant, capsys):
    out = tmp_path / "data"
    assert convert(uniter_data, uniter_data[variant], out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"] == "uniter" and manifest["feature_dim"] == D
    assert manifest["splits"] == {"train": 2, "test": 2}
    assert manifest["tokenizer"]["name"] == "demo-wordpiece" and manifest["tokenizer"]["vocab_size"] == len(tokenizer)
    skipped = json.loads((out / "test" / "skipped.json").read_text())["counts"]
    hostile = {"img_npz": "too_large", "img_msgpack": "unsafe_value"}[variant]
    assert skipped == {hostile: 1, "bad_text": 3}
    assert not uniter_data["markers"]["converter"].exists()  # the object array was never unpickled

    samples = {s.image_id[-4:]: s for split in ("train", "test") for s in read_split(out / split, RegionFields(MAX_BB))}
    assert sorted(samples) == ["1000", "1001", "1002", "1003"]
    for stem, s in samples.items():
        feat, geometry = expected_regions(uniter_data["arrays"][f"flickr30k_00000000{stem}.npz"])
        assert s.features.dtype == np.float32 and s.features.shape[0] == min(MAX_BB, max(MIN_BB, N_CONFIDENT[stem]))
        np.testing.assert_array_equal(s.features, feat)
        np.testing.assert_array_equal(s.geometry, geometry)
        assert (s.width, s.height) == (1, 1) and "boxes.npy" not in s.meta
        captions = TEXTS["train" if stem < "1002" else "test"][f"flickr30k_00000000{stem}.npz"]
        assert [list(c.token_ids) for c in s.captions] == [uniter_data["ids"][c] for c in captions]
        assert s.meta["token_ids"] == [uniter_data["ids"][c] for c in captions]
    # Without raw text and without --tokenizer, the caption text is derived from the ids.
    ids = uniter_data["ids"]["Someone on a bicycle"]
    assert samples["1000"].captions[1] == "[token ids] " + " ".join(map(str, ids))

    # End to end through the collator: [CLS] + UNITER's ids + [SEP], and the stored geometry.
    rset = RetrievalSet.from_samples([samples["1002"], samples["1003"]])
    collator = Collator(tokenizer, 40, RegionFields(MAX_BB))
    texts = collator.texts(rset.captions)
    for row, caption in enumerate(rset.captions):
        want = [tokenizer.cls_token_id, *uniter_data["ids"][caption], tokenizer.sep_token_id]
        assert texts["text_ids"][row, : len(want)].tolist() == want
        assert texts["text_attention"][row].sum() == len(want)
        assert (texts["text_ids"][row, len(want):] == tokenizer.pad_token_id).all()
    images = collator.images(rset.images)
    n = samples["1002"].features.shape[0]
    np.testing.assert_array_equal(images["region_geometry"][0, :n].numpy(), samples["1002"].geometry)

    capsys.readouterr()
    assert main(["verify", str(out)]) == 0, capsys.readouterr().out
    assert convert(uniter_data, uniter_data[variant], out) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_tokenizer_decodes_captions_without_text_and_is_copied(uniter_data, tiny_demo, tmp_path):
    out = tmp_path / "data"
    assert convert(uniter_data, uniter_data["img_npz"], out, "--tokenizer", str(tiny_demo / "tokenizer")) == 0
    sample = next(s for s in read_split(out / "train") if s.image_id.endswith("1000"))
    assert sample.captions[1] == "someone on a bicycle"  # the demo tokenizer lower-cases
    assert AutoTokenizer.from_pretrained(str(out / "tokenizer")).cls_token_id == 2
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["files"] == "tokenizer"


def test_a_wrong_tokenizer_is_refused(uniter_data, tmp_path, capsys):
    other = tmp_path / "tok"
    train_wordpiece(["a different vocabulary"], other, vocab_size=50)
    assert convert(uniter_data, uniter_data["img_npz"], tmp_path / "data", "--tokenizer", str(other)) == 2
    assert "not the txt_db's tokenizer" in capsys.readouterr().err


def test_npz_bomb_is_refused_by_declared_size_before_decompression(monkeypatch):
    # A real bomb: 4 MiB of zeros compress to a few KB; and a small npz lying about its size.
    bomb = npz_bytes({"features": np.zeros((1024, 1024), np.float32), "norm_bb": np.zeros((1024, 6), np.float32)})
    assert len(bomb) < 64 << 10
    liar = lying_npz(0x7FFF0000)
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: opened.append(a) or real_open(self, *a, **k))
    for value, cap in ((bomb, 1 << 20), (liar, 512 << 20)):
        with pytest.raises(uniter.Refused) as e:
            uniter.decode_image_value(value, cap)
        assert e.value.reason == "too_large"
    assert opened == []  # refused from the zip directory alone


def test_msgpack_numpy_hostile_encodings_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    obj = msgpack.dumps({"features": np.array([Payload(marker)], dtype=object)}, default=msgpack_numpy.encode,
                        use_bin_type=True)
    # The same pickle bytes declared as a plain dtype "|O": numpy would read pointers from them.
    pointer = msgpack.dumps({"features": {b"nd": True, b"type": "|O", b"kind": b"", b"shape": [1], b"data": b"x" * 8}},
                            use_bin_type=True)
    for value in (obj, pointer):
        with pytest.raises(uniter.Refused) as e:
            uniter.decode_image_value(value, 1 << 20)
        assert e.value.reason == "unsafe_value"
    assert not marker.exists()
    # Plain numeric arrays and scalars decode, read-only and exact.
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    out = uniter.decode_image_value(msgpack.dumps({"x": a, "s": np.float32(2.5)}, default=msgpack_numpy.encode,
                                                  use_bin_type=True), 1 << 20)
    np.testing.assert_array_equal(out["x"], a)
    assert out["s"] == np.float32(2.5)


def test_lz4_expansion_is_capped():
    frame = lz4_frame.compress(bytes(4 << 20))
    with pytest.raises(uniter.Refused):
        uniter.decompress_lz4(frame, 1 << 20)
    assert uniter.decompress_lz4(frame, 8 << 20) == bytes(4 << 20)
    with pytest.raises(ValueError):
        uniter.decompress_lz4(frame[: len(frame) // 2], 8 << 20)


def test_split_names_and_box_rule():
    assert uniter.split_of_txt_db(Path("itm_coco_restval.db")) == "train"
    assert uniter.split_of_txt_db(Path("itm_flickr30k_test.db")) == "test"
    conf = np.array([0.9, 0.5, 0.1, 0.3], np.float16)
    assert uniter.compute_num_bb(conf, 0.2, 1, 100) == 3
    assert uniter.compute_num_bb(conf, 0.2, 4, 100) == 4
    assert uniter.compute_num_bb(conf, 0.2, 1, 2) == 2


def test_an_interrupted_conversion_resumes_to_identical_output(uniter_data, tmp_path, monkeypatch):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert convert(uniter_data, uniter_data["img_npz"], clean) == 0
    real, calls = uniter.load_entry, []

    def dies_on_the_third_image(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed after the first shard (2 samples) was logged
        return real(*args, **kw)

    monkeypatch.setattr(uniter, "load_entry", dies_on_the_third_image)
    with pytest.raises(KeyboardInterrupt):
        convert(uniter_data, uniter_data["img_npz"], resumed)
    assert (resumed / "train" / "shard-000000.tar").is_file() and not (resumed / "manifest.json").exists()
    again: list[int] = []
    monkeypatch.setattr(uniter, "load_entry", lambda *a, **k: again.append(1) or real(*a, **k))
    assert convert(uniter_data, uniter_data["img_npz"], resumed) == 0
    assert len(again) == 3  # the train split was complete: only the 3 test images are read again

    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert tree(resumed) == tree(clean)
