"""Shard format additions: ``geometry.npy``, ``token_ids`` (collated as the data set's ids), the training
caption-length limit, ``phrases`` validation, and verify on the new members."""

from __future__ import annotations

import pickle
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from transformers import AutoTokenizer

from data_tools.__main__ import main
from iais_scale.config import DataConfig, ExperimentConfig
from iais_scale.data import format as fmt
from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import RegionFields, box_geometry
from iais_scale.data.pipeline import PairStream, make_train_stream
from iais_scale.data.retrieval import RetrievalSet, read_split
from iais_scale.data.samples import Caption

D = 16
BOXES = np.array([[0, 0, 32, 16], [8, 4, 64, 32]], np.float32)  # pixels of a 64 x 32 image
GEOMETRY = box_geometry(BOXES, 64, 32)


@pytest.fixture(scope="module")
def tokenizer(tiny_demo: Path):
    return AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def meta(key: str, split: str = "test", **kw) -> dict:
    return {"image_id": key, "split": split, "width": 64, "height": 32, "captions": ["a red circle"], **kw}


def write(split_dir: Path, samples: list[tuple[dict, dict]], shard_size: int = 100) -> None:
    with fmt.ShardWriter(split_dir, shard_size=shard_size) as w:
        for i, (m, arrays) in enumerate(samples):
            w.write(fmt.sample_key(split_dir.name, i), m, **arrays)


# --------------------------------------------------------------------------- geometry.npy


def test_geometry_only_samples_round_trip_and_feed_the_collator(tmp_path, tokenizer, capsys):
    geometry = GEOMETRY.copy()
    geometry[1, 6] = 0.123  # stored as it is: the collator must not recompute it
    feat = np.ones((2, D), np.float16)
    write(tmp_path / "test", [(meta("a", width=1, height=1), dict(feat=feat, geometry=geometry)),
                              (meta("b"), dict(feat=feat, boxes=BOXES)),
                              (meta("c"), dict(feat=feat, boxes=BOXES, geometry=GEOMETRY))])
    a, b, c = read_split(tmp_path / "test")
    np.testing.assert_array_equal(a.geometry, geometry)
    np.testing.assert_allclose(a.boxes, geometry[:, :4])  # the 1 x 1 frame: boxes are the normalised ones
    assert b.geometry is None and c.geometry is not None
    np.testing.assert_allclose(b.normalised_boxes(), GEOMETRY[:, :4])
    regions = Collator(tokenizer, 24, RegionFields(4)).images([a, b, c])
    np.testing.assert_array_equal(regions["region_geometry"][0].numpy(), geometry)
    np.testing.assert_allclose(regions["region_geometry"][1].numpy(), GEOMETRY)
    assert main(["verify", str(tmp_path / "test")]) == 0, capsys.readouterr().out


def test_writer_checks_geometry(tmp_path):
    feat = np.ones((2, D), np.float32)
    with fmt.ShardWriter(tmp_path / "test") as w:
        bad = GEOMETRY.copy()
        bad[0, 2] += 0.01  # boxes and geometry disagree by more than 1e-3
        for arrays, match in ((dict(geometry=bad, boxes=BOXES), "differs from boxes"),
                              (dict(geometry=GEOMETRY * 2), "outside"),
                              (dict(geometry=GEOMETRY[:, :6]), "expected"),
                              (dict(), "feat needs boxes, geometry or both")):
            with pytest.raises(ValueError, match=match):
                w.write("k", meta("k"), feat=feat, **arrays)
        with pytest.raises(ValueError, match="need feat"):
            w.write("k", meta("k"), image=b"x", geometry=GEOMETRY)
        with pytest.raises(ValueError, match="too long"):
            w.write("k" * fmt.MAX_KEY_LEN, meta("k"), feat=feat, geometry=GEOMETRY)


