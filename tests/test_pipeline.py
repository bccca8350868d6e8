"""The training stream and the evaluation sets: rank split, safe decoding, counted skips."""

from __future__ import annotations

import io
import json
import pickle
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from transformers import AutoTokenizer

from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import RegionFields, box_geometry
from iais_scale.data.pipeline import PairStream
from iais_scale.data.retrieval import RetrievalSet, read_split, swap_groups
from iais_scale.data.samples import BadSample, BadSampleCounter, decode_sample
from iais_scale.data.shards import resolve_split


@pytest.fixture(scope="module")
def collator(tiny_demo: Path) -> Collator:
    return Collator(AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer")), 24, RegionFields(8))


def test_batches_have_the_model_inputs(tiny_demo, collator):
    b = next(iter(PairStream(tiny_demo / "train", collator, batch_size=8)))
    good, bad = b.pop("sample_counts")
    assert good == 96 and bad == {}  # the whole chunk fills the shuffle buffer (1000) before the first batch
    assert b["text_ids"].shape[0] == b["region_features"].shape[0] == 8
    assert b["region_features"].shape[-1] == 16 and b["region_geometry"].shape[-1] == 7
    assert (b["text_ids"][:, 0] == collator.tokenizer.cls_token_id).all()
    assert b["region_attention"].any(1).all()


def test_ranks_read_disjoint_samples_and_never_run_dry(tiny_demo, collator):
    # 96 samples in 3 shards: with 2 ranks the split is by shard, with 5 ranks by sample.
    for world in (2, 5):
        per_rank = [
            [k for b in islice(iter(PairStream(tiny_demo / "train", collator, 4, rank=r, world_size=world, shuffle_buffer=1)), 40) for k in b["keys"]]
            for r in range(world)
        ]
        assert all(len(keys) == 160 for keys in per_rank)  # endless: every rank yields every batch asked for
        epoch = 96 // world  # the first epoch's share of each rank (shuffle buffer 1 keeps the order)
        firsts = [set(keys[: epoch - 4]) for keys in per_rank]
        for i in range(world):
            for j in range(i + 1, world):
                assert not firsts[i] & firsts[j], (world, i, j)


def test_box_geometry():
    g = box_geometry(np.array([[0, 0, 32, 16]], np.float32), 64, 32)
    np.testing.assert_allclose(g, [[0, 0, 0.5, 0.5, 0.5, 0.5, 0.25]])


def _raw(meta: dict, feat: np.ndarray, boxes: np.ndarray, **extra) -> dict:
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    return {"__key__": "k", "json": json.dumps(meta).encode(), "feat.npy": npy(feat), "boxes.npy": npy(boxes), **extra}


META = {"image_id": "1", "split": "train", "width": 10, "height": 10, "captions": ["a red circle"]}
BOXES = np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/iais_scale_pickle_ran"),))


def test_nothing_is_ever_unpickled(tmp_path):
    marker = Path("/tmp/iais_scale_pickle_ran")
    marker.unlink(missing_ok=True)
    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as w:
        raw = _raw(META, np.ones((2, 4), np.float32), BOXES)
        w.write({"__key__": "s0", **{k: v for k, v in raw.items() if k != "__key__"},
                 "pyd": pickle.dumps(_Payload()), "pkl": pickle.dumps(_Payload())})
    (tmp_path / "sizes.json").write_text(json.dumps({shard.name: 1}))
    samples = read_split(tmp_path)
    assert samples[0].captions == ["a red circle"]
    assert not marker.exists()
    # A pickled object array in a .npy member is refused, not loaded.
    obj = np.array([_Payload()], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    with pytest.raises(BadSample):
        decode_sample({**_raw(META, np.ones((2, 4), np.float32), BOXES), "feat.npy": buf.getvalue()}, RegionFields())
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(feat=np.array([[np.nan, 1], [0, 0]], np.float32)), "nonfinite_features"),
        (dict(meta={**META, "captions": [""]}), "bad_json"),
        (dict(meta={**META, "captions": []}), "bad_json"),
        (dict(boxes=BOXES[:1]), "bad_regions"),
        (dict(drop="json"), "missing_json"),
        (dict(drop="feat.npy"), "missing_features"),
        (dict(feat=np.ones((9, 2), np.float32), boxes=np.tile(BOXES[:1], (9, 1))), "too_many_regions"),
    ],
)
def test_bad_samples_are_named(change, reason):
    raw = _raw(change.get("meta", META), change.get("feat", np.ones((2, 2), np.float32)), change.get("boxes", BOXES))
    raw.pop(change.get("drop", "none"), None)
    with pytest.raises(BadSample) as e:
        decode_sample(raw, RegionFields(8))
    assert e.value.reason == reason


def test_bad_fraction_aborts_with_a_clear_message():
    counter = BadSampleCounter(limit=0.1, min_seen=10)
    for _ in range(9):
        counter.ok()
    counter.skip(BadSample("bad_json"))  # 1 of 10: at the limit, fine
    with pytest.raises(RuntimeError, match="bad_json"):
        counter.skip(BadSample("bad_json"))


def test_stream_counts_bad_samples(tmp_path, collator):
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as w:
        for i in range(12):
            feat = np.ones((2, 16), np.float32)
            if i % 4 == 0:
                feat[0, 0] = np.nan
            raw = _raw({**META, "image_id": str(i)}, feat, BOXES)
            w.write({"__key__": f"s{i}", **{k: v for k, v in raw.items() if k != "__key__"}})
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 12}))
    b = next(iter(PairStream(tmp_path, collator, batch_size=8, shuffle_buffer=1)))
    good, bad = b.pop("sample_counts")
    # One batch per epoch (12 // 8): positions 0-7 hold the bad s0 and s4, so the wrap rule reads on
    # from position 8: the bad s8, then s9 and s10 complete the batch.
    assert bad == {"nonfinite_features": 3} and good == 8, (bad, good)
    assert b["keys"] == ["s1", "s2", "s3", "s5", "s6", "s7", "s9", "s10"]


def test_missing_shards_are_reported(tmp_path):
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 3}))
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_split(str(tmp_path))


def test_retrieval_and_swap_sets(tiny_demo):
    rset = RetrievalSet.from_samples(read_split(tiny_demo / "test"))
    assert len(rset.images) == 16 and len(rset.captions) == 32
    assert rset.caption_image.tolist() == [i // 2 for i in range(32)]
    groups = swap_groups(read_split(tiny_demo / "swap"))
    assert len(groups) == 6
    for g in groups:
        assert g.captions[0] != g.captions[1]
        assert sorted(g.captions[0].split()) == sorted(g.captions[1].split())  # same words, swapped
