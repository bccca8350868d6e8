"""``python -m data_tools karpathy|coco|table|features`` and img2dataset folders in verify / stats."""

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

import data_tools.convert as convert
from data_tools.__main__ import main
from iais_scale.data.format import ShardWriter, decode_npy, sample_key

D = 6  # feature dimension of the test features


# ---------------------------------------------------------------- helpers


def _jpeg(path: Path, size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85)
    return path.read_bytes()


def _samples(root: Path) -> dict[str, dict[str, Any]]:
    """image_id -> {"key", "split", "shard", "json", ext: bytes, ...} of every sample under ``root``."""
    out: dict[str, dict[str, Any]] = {}
    for shard in sorted(root.glob("*/shard-*.tar")):
        groups: dict[str, dict[str, Any]] = {}
        with tarfile.open(shard) as tf:
            for info in tf:
                key, ext = info.name.split(".", 1)
                groups.setdefault(key, {"key": key, "split": shard.parent.name, "shard": shard.name})
                groups[key][ext] = tf.extractfile(info).read()  # type: ignore[union-attr]
        for sample in groups.values():
            sample["json"] = json.loads(sample["json"])
            out[sample["json"]["image_id"]] = sample
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _verify_ok(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    rc = main(["verify", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def _skipped(root: Path, split: str) -> dict[str, Any]:
    return json.loads((root / split / "skipped.json").read_text())


# ---------------------------------------------------------------- a miniature Flickr30k


@pytest.fixture(scope="module")
def flickr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dataset_flickr30k.json, flickr30k-images/ with real JPEGs and features/ with BUTD-style .npz.

    1000-1002 train (1002 from restval), 1003 + 1007 val, 1004 test; 1001 has an
    empty caption, 1005's JPEG is truncated, 1006 is missing (image and features);
    1003's features hold a NaN.
    """
    root = tmp_path_factory.mktemp("flickr")
    images = root / "flickr30k-images"
    splits = {
        1000: "train",
        1001: "train",
        1002: "restval",
        1003: "val",
        1004: "test",
        1005: "train",
        1006: "train",
        1007: "val",
    }
    entries = []
    rng = np.random.default_rng(0)
    for i, (n, split) in enumerate(splits.items()):
        size = (40 + 2 * i, 30 + i)
        if n != 1006:
            data = _jpeg(images / f"{n}.jpg", size, seed=n)
            if n == 1005:
                (images / f"{n}.jpg").write_bytes(data[: len(data) // 2])
        raw = [f"image {n} caption {j} " for j in range(3)]
        if n == 1001:
            raw[1] = "   "
        entries.append(
            {
                "filename": f"{n}.jpg",
                "imgid": i,
                "split": split,
                "sentids": [3 * i + j for j in range(3)],
                "sentences": [
                    {"raw": r, "tokens": r.split(), "imgid": i, "sentid": 3 * i + j} for j, r in enumerate(raw)
                ],
            }
        )
        feats = root / "features"
        feats.mkdir(exist_ok=True)
        n_regions = 3 + i % 2
        feat = rng.normal(size=(n_regions, D)).astype(np.float32)
        boxes = np.array([[0, 0, size[0] / 2, size[1] / 2]] * n_regions, dtype=np.float32)
        if n == 1003:
            feat[1, 2] = np.nan
        if n == 1006:
            continue  # neither image nor features
        if n == 1000:  # bottom-up-attention.pytorch names, features stored [D, n]
            np.savez(feats / f"{n}.npz", x=feat.T, bbox=boxes, w=size[0], h=size[1], num_bbox=n_regions)
        elif n == 1002:  # extracted on a copy twice as large: boxes are rescaled
            np.savez_compressed(
                feats / f"{n}.npz", features=feat, boxes=2 * boxes, image_w=2 * size[0], image_h=2 * size[1]
            )
        else:
            np.savez(feats / f"{n}.npz", features=feat, boxes=boxes, image_w=size[0], image_h=size[1])
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return root


def _karpathy(flickr: Path, out: Path, *extra: str) -> int:
    args = ["karpathy", "--json", str(flickr / "dataset_flickr30k.json"), "--images", str(flickr / "flickr30k-images")]
    return main([*args, "--out", str(out), "--shard-size", "2", *extra])


def test_karpathy_passes_jpegs_through_and_lists_bad_inputs(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _karpathy(flickr, out) == 0
    summary = capsys.readouterr().out
    assert "missing_image: 1 (sample skipped)" in summary
    assert "unreadable_image: 1 (sample skipped)" in summary
    assert "empty_caption: 1 (caption dropped)" in summary

    samples = _samples(out)
    assert {i: s["split"] for i, s in samples.items()} == {
        "1000": "train", "1001": "train", "1002": "train", "1003": "val", "1004": "test", "1007": "val"
    }  # fmt: skip
    for image_id, s in samples.items():
        original = (flickr / "flickr30k-images" / f"{image_id}.jpg").read_bytes()
        assert s["jpg"] == original  # the file's own bytes, not re-encoded
        with Image.open(io.BytesIO(original)) as img:
            assert (s["json"]["width"], s["json"]["height"]) == img.size
        assert set(s) == {"key", "split", "shard", "json", "jpg"}
    assert samples["1001"]["json"]["captions"] == ["image 1001 caption 0", "image 1001 caption 2"]
    assert samples["1000"]["json"]["captions"] == [f"image 1000 caption {j}" for j in range(3)]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "iais_scale-shards-v1" and manifest["generator"] == "karpathy"
    assert manifest["feature_dim"] is None
    assert manifest["splits"] == {"train": 3, "val": 2, "test": 1}
    assert manifest["skipped"]["train"] == {"missing_image": 1, "unreadable_image": 1, "empty_caption": 1}
    skipped = _skipped(out, "train")
    assert skipped["counts"] == {"missing_image": 1, "unreadable_image": 1, "empty_caption": 1}
    by_reason = {i["reason"]: i for i in skipped["items"]}
    assert by_reason["missing_image"]["image_id"] == "1006"
    assert by_reason["missing_image"]["input"].endswith("flickr30k-images/1006.jpg")
    assert (
        by_reason["unreadable_image"]["image_id"] == "1005" and "truncated" in by_reason["unreadable_image"]["detail"]
    )
    assert by_reason["empty_caption"]["image_id"] == "1001"
    assert _skipped(out, "val") == {"counts": {}, "items": []}
    assert not list(out.rglob("progress.jsonl")) and not list(out.rglob("*.tmp"))
    assert json.loads((out / "train" / "sizes.json").read_text()) == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    _verify_ok(out, capsys)

    # Same command again: nothing to do. Other parameters: refused without --overwrite.
    assert _karpathy(flickr, out) == 0 and "nothing to do" in capsys.readouterr().out
    assert _karpathy(flickr, out, "--restval-to", "keep") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _karpathy(flickr, out, "--restval-to", "keep", "--overwrite") == 0
    assert json.loads((out / "manifest.json").read_text())["splits"] == {"train": 2, "val": 2, "test": 1, "restval": 1}
    _verify_ok(out, capsys)
    assert _karpathy(flickr, out, "--overwrite") == 0
    assert not (out / "restval").exists()  # the split of the replaced conversion is gone


def test_a_folder_holding_shards_of_another_tool_is_refused_every_time(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shards the converter did not write: refused without --overwrite, on the second try as on the
    first, with nothing written or deleted (the first refusal once left a progress log behind, and the
    second run took the folder for its own)."""
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    for i in range(8):
        (out / "train" / f"shard-{i:06d}.tar").write_bytes(b"not ours %d" % i)
    before = _tree(out)
    for _ in range(2):
        assert _karpathy(flickr, out) == 2
        assert "holds files this converter did not write (shard-000000.tar" in capsys.readouterr().err
        assert _tree(out) == before
        assert sorted(p.name for p in (out / "train").iterdir()) == [f"shard-{i:06d}.tar" for i in range(8)]


def test_karpathy_with_features(flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _karpathy(flickr, out, "--features", str(flickr / "features"), "--feature-dtype", "float16") == 0
    summary = capsys.readouterr().out
    assert "bad_features: 1 (sample skipped)" in summary
    assert json.loads((out / "manifest.json").read_text())["feature_dim"] == D
    skipped = _skipped(out, "val")
    assert skipped["counts"] == {"bad_features": 1}
    assert skipped["items"][0]["image_id"] == "1003" and "NaN" in skipped["items"][0]["detail"]
    assert skipped["items"][0]["input"].endswith("1003.npz")

    samples = _samples(out)
    assert sorted(samples) == ["1000", "1001", "1002", "1004", "1007"]
    for image_id, s in samples.items():
        feat, boxes = decode_npy(s["feat.npy"]), decode_npy(s["boxes.npy"])
        assert feat.dtype == np.float16 and feat.shape[1] == D and boxes.shape == (feat.shape[0], 4)
        with np.load(flickr / "features" / f"{image_id}.npz") as z:
            source = z["x"].T if "x" in z.files else z["features"]
        np.testing.assert_array_equal(feat, source.astype(np.float16))
        # Boxes in the stored image's pixels, also for 1002's features from a 2x copy.
        np.testing.assert_allclose(boxes[0], [0, 0, s["json"]["width"] / 2, s["json"]["height"] / 2])
    _verify_ok(out, capsys)


def test_features_only_from_karpathy_json(flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["features", "--dir", str(flickr / "features"), "--captions", str(flickr / "dataset_flickr30k.json")]
    assert main([*args, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"] == "features" and manifest["feature_dim"] == D
    samples = _samples(out)
    # No images needed: 1005 (truncated JPEG) is fine here; 1003 has NaN features, 1006 has none.
    assert sorted(samples) == ["1000", "1001", "1002", "1004", "1005", "1007"]
    assert all("jpg" not in s and "feat.npy" in s for s in samples.values())
    assert samples["1002"]["json"]["width"] == 2 * samples["1000"]["json"]["width"] + 8  # its npz size, 2 x (40 + 4)
    assert _skipped(out, "train")["counts"] == {"missing_features": 1, "empty_caption": 1}
    _verify_ok(out, capsys)


def test_seed_gives_deterministic_order(flickr: Path, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert _karpathy(flickr, tmp_path / name, "--seed", seed, "--shard-size", "10") == 0
        runs[name] = _tree(tmp_path / name)
    assert runs["a"] == runs["b"]
    order = {
        name: [s["json"]["image_id"] for s in sorted(_samples(tmp_path / name).values(), key=lambda s: s["key"])]
        for name in ("a", "c")
    }
    assert sorted(order["a"]) == sorted(order["c"]) and order["a"] != order["c"]


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("split", "last", "limits"),
    [("train", 1, ("--shard-size", "1")), ("val", 0, ("--shard-size", "100", "--max-shard-bytes", "8K"))],
)
def test_killed_conversion_resumes_to_identical_output(
    flickr: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    split: str,
    last: int,
    limits: tuple[str, ...],
) -> None:
    extra = ("--features", str(flickr / "features"), *limits)
    assert _karpathy(flickr, tmp_path / "whole", *extra) == 0

    class Killed(BaseException):  # like KeyboardInterrupt: not an Exception the converters could catch
        pass

    def kill(at_split: str, name: str) -> None:
        if (at_split, name) == (split, f"shard-{last:06d}.tar"):
            raise Killed

    out = tmp_path / "resumed"
    monkeypatch.setattr(convert, "_after_shard", kill)
    with pytest.raises(Killed):
        _karpathy(flickr, out, *extra)
    monkeypatch.undo()
    folder = out / split
    done_names = [f"shard-{i:06d}.tar" for i in range(last + 1)]
    assert sorted(p.name for p in folder.iterdir()) == ["progress.jsonl", *done_names]
    assert not (out / "manifest.json").exists()
    # Complete shards, of this split and of the splits before it: the rerun must leave them alone.
    done = {p: p.stat() for p in sorted(out.glob("*/shard-*.tar"))}
    # What a SIGKILL could leave besides: a half-written next shard and a shard renamed but not yet logged.
    nxt = f"shard-{last + 1:06d}.tar"
    (folder / f"{nxt}.tmp").write_bytes(b"partial")
    (folder / nxt).write_bytes(b"renamed, not logged")
    with (folder / "progress.jsonl").open("a") as f:
        f.write('{"shard": "shard-0000')  # torn line

    assert _karpathy(flickr, out, *extra, "--workers", "2") == 0  # worker count does not change the output
    assert sorted(p.name for p in done if p.parent == folder) == done_names
    for path, st in done.items():
        now = path.stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{path} was rewritten"
    assert _tree(out) == _tree(tmp_path / "whole")
    _verify_ok(out, capsys)


def test_shard_writer_resume_keeps_listed_shards(tmp_path: Path) -> None:
    out = tmp_path / "train"
    meta = {"image_id": "x", "split": "train", "width": 4, "height": 4, "captions": ["c"]}
    done: list[tuple[str, int]] = []
    with ShardWriter(out, shard_size=2, on_shard_done=lambda n, c: done.append((n, c))) as w:
        for i in range(5):
            w.write(sample_key("train", i), meta, image=b"img")
    assert done == [("shard-000000.tar", 2), ("shard-000001.tar", 2), ("shard-000002.tar", 1)]
    first = (out / "shard-000000.tar").read_bytes()
    (out / "shard-000003.tar.tmp").write_bytes(b"x")
    w = ShardWriter(out, shard_size=2, resume={"shard-000000.tar": 2})
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    assert w.n_samples == 2
    w.write(sample_key("train", w.n_samples), meta, image=b"img")
    assert w.close() == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    assert (out / "shard-000000.tar").read_bytes() == first
    with pytest.raises(ValueError, match="resume"):
        ShardWriter(out, resume={"shard-000001.tar": 1})


# ---------------------------------------------------------------- COCO


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    images, annotations = [], []
    for i, image_id in enumerate((391895, 522418, 184613, 318219)):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        size = (50 + i, 36)
        _jpeg(root / "val2014" / name, size, seed=i)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1], "license": 1})
        if image_id != 318219:  # an image without captions
            annotations += [
                {"id": 10 * i + j, "image_id": image_id, "caption": f"coco {image_id} #{j}"} for j in range(2 + i)
            ]
    annotations.append({"id": 999, "image_id": 1, "caption": "of an image that is not listed"})
    (root / "captions_val2014.json").write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return root


def test_coco(coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["coco", "--captions", str(coco / "captions_val2014.json"), "--images", str(coco / "val2014")]
    assert main([*args, "--out", str(out), "--shard-size", "2", "--workers", "2"]) == 0
    samples = _samples(out)
    assert {s["split"] for s in samples.values()} == {"val"}  # from the file name
    assert samples["COCO_val2014_000000184613"]["json"]["captions"] == [f"coco 184613 #{j}" for j in range(4)]
    assert samples["COCO_val2014_000000391895"]["jpg"] == (coco / "val2014/COCO_val2014_000000391895.jpg").read_bytes()
    assert _skipped(out, "val")["counts"] == {"no_captions": 1, "unknown_image": 1}
    _verify_ok(out, capsys)
    assert main([*args, "--out", str(tmp_path / "test"), "--split", "test"]) == 0
    assert json.loads((tmp_path / "test" / "manifest.json").read_text())["splits"] == {"test": 3}


# ---------------------------------------------------------------- tables


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("table")
    for i in range(8):
        _jpeg(root / "img" / f"{i:03d}.jpg", (24 + i, 20), seed=100 + i)
    Image.new("RGB", (10, 12), (1, 2, 3)).save(root / "img" / "png.png")
    Image.new("P", (9, 7)).save(root / "img" / "anim.gif")
    return root


def test_table_parquet_merges_rows(table_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        ("img/000.jpg", "a first caption", "train", "007"),
        ("img/001.jpg", ["two", "captions in a list"], "train", "1"),
        ("img/000.jpg", "a second caption", "val", "007"),  # conflicting split: stays in train
        (str(table_dir / "img" / "002.jpg"), "absolute path", "val", "2"),
        ("img/png.png", "a png", "test", "3"),
        ("img/anim.gif", "a gif", "test", "4"),
        ("img/missing.jpg", "not there", "test", "5"),
        ("img/003.jpg", "", "test", "6"),
        ("img/004.jpg", "weird split", "no/slash", "8"),
    ]
    table = pa.table(
        {
            "path": [r[0] for r in rows],
            "text": pa.array([r[1] if isinstance(r[1], list) else [r[1]] for r in rows], pa.list_(pa.string())),
            "split": [r[2] for r in rows],
            "uid": [r[3] for r in rows],
        }
    )
    pq.write_table(table, table_dir / "pairs.parquet")
    out = tmp_path / "out"
    args = ["table", "--input", str(table_dir / "pairs.parquet"), "--image-col", "path", "--caption-col", "text"]
    assert main([*args, "--split-col", "split", "--id-col", "uid", "--out", str(out)]) == 0
    samples = _samples(out)
    assert sorted(samples) == ["007", "1", "2", "3", "4"]
    assert samples["007"]["json"]["captions"] == ["a first caption", "a second caption"]
    assert samples["007"]["split"] == "train"
    assert samples["1"]["json"]["captions"] == ["two", "captions in a list"]
    assert samples["3"]["png"] == (table_dir / "img" / "png.png").read_bytes()
    assert "png" in samples["4"] and "gif" not in samples["4"]  # re-encoded, listed
    assert _skipped(out, "train")["counts"] == {"split_conflict": 1}
    assert _skipped(out, "test")["counts"] == {
        "missing_image": 1,
        "no_captions": 1,
        "empty_caption": 1,
        "reencoded_image": 1,
    }
    assert json.loads((out / "skipped.json").read_text())["counts"] == {"bad_split": 1}
    _verify_ok(out, capsys)


def test_table_csv_hash_splits(table_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = ["file,caption"] + [f"img/{i:03d}.jpg,caption of {i}" for i in range(8)] + ['img/000.jpg,"another, for 0"']
    (table_dir / "pairs.csv").write_text("\n".join(lines) + "\n")
    args = ["table", "--input", str(table_dir / "pairs.csv"), "--image-col", "file", "--caption-col", "caption"]
    splits = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        extra = ["--val-fraction", "0.25", "--test-fraction", "0.25", "--seed", seed, "--shard-size", "3"]
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
        splits[name] = {i: s["split"] for i, s in _samples(tmp_path / name).items()}
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert len(splits["a"]) == 8 and set(splits["a"].values()) <= {"train", "val", "test"}
    assert splits["a"] != splits["c"]  # another seed, another assignment
    assert _samples(tmp_path / "a")["img/000.jpg"]["json"]["captions"] == ["caption of 0", "another, for 0"]
    _verify_ok(tmp_path / "a", capsys)


def test_table_errors_are_reported(table_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (table_dir / "rows.jsonl").write_text('{"image": "img/005.jpg", "caption": "x"}\n')
    args = ["table", "--input", str(table_dir / "rows.jsonl"), "--image-col", "image", "--caption-col", "text"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "no column(s) ['text']" in capsys.readouterr().err


# ---------------------------------------------------------------- img2dataset folders


def _img2dataset_shard(folder: Path, shard: int, captions: list[str]) -> None:
    """What img2dataset writes: {key}.jpg/.txt/.json in a tar, plus {shard}_stats.json and a parquet."""
    from webdataset import TarWriter

    folder.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(folder / f"{shard:05d}.tar")) as tw:
        for i, caption in enumerate(captions):
            key = f"{shard:05d}{i:04d}"
            jpg = _jpeg(folder / "src.jpg", (32, 24), seed=i)
            meta = {"url": f"http://x/{i}.jpg", "caption": caption, "key": key, "status": "success",
                    "error_message": None, "width": 32, "height": 24, "original_width": 640,
                    "original_height": 480, "exif": None, "sha256": hashlib.sha256(jpg).hexdigest(), "extra": float("nan")}  # fmt: skip
            tw.write({"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps(meta, indent=4)})
    (folder / "src.jpg").unlink()
    stats = {"count": len(captions) + 1, "successes": len(captions), "failed_to_download": 1, "failed_to_resize": 0}
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")


def test_img2dataset_folder_verifies_and_has_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "cc"
    _img2dataset_shard(folder, 0, ["a photo of a dog", "two cats on a sofa"])
    _img2dataset_shard(folder, 1, ["a red car"])
    out = _verify_ok(folder, capsys)
    assert "img2dataset layout" in out and "OK: 3 samples in 2 shard(s) of 1 split(s)" in out
    assert main(["stats", str(folder), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["cc"]["samples"] == 3 and stats["cc"]["captions"] == 3 and stats["cc"]["layout"] == "img2dataset"
    assert stats["cc"]["caption_words"] == {"min": 3, "mean": 13 / 3, "max": 5}
    assert main(["stats", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "img2dataset"

    # A wrong count in _stats.json and an empty caption are problems.
    (folder / "00001_stats.json").write_text(json.dumps({"successes": 2}))
    _img2dataset_shard(tmp_path / "bad", 0, ["fine", " "])
    (folder / "00002.tar").write_bytes((tmp_path / "bad" / "00000.tar").read_bytes())
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "cc/00001.tar: its _stats.json says 2 samples, found 1" in out
    assert "cc/00002.tar:000000001: missing or empty caption (.txt) [missing_caption]" in out