def test_verify_reports_disagreeing_and_orphan_geometry(tmp_path, capsys):
    split = tmp_path / "test"
    split.mkdir()
    bad = GEOMETRY.copy()
    bad[1, 0] = 0.5
    with wds.TarWriter(str(split / "shard-000000.tar"), encoder=False) as w:
        w.write({"__key__": "test-000000", "json": fmt.encode_json(meta("a")),
                 "feat.npy": fmt.encode_npy(np.ones((2, D), np.float32)), "boxes.npy": fmt.encode_npy(BOXES),
                 "geometry.npy": fmt.encode_npy(bad)})
        w.write({"__key__": "test-000001", "json": fmt.encode_json(meta("b")),
                 "png": b"\x89PNG not really", "geometry.npy": fmt.encode_npy(GEOMETRY)})
    (split / "sizes.json").write_text('{"shard-000000.tar": 2}')
    capsys.readouterr()
    assert main(["verify", str(split)]) == 1
    out = capsys.readouterr().out
    assert "geometry: differs from boxes" in out and ".geometry.npy without .feat.npy" in out


# --------------------------------------------------------------------------- token_ids and phrases


@pytest.mark.parametrize("extra, match", [
    (dict(token_ids=[[5, 6], [7]]), "parallel to captions"),
    (dict(token_ids=[[]]), "non-empty list"),
    (dict(token_ids=[[5, -1]]), "integers"),
    (dict(token_ids=[[5, True]]), "integers"),
    (dict(phrases={"caption": 0}), "must be a list"),
    (dict(phrases=[{"caption": 1, "start": 0, "end": 1, "boxes": [[0, 0, 1, 1]]}]), "caption index"),
    (dict(phrases=[{"caption": 0, "start": 2, "end": 2, "boxes": [[0, 0, 1, 1]]}]), "character offsets"),
    (dict(phrases=[{"caption": 0, "start": 0, "end": 99, "boxes": [[0, 0, 1, 1]]}]), "character offsets"),
    (dict(phrases=[{"caption": 0, "start": 0, "end": 1, "boxes": []}]), "non-empty list"),
    (dict(phrases=[{"caption": 0, "start": 0, "end": 1, "boxes": [[0, 0, 30, 20]]}]), "normalised"),
    (dict(phrases=[{"caption": 0, "start": 0, "end": 1, "boxes": [[0.5, 0, 0.2, 1]]}]), "normalised"),
    (dict(phrases=[{"caption": 0, "start": 0, "end": 1, "boxes": [[0, 0, 1, 1]], "entity": 3}]), "entity"),
])
def test_token_ids_and_phrases_are_validated(extra, match):
    with pytest.raises(ValueError, match=match):
        fmt.validate_sample(meta("k", **extra))


def test_valid_token_ids_and_phrases():
    fmt.validate_sample(meta("k", token_ids=[[5, 6, 7]], phrases=[
        {"caption": 0, "start": 0, "end": 5, "boxes": [[0, 0, 0.5, 1.0], [0.1, 0.1, 0.2, 0.2]], "entity": "18"}]))


def test_stored_ids_collate_like_the_tokenizer(tokenizer):
    texts = ["a small red circle left of a large blue square", "a blue square", "a red circle above a square"]
    collator = Collator(tokenizer, 8, RegionFields(4))
    plain = collator.texts(texts)
    mixed = [Caption(texts[0], ids_of(tokenizer, texts[0])), texts[1], Caption(texts[2], ids_of(tokenizer, texts[2]))]
    # Training batches truncate to max_text_len exactly as the tokenizer path does.
    for key in ("text_ids", "text_attention"):
        assert collator.texts(mixed, truncate_ids=True)[key].equal(plain[key])
    # Evaluation never cuts stored ids: the batch grows to the longest caption.
    full = collator.texts(mixed)
    n0 = len(ids_of(tokenizer, texts[0])) + 2
    assert full["text_ids"].shape[1] == n0 > 8
    assert full["text_ids"][0, :n0].tolist() == [tokenizer.cls_token_id, *ids_of(tokenizer, texts[0]),
                                                 tokenizer.sep_token_id]
    n1 = len(ids_of(tokenizer, texts[1])) + 2
    assert full["text_ids"][1].tolist() == plain["text_ids"][1, :n1].tolist() + [tokenizer.pad_token_id] * (n0 - n1)
    assert full["text_attention"].sum(1).tolist() == [n0, n1, len(ids_of(tokenizer, texts[2])) + 2]
    with pytest.raises(ValueError, match="another tokenizer"):
        collator.texts([Caption("x", [len(tokenizer) + 5])])
    assert collator.word_pieces(mixed) == [len(ids_of(tokenizer, t)) for t in texts]


