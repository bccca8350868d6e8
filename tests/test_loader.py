"""The training loader: epoch and resampled modes, exact resume with workers, img2dataset shards, pixels."""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from iais_scale.config import ConfigError, DataConfig, SourceConfig, load_config
from iais_scale.data import format as fmt
from iais_scale.data.collate import Collator
from iais_scale.data.image_fields import PixelFields, RegionFields
from iais_scale.data.pipeline import PairStream, ResampledPairStream, StreamStart, make_train_stream, train_loader
from iais_scale.data.samples import BadSample, BadSampleCounter, decode_sample
from iais_scale.data.shards import read_shard, resolve_split
from iais_scale.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform


@pytest.fixture(scope="module")
def tokenizer(tiny_demo: Path):
    return AutoTokenizer.from_pretrained(str(tiny_demo / "tokenizer"))


@pytest.fixture(scope="module")
def collator(tokenizer) -> Collator:
    return Collator(tokenizer, 24, RegionFields(8))


@pytest.fixture(scope="module")
def pixel_collator(tokenizer) -> Collator:
    return Collator(tokenizer, 24, PixelFields(ImageTransform(32)))


def write_region_split(split_dir: Path, sizes: list[int], prefix: str = "s") -> list[str]:
    """Shards of region samples with the given sizes (plus sizes.json); returns all keys."""
    split_dir.mkdir(parents=True)
    keys, index = [], 0
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(split_dir / fmt.shard_name(s)), encoder=False) as w:
            for _ in range(n):
                key = f"{prefix}-{index:06d}"
                meta = {"image_id": key, "split": split_dir.name, "width": 10, "height": 10,
                        "captions": ["a red circle"] if index % 2 else ["a big blue square left of a circle"]}
                k = 1 + index % 3
                w.write({"__key__": key, "json": fmt.encode_json(meta),
                         "feat.npy": fmt.encode_npy(np.full((k, 16), index % 7, np.float32)),
                         "boxes.npy": fmt.encode_npy(np.tile(np.array([[0, 0, 5, 5]], np.float32), (k, 1)))})
                keys.append(key)
                index += 1
    (split_dir / fmt.SIZES_FILE).write_text(json.dumps({fmt.shard_name(s): n for s, n in enumerate(sizes)}))
    return keys


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def jpeg(width: int, height: int, color=(255, 0, 128), quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- epoch mode


def test_epoch_mode_equal_batch_counts_with_more_ranks_than_shards(tmp_path, collator):
    keys = write_region_split(tmp_path / "train", [5, 17, 30])  # 52 samples, 3 uneven shards
    world, bs = 4, 3
    streams = [PairStream(tmp_path / "train", collator, bs, rank=r, world_size=world, shuffle_buffer=8) for r in range(world)]
    per_epoch = 52 // (world * bs)
    assert {s.batches_per_epoch for s in streams} == {per_epoch} == {4}
    runs = [list(islice(iter(s), 3 * per_epoch)) for s in streams]  # three epochs, endless
    assert all(len(batches) == 3 * per_epoch and all(len(b["keys"]) == bs for b in batches) for batches in runs)
    for epoch in range(3):
        seen = [k for batches in runs for k in keys_of(batches[epoch * per_epoch : (epoch + 1) * per_epoch])]
        assert len(seen) == len(set(seen)) == world * per_epoch * bs == 48  # no duplicate in an epoch
        assert set(seen) <= set(keys)  # the remainder: 52 - 48 = 4 samples dropped this epoch
        # Exactly the rule: the dropped ones are the last 4 positions of the epoch's shard order.
        order = streams[0].epoch_order(epoch)
        in_order = [k for url, _ in order for k in (r["__key__"] for r in read_shard(url))]
        assert set(in_order[48:]) == set(keys) - set(seen)
    assert all(b["sample_counts"][1] == {} for batches in runs for b in batches)


def test_wrap_rule_fills_a_short_chunk(tmp_path, collator):
    # sizes.json promises 12 samples, the shard holds 8: rank 1's positions 6..11 hold only 2, so it
    # goes on after its chunk, wrapping to position 0 of the same epoch order.
    keys = write_region_split(tmp_path / "train", [8])
    (tmp_path / "train" / fmt.SIZES_FILE).write_text(json.dumps({fmt.shard_name(0): 12}))
    ranks = [PairStream(tmp_path / "train", collator, 6, rank=r, world_size=2, shuffle_buffer=1) for r in range(2)]
    b0 = next(iter(ranks[0]))
    b1 = next(iter(ranks[1]))
    assert b0["keys"] == keys[:6] and b0["sample_counts"] == (6, {})
    assert b1["keys"] == keys[6:8] + keys[:4] and b1["sample_counts"] == (6, {"bad_shard": 1, "lost_samples": 4})


def test_truncated_and_garbage_shards_are_counted(tiny_demo, tmp_path, collator):
    split = tmp_path / "train"
    split.mkdir()
    data = (tiny_demo / "train" / "shard-000000.tar").read_bytes()
    (split / "shard-000000.tar").write_bytes(data[: len(data) // 2])
    (split / "shard-000001.tar").write_bytes(b"not a tar" * 300)
    (split / "shard-000002.tar").write_bytes((tiny_demo / "train" / "shard-000001.tar").read_bytes())
    (split / fmt.SIZES_FILE).write_text(json.dumps({f"shard-00000{i}.tar": 32 for i in range(3)}))
    batches = list(islice(iter(PairStream(split, collator, 8, shuffle_buffer=4)), 20))
    assert all(len(b["keys"]) == 8 for b in batches)
    # Each pass over the epoch order meets the two damaged shards once each (one bad_shard apiece: the
    # truncated one still gives its first 16 samples, the garbage one none): 16 + 32 = 48 usable of 96,
    # 48 lost_samples a pass.
    # Epoch 0 (12 batches) needs 96: a second, wrapped pass; epoch 1's first 8 batches (64) one pass
    # and then the good samples before the damaged shards of the wrap.
    per_epoch, good = [Counter(), Counter()], [0, 0]
    for b in batches:
        per_epoch[b["epoch"]].update(b["sample_counts"][1])
        good[b["epoch"]] += b["sample_counts"][0]
    assert [b["epoch"] for b in batches] == [0] * 12 + [1] * 8
    assert per_epoch == [Counter(bad_shard=4, lost_samples=96), Counter(bad_shard=2, lost_samples=48)], per_epoch
    assert good == [96, 64], good


def test_bucketing_keeps_the_epoch_and_groups_lengths(tiny_demo, collator):
    plain = PairStream(tiny_demo / "train", collator, 4, rank=1, world_size=2, shuffle_buffer=16)
    bucketed = PairStream(tiny_demo / "train", collator, 4, rank=1, world_size=2, shuffle_buffer=16, bucket_by_length=True)
    n = plain.batches_per_epoch
    a, b = list(islice(iter(plain), n)), list(islice(iter(bucketed), n))
    assert sorted(keys_of(a)) == sorted(keys_of(b))  # the same samples, batch count unchanged
    assert keys_of(b) == keys_of(islice(iter(bucketed), n))  # deterministic

    def spread(batches):
        return np.mean([float(x["text_attention"].sum(1).float().std()) for x in batches])

    assert spread(b) < spread(a)


# --------------------------------------------------------------------------- resume with workers


def test_exact_resume_with_two_workers_and_two_ranks(tiny_demo, collator):
    world, bs, total, stop = 2, 4, 30, 7  # 12 batches per rank per epoch: 2.5 epochs

    def run(rank: int, start: int, n: int) -> list[list[str]]:
        stream = PairStream(tiny_demo / "train", collator, bs, rank=rank, world_size=world, seed=3,
                            shuffle_buffer=16, start=StreamStart(consumed=start))
        return [b["keys"] for b in islice(iter(train_loader(stream, num_workers=2)), n)]

    for rank in range(world):
        whole = run(rank, 0, total)
        killed = run(rank, 0, stop)  # stop iterating: the loader and its workers are dropped
        assert killed == whole[:stop]
        resumed = run(rank, stop, total - stop)  # the saved state: batches consumed on this rank
        assert killed + resumed == whole
        if rank == 0:
            first = whole
    epoch0 = [k for b in first[:12] + whole[:12] for k in b]
    assert len(set(epoch0)) == len(epoch0) == 96  # two ranks x two workers: each sample once


def test_resampled_resume_is_exact(tiny_demo, tmp_path, collator):
    write_region_split(tmp_path / "b" / "train", [10, 6], prefix="b")

    def run(start: int, n: int) -> list[list[str]]:
        stream = ResampledPairStream([(tiny_demo / "train", 1.0), (tmp_path / "b" / "train", 1.0)], collator, 4,
                                     rank=1, world_size=2, seed=5, shuffle_buffer=8, start=StreamStart(consumed=start),
                                     epoch_samples=40, bucket_by_length=True)
        return [b["keys"] for b in islice(iter(stream), n)]

    whole = run(0, 14)  # 5 batches per nominal epoch
    assert run(0, 6) + run(6, 8) == whole


# --------------------------------------------------------------------------- resampled mode


def test_resampled_mixture_follows_the_weights_and_never_ends(tmp_path, collator):
    write_region_split(tmp_path / "a" / "train", [30, 10], prefix="a")
    write_region_split(tmp_path / "b" / "train", [7], prefix="b")
    sources = [(tmp_path / "a" / "train", 1.0), (tmp_path / "b" / "train", 3.0)]
    streams = [ResampledPairStream(sources, collator, 8, rank=r, world_size=2, seed=1, shuffle_buffer=20) for r in range(2)]
    assert streams[0].batches_per_epoch == streams[1].batches_per_epoch == 47 // 16
    batches = list(islice(iter(streams[0]), 60))  # 20 nominal epochs
    keys = keys_of(batches)
    assert len(keys) == 480
    share_b = sum(k.startswith("b-") for k in keys) / len(keys)
    assert abs(share_b - 0.75) < 0.06, share_b  # by weight, not by size (b holds 7 of 47 samples)
    assert keys_of(islice(iter(streams[0]), 6)) == keys[:48]  # seeded
    assert keys_of(islice(iter(streams[1]), 6)) != keys[:48]  # each rank draws its own shards


def test_make_train_stream_and_config(tmp_path, tiny_demo, collator):
    cfg = DataConfig(root=str(tiny_demo), shuffle_buffer=8)
    s = make_train_stream(cfg, collator, 4, rank=0, world_size=2, seed=0, start=StreamStart(consumed=5))
    assert isinstance(s, PairStream) and s.start.consumed == 5 and s.position(30) == (2, 6)
    cfg = DataConfig(mode="resampled", sources=[SourceConfig(str(tiny_demo / "train"), 2.0)])
    assert isinstance(make_train_stream(cfg, collator, 4, 0, 1, 0), ResampledPairStream)
    with pytest.raises(ConfigError, match="data.sources"):
        load_config(None, ["data.mode=resampled"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight"):
        load_config(None, ["data.mode=resampled", "data.sources=[{path: x, weight: 0}]"])


# --------------------------------------------------------------------------- img2dataset shards and pixels


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/iais_scale_loader_pickle_ran"),))


def write_img2dataset(folder: Path, n: int, bad: dict[int, bytes] | None = None) -> None:
    """An img2dataset webdataset folder: 00000.tar with {key}.jpg/.txt/.json (+ a pickle), 00000_stats.json."""
    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "00000.tar"), encoder=False) as w:
        for i in range(n):
            key = f"{i:09d}"
            image = (bad or {}).get(i, jpeg(48 + i, 40))
            meta = {"key": key, "status": "success", "caption": f"photo {i}", "url": f"http://x/{i}.jpg",
                    "width": 48 + i, "height": 40, "original_width": 480, "original_height": 400,
                    "error_message": None, "exif": None}
            if i == 1:
                del meta["width"], meta["height"]  # taken from the image header then
            w.write({"__key__": key, "jpg": image, "txt": f"a photo number {i}".encode(),
                     "json": json.dumps(meta).encode(), "pyd": pickle.dumps(_Payload())})
    (folder / "00000_stats.json").write_text(json.dumps({"count": n, "successes": n, "failed_to_download": 0}))


def test_img2dataset_shard_decodes_to_pixel_values(tmp_path, pixel_collator):
    marker = Path("/tmp/iais_scale_loader_pickle_ran")
    marker.unlink(missing_ok=True)
    folder = tmp_path / "cc3m"
    write_img2dataset(folder, 6)
    split = resolve_split(str(folder))
    assert (split.urls, split.total) == ([str(folder / "00000.tar")], 6)
    raw = next(read_shard(str(folder / "00000.tar"), 1, 2))
    s = decode_sample(raw, PixelFields())
    assert (s.key, s.image_id, s.captions, s.width, s.height) == ("000000001", "000000001", ["a photo number 1"], 49, 40)
    assert s.features.shape[0] == 0 and s.image == raw["jpg"]
    with pytest.raises(BadSample, match="missing_features"):
        decode_sample(raw, RegionFields())  # no region features: only pixels

    batch = next(iter(PairStream(folder, pixel_collator, 4, shuffle_buffer=1)))
    assert set(batch) >= {"pixel_values", "text_ids", "text_attention", "keys"} and "region_features" not in batch
    px = batch["pixel_values"]
    assert px.shape == (4, 3, 32, 32) and px.dtype == torch.float32 and px.is_contiguous()
    expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(px.mean((0, 2, 3)), expected, atol=0.08, rtol=0)  # solid colour through JPEG
    assert batch["sample_counts"] == (4, {})
    assert not marker.exists()  # the .pyd member was never unpickled


def test_pixels_resize_the_shorter_side_and_crop_the_centre(pixel_collator):
    im = np.zeros((60, 120, 3), np.uint8)
    im[:, :20] = 255  # white left strip: outside the centre square (x 30..90)
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "PNG")
    raw = {"__key__": "k", "png": buf.getvalue(), "json": fmt.encode_json(
        {"image_id": "k", "split": "train", "width": 120, "height": 60, "captions": ["x"]})}
    px = pixel_collator.image_fields.draw(decode_sample(raw, PixelFields()))
    assert px.shape == (32, 32, 3) and px.dtype == np.uint8 and px.max() < 10  # only the black centre


def test_undecodable_images_are_bad_image(tmp_path, pixel_collator):
    good = jpeg(64, 48, quality=90)
    truncated = good[: len(good) // 2]
    folder = tmp_path / "web"
    write_img2dataset(folder, 10, bad={2: truncated, 5: b"\xff\xd8 not really a jpeg"})
    for data in (truncated, b"\xff\xd8 not really a jpeg", b""):
        with pytest.raises(BadSample) as e:
            decode_sample({"__key__": "k", "jpg": data, "txt": b"a cat"}, PixelFields())
        assert e.value.reason == "bad_image"
    batch = next(iter(PairStream(folder, pixel_collator, 8, shuffle_buffer=1)))
    assert len(batch["keys"]) == 8 and not {"000000002", "000000005"} & set(batch["keys"])
    assert batch["sample_counts"] == (8, {"bad_image": 2})


def test_image_failing_at_collation_is_replaced_and_counted(tmp_path, tokenizer):
    class Flaky(PixelFields):
        def draw(self, sample):
            if sample.key == "000000003":
                raise BadSample("bad_image", sample.key)
            return super().draw(sample)

    folder = tmp_path / "web"
    write_img2dataset(folder, 12)
    coll = Collator(tokenizer, 24, Flaky(ImageTransform(16)))
    batches = list(islice(iter(PairStream(folder, coll, 4, shuffle_buffer=1)), 3))
    assert [len(b["keys"]) for b in batches] == [4, 4, 4]
    assert batches[0]["keys"] == ["000000000", "000000001", "000000002", "000000004"]
    assert batches[0]["sample_counts"] == (4, {"bad_image": 1})


def test_bad_sample_counter_names_rank_and_reasons():
    counter = BadSampleCounter(limit=0.1, min_seen=10, rank=3)
    counter.merge(9, {"bad_image": 1})
    with pytest.raises(RuntimeError, match=r"rank 3: 7 of 16 samples were bad \(lost_samples: 5, bad_image: 2, bad_shard: 1\)"):
        counter.merge(0, {"bad_image": 1, "bad_shard": 1, "lost_samples": 5})
    shards = BadSampleCounter(limit=0.1, min_seen=10)
    shards.merge(10, {"bad_shard": 3})  # shards are no samples: their lost samples are what counts
    assert shards.seen == 10 and shards.bad_samples == 0


def test_samples_past_a_declared_size_are_counted_and_logged(tiny_demo, tmp_path, collator, caplog):
    """sizes.json says 24 where the shard holds 32: the 8 past it are never read (the listing is the
    epoch's plan), but counted as past_declared_size and named in a warning, not silently lost; and
    a shard's lost samples count toward data.max_bad_fraction."""
    split = tmp_path / "train"
    split.mkdir()
    shutil.copy(tiny_demo / "train" / "shard-000000.tar", split / "shard-000000.tar")
    (split / fmt.SIZES_FILE).write_text(json.dumps({"shard-000000.tar": 24}))
    with caplog.at_level(logging.WARNING, logger="iais_scale"):
        batches = list(islice(iter(PairStream(split, collator, 8, shuffle_buffer=1)), 4))  # (epoch 0: 3)
    counted = Counter()
    for b in batches:
        counted.update(b["sample_counts"][1])
    assert [b["epoch"] for b in batches] == [0, 0, 0, 1] and sum(b["sample_counts"][0] for b in batches[:3]) == 24
    assert counted == {"past_declared_size": 8}  # (counted once the reader passes the declared end)
    assert any("holds 8 sample(s) past the 24 its listing (sizes.json) declares" in r.getMessage()
               for r in caplog.records)
    counter = BadSampleCounter(limit=0.2, min_seen=10)
    with pytest.raises(RuntimeError, match="32 of 96 samples were bad"):
        counter.merge(64, {"bad_shard": 1, "lost_samples": 32})  # one shard of three lost whole
