"""``python -m data_tools`` demo / verify / stats."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main
from iais_scale.data.format import ShardWriter, encode_json, encode_npy

REPO = Path(__file__).resolve().parents[1]
DEMO_ARGS = ["--n-train", "40", "--n-val", "6", "--n-test", "6", "--n-swap-groups", "3", "--shard-size", "16"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tools") / "demo"
    assert main(["demo", "--out", str(out), "--seed", "1", *DEMO_ARGS]) == 0
    return out


@pytest.fixture
def data(demo_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the demo set to corrupt."""
    return Path(shutil.copytree(demo_dir, tmp_path / "data"))


def _rewrite_member(shard: Path, name: str, edit: Callable[[bytes], bytes | None]) -> None:
    """Rewrite one member of a shard (None drops it), keeping everything else."""
    with tarfile.open(shard) as tf:
        members = [(info, tf.extractfile(info).read()) for info in tf]  # type: ignore[union-attr]
    assert name in {info.name for info, _ in members}
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for info, payload in members:
            new = edit(payload) if info.name == name else payload
            if new is not None:
                info.size = len(new)
                tf.addfile(info, io.BytesIO(new))


def _verify(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["verify", str(path)])
    return rc, capsys.readouterr().out


def test_verify_passes_on_demo(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _verify(demo_dir, capsys)
    assert rc == 0, out
    assert out.splitlines()[-1].startswith("OK: 58 samples in 6 shard(s) of 4 split(s)")
    assert [line.split(":")[0] for line in out.splitlines()[:4]] == ["train", "val", "test", "swap"]
    rc, out = _verify(demo_dir / "val", capsys)  # a single split folder
    assert rc == 0 and "OK: 6 samples" in out


def test_cli_entry_point(demo_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", "verify", str(demo_dir)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "data_tools"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_demo_command_is_idempotent(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (demo_dir / "manifest.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(demo_dir), "--seed", "1", *DEMO_ARGS]) == 0
    assert "train 40, val 6, test 6, swap 6" in capsys.readouterr().out
    assert (demo_dir / "manifest.json").stat().st_mtime_ns == before
    assert main(["demo", "--out", str(demo_dir), "--seed", "2", *DEMO_ARGS]) == 2  # needs --overwrite
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("cut", ["block", "middle"])
def test_verify_fails_on_truncated_shard(data: Path, capsys: pytest.CaptureFixture[str], cut: str) -> None:
    shard = data / "train" / "shard-000001.tar"
    size = shard.stat().st_size
    os.truncate(shard, size // 2 // 512 * 512 if cut == "block" else size // 2 + 100)
    rc, out = _verify(data, capsys)
    assert rc != 0
    assert "train/shard-000001.tar: truncated" in out
    assert "train/shard-000001.tar: sizes.json says 16 samples" in out
    assert out.splitlines()[-1].startswith("FAILED")


def test_verify_fails_on_nan_feature(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def poison(payload: bytes) -> bytes:
        feat = np.load(io.BytesIO(payload)).copy()
        feat[0, 3] = np.nan
        return encode_npy(feat)

    _rewrite_member(data / "val" / "shard-000000.tar", "val-000002.feat.npy", poison)
    rc, out = _verify(data, capsys)
    assert rc != 0
    assert "val/shard-000000.tar:val-000002: feat: contains NaN or inf" in out


def test_verify_fails_on_empty_caption(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def empty(payload: bytes) -> bytes:
        meta = json.loads(payload)
        meta["captions"][1] = " "
        return encode_json(meta)

    _rewrite_member(data / "test" / "shard-000000.tar", "test-000004.json", empty)
    rc, out = _verify(data, capsys)
    assert rc != 0
    assert "test/shard-000000.tar:test-000004: captions[1]: must be a non-empty string" in out


def test_verify_fails_on_missing_json(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _rewrite_member(data / "train" / "shard-000002.tar", "train-000033.json", lambda _: None)
    rc, out = _verify(data, capsys)
    assert rc != 0
    assert "train/shard-000002.tar:train-000033: missing .json" in out


def test_verify_never_unpickles(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    np.save(buf, np.array([Exploit()], dtype=object), allow_pickle=True)
    _rewrite_member(data / "swap" / "shard-000000.tar", "swap-000001.feat.npy", lambda _: buf.getvalue())
    rc, out = _verify(data, capsys)
    assert rc != 0
    assert "swap/shard-000000.tar:swap-000001: ValueError: Object arrays cannot be loaded when allow_pickle=False [bad_npy]" in out
    assert not marker.exists()


def test_verify_fails_on_sizes_mismatch_and_leftover_tmp(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = json.loads((data / "val" / "sizes.json").read_text())
    sizes["shard-000000.tar"] += 1
    (data / "val" / "sizes.json").write_text(json.dumps(sizes))
    (data / "test" / "shard-000001.tar.tmp").write_bytes(b"")
    rc, out = _verify(data, capsys)
    assert rc != 0
    assert "val/shard-000000.tar: sizes.json says 7 samples, found 6" in out
    assert "test/shard-000001.tar.tmp: leftover temporary file" in out


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """Three hand-made samples with known statistics."""
    split = tmp_path / "tiny" / "train"
    with ShardWriter(split, shard_size=2) as w:
        meta = {"image_id": "0", "split": "train", "width": 10, "height": 10}
        regions = {
            "feat": np.zeros((2, 3), np.float32),
            "boxes": np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32),
        }
        w.write("s0", {**meta, "captions": ["a b c", "a b"]}, image=b"not decoded by stats", **regions)
        w.write(
            "s1",
            {**meta, "captions": ["one two three four"]},
            feat=np.ones((5, 3), np.float16),
            boxes=np.zeros((5, 4), np.float32),
        )
        w.write("s2", {**meta, "captions": ["x"]}, image=b"not decoded by stats")
    return split.parent


def test_stats_numbers(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", str(tiny), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats == {
        "train": {
            "shards": 2,
            "samples": 3,
            "captions": 4,
            "caption_words": {"min": 1, "mean": 2.5, "max": 4},
            "regions": {"min": 2, "mean": 3.5, "max": 5},
            "images": 2,
        }
    }
    assert main(["stats", str(tiny)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["split", "shards", "samples", "captions"]
    assert table[1].split() == ["train", "2", "3", "4", "1/2.50/4", "2/3.50/5", "2"]


def test_stats_on_demo(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", str(demo_dir), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert list(stats) == ["train", "val", "test", "swap"]
    assert stats["train"]["samples"] == 40 and stats["train"]["captions"] == 80 and stats["train"]["images"] == 40
    assert stats["swap"]["samples"] == 6 and stats["swap"]["captions"] == 6
    # Captions are "a SIZE COLOUR SHAPE REL a SIZE COLOUR SHAPE"; scenes have 2-4 objects + 1-2 distractors.
    assert stats["val"]["caption_words"]["min"] >= 9 and stats["val"]["caption_words"]["max"] <= 10
    assert stats["train"]["regions"]["min"] >= 3 and stats["train"]["regions"]["max"] <= 6