def test_caption_is_a_string_that_pickles_with_its_ids():
    c = Caption("a red circle", [7, 8, 9])
    assert c == "a red circle" and isinstance(c, str) and c.split() == ["a", "red", "circle"]
    back = pickle.loads(pickle.dumps(c))
    assert back == c and back.token_ids == (7, 8, 9)
    rset = RetrievalSet.from_samples([])
    assert rset.captions == []


# --------------------------------------------------------------------------- the training caption limit


def long_short_split(split_dir: Path, tok) -> None:
    """24 samples: even ones with a short and a long caption, every third odd one with long captions only."""
    samples = []
    for i in range(24):
        short, long = "a red circle", "a small red circle left of a large blue square above a green triangle"
        captions = [short, long] if i % 2 == 0 else ([long, long] if i % 3 == 0 else [short, long, short])
        m = meta(f"s{i}", split="train", captions=captions, token_ids=[ids_of(tok, c) for c in captions])
        samples.append((m, dict(feat=np.full((2, D), i, np.float32), boxes=BOXES)))
    write(split_dir, samples, shard_size=8)


def test_training_draws_skip_long_captions(tmp_path, tokenizer):
    long_short_split(tmp_path / "train", tokenizer)
    collator = Collator(tokenizer, 40, RegionFields(4))
    stream = PairStream(tmp_path / "train", collator, batch_size=4, shuffle_buffer=1, max_caption_tokens=6)
    batches = list(islice(iter(stream), 12))
    assert all(b["text_attention"].sum(1).max() <= 6 + 2 for b in batches)
    bad = sum(b["sample_counts"][1].get("caption_too_long", 0) for b in batches)
    # Per epoch (6 batches): s3, s9, s15, s21 in the pass over the 24 samples, then the wrap rule
    # reads on from position 0 for the 4 missing pairs and meets one of them again.
    per_epoch = [sum(b["sample_counts"][1].get("caption_too_long", 0) for b in batches[e * 6 : (e + 1) * 6])
                 for e in (0, 1)]
    assert per_epoch == [5, 5] and bad == 10, per_epoch
    for e in (0, 1):
        positions = [p for b in batches[e * 6 : (e + 1) * 6] for p in b["positions"]]
        assert len(set(positions)) == 20 and len(positions) == 24  # 20 usable samples, 4 of them twice
    assert not {k for b in batches for k in b["keys"]} & {"train-000003", "train-000009"}


def test_a_limit_that_keeps_every_caption_keeps_the_draws(tmp_path, tokenizer):
    long_short_split(tmp_path / "train", tokenizer)
    collator = Collator(tokenizer, 40, RegionFields(4))
    a, b = (list(islice(iter(PairStream(tmp_path / "train", collator, 4, shuffle_buffer=4, seed=3,
                                        max_caption_tokens=limit)), 10)) for limit in (None, 100))
    for x, y in zip(a, b, strict=True):
        assert x["keys"] == y["keys"] and x["text_ids"].equal(y["text_ids"])


def test_config_field_is_validated_and_reaches_the_stream(tmp_path, tokenizer):
    assert any("max_train_caption_tokens" in p for p in ExperimentConfig(data=DataConfig(max_train_caption_tokens=0))
               .validate())
    assert not any("max_train_caption_tokens" in p for p in ExperimentConfig(data=DataConfig(
        max_train_caption_tokens=60)).validate())
    long_short_split(tmp_path / "train", tokenizer)
    data = DataConfig(root=str(tmp_path), max_train_caption_tokens=60)
    stream = make_train_stream(data, Collator(tokenizer, 40, RegionFields(4)), 4, rank=0, world_size=1, seed=0)
    assert stream.max_caption_tokens == 60
