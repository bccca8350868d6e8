"""Shards and checkpoints away from the local disk (issue 13), against real servers on loopback.

The HTTP server is ``tests/http_server.py`` (``http.server`` in a thread, able to cut a transfer
mid-file), the S3 server is moto's ``ThreadedMotoServer``, ``pipe:`` runs ``cat``. Nothing of
iais_scale is mocked. Also here: ``verify``, ``stats`` and the loader on hostile hand-made tars, and
img2dataset output trained as it is.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from http_server import ShardServer
from PIL import Image
from transformers import AutoTokenizer

from data_tools.__main__ import main as data_tools_main
from data_tools.stats import compute_stats
from iais_scale import checkpoint as ckpt
from iais_scale.config import load_config
from iais_scale.data import format as fmt, storage
from iais_scale.data.collate import Collator
from iais_scale.data.demo import make_demo
from iais_scale.data.image_fields import PixelFields, RegionFields
from iais_scale.data.pipeline import (
    IoOptions,
    PairStream,
    ResampledPairStream,
    StreamStart,
    make_train_stream,
    train_loader,
)
from iais_scale.data.samples import BadSample, decode_sample
from iais_scale.data.shards import IAIS_LAYOUT, IMG2DATASET_LAYOUT, LIST_LAYOUT, read_shard, resolve_split
from iais_scale.data.transforms import ImageTransform
from iais_scale.engine import check_inputs

REPO = Path(__file__).resolve().parents[1]
TRAIN_LIST = "shard-{000000..000003}.tar"
N_TRAIN = 120  # four shards of 30


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo data set whose train split is shard-000000..000003 (30 samples each) + sizes.json."""
    root = make_demo(tmp_path_factory.mktemp("remote") / "demo", seed=2, n_train=N_TRAIN, n_val=4, n_test=8,
                     n_swap_groups=2, shard_size=30)
    assert sorted(p.name for p in (root / "train").glob("*.tar")) == [fmt.shard_name(i) for i in range(4)]
    return root


@pytest.fixture(scope="module")
def server(data: Path):
    """Serves the folder holding the data set (and anything the tests put beside it)."""
    with ShardServer(data.parent) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer(data: Path):
    return AutoTokenizer.from_pretrained(str(data / "tokenizer"))


@pytest.fixture(scope="module")
def collator(tokenizer) -> Collator:
    return Collator(tokenizer, 24, RegionFields(8))


def config(*overrides: str):
    return load_config(REPO / "configs" / "demo.yaml",
                       [f"train.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}", *overrides])


def batches(stream, n: int, workers: int = 2) -> list[dict]:
    return list(islice(iter(train_loader(stream, workers)), n))


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    """Equal batch by batch: the same fields, equal tensors, equal keys, positions and counts."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), i
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), (i, k)
            else:
                assert a[k] == b[k], (i, k)


@contextmanager
def deadline(seconds: float):
    """Fail with TimeoutError instead of hanging."""

    def fail(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


# --------------------------------------------------------------------------- HTTP: the same batches


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_url_shard_list_streams_the_same_batches_as_the_folder(data, server, collator, mode):
    url = f"{server.url_of(data / 'train')}/{TRAIN_LIST}"
    assert resolve_split(url).sizes == {f"{server.url_of(data / 'train')}/{fmt.shard_name(i)}": 30 for i in range(4)}

    def stream(spec: str, rank: int):
        common = dict(rank=rank, world_size=2, seed=3, shuffle_buffer=16)
        if mode == "epoch":
            return PairStream(spec, collator, 4, bucket_by_length=rank == 1, **common)  # 15 batches per epoch
        return ResampledPairStream([(spec, 1.0)], collator, 4, epoch_samples=40, **common)

    for rank in range(2):
        local = batches(stream(str(data / "train"), rank), 20)  # into the second epoch, 2 workers
        assert_same_batches(batches(stream(url, rank), 20), local)
        assert all(b["sample_counts"][1] == {} for b in local)


def test_data_root_url_with_sizes_json(data, server, collator):
    cfg = config(f"data.root={server.url_of(data)}", "data.make_demo=false", "data.shuffle_buffer=16",
                 "data.num_workers=2")
    spec = cfg.data.split_spec(cfg.data.train_split)
    assert spec == f"{server.url_of(data)}/train"
    split = resolve_split(spec)  # an HTTP folder cannot be listed: its sizes.json names the shards
    assert (split.layout, split.total, split.urls[0]) == (IAIS_LAYOUT, N_TRAIN, f"{spec}/shard-000000.tar")
    local_data = replace(cfg.data, root=str(data))
    for rank in range(2):
        remote = batches(make_train_stream(cfg.data, collator, 4, rank, 2, seed=0), 18, cfg.data.num_workers)
        local = batches(make_train_stream(local_data, collator, 4, rank, 2, seed=0), 18, cfg.data.num_workers)
        assert_same_batches(remote, local)
    # A split given as a spec of its own (here a URL list) beside a local root.
    own = config(f"data.root={data}", f"data.train_split={server.url_of(data / 'train')}/{TRAIN_LIST}")
    assert own.data.split_spec(own.data.train_split).startswith("http://")
    remote = batches(make_train_stream(own.data, collator, 4, 0, 2, seed=0), 6, 0)
    assert_same_batches(remote, batches(make_train_stream(replace(own.data, train_split="train"), collator, 4, 0, 2, 0), 6, 0))


def test_exact_resume_from_a_url(data, server, collator):
    url = f"{server.url_of(data / 'train')}/{TRAIN_LIST}"
    with storage.open_read(f"{server.url_of(data / 'train')}/shard-000000.tar") as f:
        assert not f.seekable()  # the reader skips by reading headers and discarding bytes

    def run(rank: int, start: int, n: int) -> list[dict]:
        s = PairStream(url, collator, 4, rank=rank, world_size=2, seed=5, shuffle_buffer=16,
                       start=StreamStart(consumed=start))
        return batches(s, n)

    for rank in range(2):
        whole = run(rank, 0, 24)  # 15 batches per epoch: the resume points lie in both epochs
        for k in (7, 16):
            assert_same_batches(run(rank, k, 24 - k), whole[k:])

    def resampled(start: int, n: int) -> list[dict]:
        s = ResampledPairStream([(url, 1.0)], collator, 4, rank=1, world_size=2, seed=5, shuffle_buffer=8,
                                epoch_samples=40, start=StreamStart(consumed=start))
        return batches(s, n)

    assert_same_batches(resampled(7, 5), resampled(0, 12)[7:])


def test_prefetch_opens_only_the_shards_a_worker_reads(data, server, collator):
    """Each rank reads its range of the epoch order; the shard after a range's end is not opened."""
    url = f"{server.url_of(data / 'train')}/{TRAIN_LIST}"
    paths = {f"/{(data / 'train' / fmt.shard_name(i)).relative_to(data.parent).as_posix()}": i for i in range(4)}
    for rank in range(2):
        stream = PairStream(url, collator, 4, rank=rank, world_size=2, seed=8, shuffle_buffer=4)
        before = Counter({p: server.requests[p] for p in paths})
        got = batches(stream, stream.batches_per_epoch, 0)  # one epoch: positions [60r, 60r + 60)
        opened = {paths[p] for p in paths if server.requests[p] > before[p]}
        mine = {int(s.rsplit("-", 1)[1][:6]) for s, _ in stream.epoch_order(0)[2 * rank : 2 * rank + 2]}
        assert opened == mine, (rank, opened, mine)
        assert sum(len(b["keys"]) for b in got) == 60


# --------------------------------------------------------------------------- lists and pipes


def test_brace_and_double_colon_lists(data, server, collator):
    base = server.url_of(data / "train")
    spec = f"{base}/shard-{{000000..000001}}.tar::{base}/shard-{{000002..000003}}.tar"
    split = resolve_split(spec)
    assert split.layout == LIST_LAYOUT and split.urls == [f"{base}/{fmt.shard_name(i)}" for i in range(4)]
    assert split.total == N_TRAIN  # from the sizes.json beside the shards
    local = batches(PairStream(data / "train", collator, 4, rank=1, world_size=2, seed=1), 8)
    assert_same_batches(batches(PairStream(spec, collator, 4, rank=1, world_size=2, seed=1), 8), local)
    with pytest.raises(ValueError, match="twice"):
        resolve_split(f"{base}/shard-000001.tar::{base}/shard-{{000000..000001}}.tar")
    # A shard that is not there (no count in sizes.json, so it is counted): named, and an error the
    # config check reports, as is a server that cannot be reached.
    with pytest.raises(FileNotFoundError, match="shard-000004.tar"):
        resolve_split(f"{base}/shard-{{000003..000004}}.tar")
    with pytest.raises(ValueError, match="cannot count"):
        resolve_split(f"http://127.0.0.1:{_free_port()}/train/shard-000000.tar")


def test_pipe_sources(data, collator, caplog):
    folder = shlex.quote(str(data / "train"))
    spec = f"pipe:cat {folder}/shard-{{000000..000001}}.tar::pipe:cat {folder}/shard-{{000002..000003}}.tar"
    split = resolve_split(spec)
    assert split.urls == [f"pipe:cat {folder}/{fmt.shard_name(i)}" for i in range(4)]
    assert split.total == N_TRAIN  # counted from the headers: no command is derived to find a sizes.json
    for rank in range(2):
        local = batches(PairStream(data / "train", collator, 4, rank=rank, world_size=2, seed=2, shuffle_buffer=16), 20)
        assert_same_batches(batches(PairStream(spec, collator, 4, rank=rank, world_size=2, seed=2, shuffle_buffer=16), 20),
                            local)

    # A rank's range ends inside a shard: the command is stopped before its end. One that fails when
    # its reader goes away (as curl does, exit 23) is no bad shard, and nothing is read twice.
    shard = data / "train" / "shard-000001.tar"
    assert shard.stat().st_size > 1 << 16  # more than a pipe's buffer: the command is still writing
    curl_like = f"pipe:trap '' PIPE; cat {shlex.quote(str(shard))} 2>/dev/null"
    clean = keys(read_shard(str(shard)))
    counts: Counter = Counter()
    with caplog.at_level(logging.WARNING, logger="iais_scale"):
        assert keys(read_shard(curl_like, 3, 8, counts, retries=2, backoff_s=0.01)) == clean[3:8]
        reader = read_shard(curl_like, 0, None, counts, retries=2, backoff_s=0.01)
        assert next(reader)["__key__"] == clean[0]
        reader.close()  # a consumer that stops early
    assert counts == {} and not [r for r in caplog.records if "retry" in r.getMessage()]
    # A command that fails is retried, then counted once.
    assert keys(read_shard("pipe:cat /nonexistent/shard-000000.tar 2>/dev/null", 0, None, counts, retries=1,
                           backoff_s=0.01)) == []
    assert counts == {"bad_shard": 1, "lost_samples": 1}  # (its size unknown: at least one sample)


# --------------------------------------------------------------------------- a server that drops connections


def test_dropped_connection_is_retried_from_the_last_sample(data, server, caplog):
    shard = data / "train" / "shard-000002.tar"
    url = server.url_of(shard)
    clean = list(read_shard(str(shard)))
    path = "/" + shard.relative_to(data.parent).as_posix()
    before = server.requests[path]
    server.drop(shard, 2, fraction=0.5, pause_s=0.3)  # the client reads the first half, then the cut
    counts: Counter = Counter()
    with caplog.at_level(logging.WARNING, logger="iais_scale"):
        got = list(read_shard(url, counts=counts, retries=3, backoff_s=0.01))
    assert keys(got) == keys(clean)  # exactly the clean read: nothing lost, nothing twice
    assert all({k: v for k, v in a.items() if k != "__url__"} == {k: v for k, v in b.items() if k != "__url__"}
               for a, b in zip(got, clean))
    assert counts == {} and server.requests[path] - before == 3
    failed_at = [int(m.group(1)) for r in caplog.records if (m := re.search(r"read failed at sample (\d+)", r.getMessage()))]
    assert len(failed_at) == 2 and 0 < failed_at[0] < len(clean)  # continued after the samples given

    # It keeps failing: one bad_shard, and the complete samples before the damage, once each.
    server.drop(shard, 100, fraction=0.5, pause_s=0.2)
    try:
        counts = Counter()
        got = list(read_shard(url, counts=counts, retries=2, backoff_s=0.01))
        assert counts == {"bad_shard": 1, "lost_samples": 1}
        got = list(read_shard(url, 0, len(clean), counts := Counter(), retries=1, backoff_s=0.01))
        assert counts == {"bad_shard": 1, "lost_samples": len(clean) - len(got)}  # its size known: what it lost
        assert 0 < len(got) < len(clean) and keys(got) == keys(clean)[: len(got)]
    finally:
        server.drop(shard, 0)


def test_stream_through_a_flaky_server(data, server, collator):
    url = f"{server.url_of(data / 'train')}/{TRAIN_LIST}"
    io_opts = IoOptions(retries=3, backoff_s=0.01)
    local = batches(PairStream(data / "train", collator, 4, seed=4, shuffle_buffer=8), 30, 0)
    for i in range(4):  # every shard cut once, mid-file
        server.drop(data / "train" / fmt.shard_name(i), 1, fraction=0.6, pause_s=0.05)
    assert_same_batches(batches(PairStream(url, collator, 4, seed=4, shuffle_buffer=8, io=io_opts), 30, 0), local)

    bad = data / "train" / fmt.shard_name(1)
    server.drop(bad, 1000, fraction=0.3)  # a shard that never comes through
    try:
        got = batches(PairStream(url, collator, 4, seed=4, shuffle_buffer=8, io=replace(io_opts, retries=1)), 30, 0)
    finally:
        server.drop(bad, 0)
    assert all(len(b["keys"]) == 4 for b in got)  # the wrap rule fills the epoch
    counted = Counter()
    for b in got:
        counted.update(b["sample_counts"][1])
    assert set(counted) == {"bad_shard", "lost_samples"} and counted["bad_shard"] >= 1


# --------------------------------------------------------------------------- schemes without their package


def test_scheme_without_its_package_is_a_config_error(data):
    tomllib = pytest.importorskip("tomllib")
    choice = next(((s, p, e) for s, p, e in (("gs", "gcsfs", "gcs"), ("az", "adlfs", "azure"))
                   if importlib.util.find_spec(p) is None), None)
    if choice is None:
        pytest.skip("gcsfs and adlfs are both installed: no scheme lacks its package here")
    scheme, package, extra = choice
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith(package) for dep in extras[extra])  # the extra the message names exists
    hint = f"iais_scale[{extra}]"

    with pytest.raises(storage.MissingHandler, match=package):  # a ValueError, not an ImportError
        storage.read_bytes(f"{scheme}://bucket/data/manifest.json")
    with deadline(60):
        problems = check_inputs(config(f"data.root={scheme}://bucket/data", "data.make_demo=false",
                                       f"train.remote_sync={scheme}://bucket/run"), 2)
    assert any(p.startswith("data: ") and package in p and hint in p for p in problems), problems
    assert any(p.startswith("train.remote_sync: ") and package in p for p in problems), problems
    with deadline(60):
        problems = check_inputs(config(f"data.root={data}", "data.make_demo=false",
                                       f"data.train_split={scheme}://bucket/train/{TRAIN_LIST}"), 2)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"data: {scheme}://bucket/train/shard-000000.tar: ") and hint in problems[0]


# --------------------------------------------------------------------------- S3 (moto's server)


@pytest.fixture(scope="module")
def s3(data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server on loopback (moto), reached through AWS_ENDPOINT_URL; the train
    split uploaded to s3://iais-test/demo/train."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        mp.delenv(var, raising=False)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", str(nowhere))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        fs, _ = storage.filesystem("s3://iais-test")
        fs.mkdir("iais-test")
        assert storage.copy_tree(str(data / "train"), "s3://iais-test/demo/train") == [
            *(fmt.shard_name(i) for i in range(4)), fmt.SIZES_FILE]
        yield "s3://iais-test"
    finally:
        srv.stop()
        mp.undo()


def test_s3_split_streams_the_same_batches(data, s3, collator):
    assert storage.fs_options(f"{s3}/demo/train") == {"endpoint_url": os.environ["AWS_ENDPOINT_URL"],
                                                      "config_kwargs": {"connect_timeout": 60.0, "read_timeout": 60.0}}
    folder = resolve_split(f"{s3}/demo/train")  # listed, sizes from its sizes.json
    assert (folder.layout, folder.total, len(folder.urls)) == (IAIS_LAYOUT, N_TRAIN, 4)
    listed = f"{s3}/demo/train/{TRAIN_LIST}"
    for rank in range(2):
        local = batches(PairStream(data / "train", collator, 4, rank=rank, world_size=2, seed=6, shuffle_buffer=16), 20)
        for spec in (f"{s3}/demo/train", listed):
            assert_same_batches(
                batches(PairStream(spec, collator, 4, rank=rank, world_size=2, seed=6, shuffle_buffer=16), 20), local)
    resumed = PairStream(listed, collator, 4, rank=1, world_size=2, seed=6, shuffle_buffer=16, start=StreamStart(consumed=9))
    assert_same_batches(batches(resumed, 11), local[9:])  # seekable: skipped into by seeking


def _fake_checkpoint(folder: Path) -> Path:
    """A complete-marked checkpoint folder (files of random bytes, one in a sub-folder)."""
    rng = np.random.default_rng(0)
    names = ["mp_rank_00_model_states.pt", "rank00000_state.safetensors", "zero/optim.bin"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(rng.bytes(5000))
    marker = {"step": int(folder.name[4:]), "world_size": 1, "zero_stage": 2, "files": ckpt.file_records(folder, names)}
    (folder / ckpt.COMPLETE).write_text(json.dumps(marker))
    assert ckpt.verify(folder) == []
    return folder


def test_remote_sync_to_s3_and_fetch_back(s3, tmp_path, caplog):
    folder = _fake_checkpoint(tmp_path / "run" / ckpt.CHECKPOINTS / "step6")
    with caplog.at_level(logging.INFO, logger="werkzeug"):  # the S3 server's request log
        target = ckpt.sync_to_remote(folder, f"{s3}/run")
    assert target == f"{s3}/run/step6"
    puts = [m.group(1) for r in caplog.records if (m := re.search(r'"PUT (\S+) HTTP', r.getMessage()))]
    assert sorted(puts) == sorted(f"/iais-test/run/step6/{n}" for n in
                                  ("mp_rank_00_model_states.pt", "rank00000_state.safetensors", "zero/optim.bin",
                                   ckpt.COMPLETE))
    assert puts[-1] == f"/iais-test/run/step6/{ckpt.COMPLETE}"  # the marker last

    # An upload cut short (no COMPLETE) is never taken: a folder URL gives the newest complete one.
    storage.copy_tree(str(_fake_checkpoint(tmp_path / "run" / ckpt.CHECKPOINTS / "step9")), f"{s3}/run/step9",
                      skip=lambda name: name == ckpt.COMPLETE)
    local = ckpt.fetch_remote(f"{s3}/run", tmp_path / "resumed")
    assert local == tmp_path / "resumed" / ckpt.CHECKPOINTS / "step6"
    assert ckpt.verify(local) == []
    assert all((local / n).read_bytes() == (folder / n).read_bytes() for n in ("zero/optim.bin", ckpt.COMPLETE))
    with pytest.raises(FileNotFoundError, match=ckpt.COMPLETE):
        ckpt.fetch_remote(f"{s3}/run/step9", tmp_path / "other")
    # --resume URL: the trainer's candidates are the fetched folder.
    assert ckpt.resume_candidates(f"{s3}/run/step6", tmp_path / "again") == [tmp_path / "again" / ckpt.CHECKPOINTS / "step6"]


# --------------------------------------------------------------------------- hostile and odd tars


def _header(name: str, size: int, kind: bytes = b"0", size_field: bytes | None = None) -> bytes:
    h = bytearray(512)
    h[0:100] = name.encode().ljust(100, b"\0")
    h[100:108], h[108:116], h[116:124] = b"0000444\0", b"0000000\0", b"0000000\0"
    h[124:136] = size_field if size_field is not None else f"{size:011o}\0".encode()
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h)


def _member(name: str, data: bytes, kind: bytes = b"0") -> bytes:
    return _header(name, len(data), kind) + data + bytes(-len(data) % 512)


def _pax(records: dict[str, str]) -> bytes:
    """A PAX extended header: records ``"LEN key=value\\n"``, LEN counting its own digits."""
    out = b""
    for k, v in records.items():
        body = f" {k}={v}\n".encode()
        digits = 1
        while len(str(len(body) + digits)) != digits:
            digits += 1
        out += str(len(body) + digits).encode() + body
    return _member("././@PaxHeader", out, b"x")


def _sample(key: str, i: int, exts=("json", "feat.npy", "boxes.npy")) -> list[tuple[str, bytes]]:
    meta = {"image_id": f"img{i}", "split": "train", "width": 10, "height": 10, "captions": [f"a red circle {i}"]}
    content = {"json": fmt.encode_json(meta), "feat.npy": fmt.encode_npy(np.full((2, 16), i, np.float32)),
               "boxes.npy": fmt.encode_npy(np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32))}
    return [(f"{key}.{ext}", content[ext.lower()]) for ext in exts]


def _tar(*parts, end: bool = True) -> bytes:
    """Members (name, bytes) and raw blocks, then the end-of-archive marker."""
    out = b"".join(p if isinstance(p, bytes) else b"".join(_member(n, d) for n, d in p) for p in parts)
    return out + (bytes(1024) if end else b"")


def _crafted() -> dict[str, bytes]:
    s = [_sample(f"k{i}", i) for i in range(4)]
    dir_member = _member("a.b/", b"", b"5")
    huge = b"\x80" + (1 << 80).to_bytes(11, "big")  # GNU base-256: 2^80 bytes declared
    out = {
        # k1's extensions in capitals: the same sample after lower-casing
        "upper_case_ext": _tar(s[0], _sample("k1", 1, ("JSON", "FEAT.NPY", "Boxes.Npy")), s[2]),
        # k1.json again: a new sample k1 starts, holding only a json (missing_features)
        "repeated_ext": _tar(s[0], s[1], [s[1][0]], s[2]),
        # keys with folders (a dot in a folder is no extension), a folder member, names without KEY.EXT
        "directories": _tar(dir_member, _sample("a.b/k0", 0), [("a.b/noext", b"x"), ("a.b/.hidden", b"x")],
                            _sample("a.b/c/k1", 1), s[2]),
        # cut inside k2's features: k2 never completes
        "truncated_tail": _tar(s[0], s[1], s[2])[: 512 * 14 + 100],
        # all members complete, no end-of-archive marker: the last sample is not known complete
        "no_end_marker": _tar(s[0], s[1], s[2], end=False),
        # a PAX record of length 0 (a reader that trusts it loops forever)
        "pax_length_0": _tar(s[0], s[1], _member("././@PaxHeader", b"0 path=x\n", b"x"), s[2], s[3]),
        "negative_pax_size": _tar(s[0], s[1], _pax({"size": "-512"}), s[2], s[3]),
        "pax_size_beyond_any_file": _tar(s[0], s[1], _pax({"size": "9" * 6000}), s[2], s[3]),
        "negative_base256_size": _tar(s[0], s[1], _header("k2.json", 0, b"0", b"\xff" * 12), s[2], s[3]),
        # a GNU sparse member declaring 2^80 bytes: skipping it must not seek there or read that much
        "gnu_sparse_huge": _tar(s[0], s[1], _header("k2.feat.npy", 0, b"S", huge) + bytes(512), s[2], s[3]),
        "regular_member_huge": _tar(s[0], s[1], _header("k2.feat.npy", 0, b"0", huge) + bytes(512), s[2], s[3]),
    }
    return out


# (samples all readers give, keys the loader cannot use with their reasons, bad_shard)
EXPECTED = {
    "upper_case_ext": (3, {}, 0),
    "repeated_ext": (4, {"k1": "missing_features"}, 0),
    "directories": (3, {}, 0),
    "truncated_tail": (2, {}, 1),
    "no_end_marker": (2, {}, 1),
    "pax_length_0": (1, {}, 1),
    "negative_pax_size": (1, {}, 1),
    "pax_size_beyond_any_file": (1, {}, 1),
    "negative_base256_size": (1, {}, 1),
    "gnu_sparse_huge": (1, {}, 1),
    "regular_member_huge": (1, {}, 1),
    "member_over_the_cap": (3, {"k1": "member_too_large"}, 0),
}
HOSTILE = {"pax_length_0", "negative_pax_size", "pax_size_beyond_any_file", "negative_base256_size", "gnu_sparse_huge",
           "regular_member_huge", "member_over_the_cap"}


def _write_crafted(folder: Path, name: str) -> Path:
    """``folder/name/train/shard-000000.tar`` + a sizes.json (of the clean count: 4)."""
    split = folder / name / "train"
    split.mkdir(parents=True)
    shard = split / fmt.shard_name(0)
    if name == "member_over_the_cap":  # k1's features: 300 MB (a hole: no disk, no time) > the 256 MB cap
        big = 300 << 20
        with open(shard, "wb") as f:
            f.write(_tar(_sample("k0", 0), _sample("k1", 1, ("json",)), end=False))
            f.write(_header("k1.feat.npy", big))
            f.seek(big, 1)
            f.write(_tar(_sample("k1", 1, ("boxes.npy",)), _sample("k2", 2)))
    else:
        shard.write_bytes(_crafted()[name])
    (split / fmt.SIZES_FILE).write_text(json.dumps({shard.name: 4}))
    return split


# verify's lines for a sample that no training mode can use: a loader reason in brackets, or the
# format's "neither an image nor region features" (the loader's missing_features / missing_image).
# Its other per-sample lines (key syntax, a key used twice) are format remarks: the loader uses those.
_UNUSABLE = re.compile(r"train/shard-000000\.tar:(.+?): (?:.*\[\w+\]|neither an image nor region features)$")


def _verify_output(split: Path, capsys) -> tuple[int, Counter, list[str]]:
    """(samples, {key: n} of the samples verify marks unusable, all lines)."""
    data_tools_main(["verify", str(split)])
    lines = capsys.readouterr().out.splitlines()
    summary = next(line for line in lines if line.startswith("train: "))
    samples = int(re.search(r"(\d+) samples", summary).group(1))
    return samples, Counter(m.group(1) for line in lines if (m := _UNUSABLE.match(line))), lines


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_verify_stats_and_loader_agree_on_crafted_shards(name, data, server, collator, capsys):
    split = _write_crafted(data.parent / "crafted", name)
    shard = split / fmt.shard_name(0)
    n, unusable, bad_shard = EXPECTED[name]
    tracemalloc.start()
    try:
        with deadline(30):
            v_samples, v_unusable, lines = _verify_output(split, capsys)
            s_samples = compute_stats(split)[0]["train"]["samples"]
            counts: Counter = Counter()
            raws = list(read_shard(str(shard), counts=counts))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated"  # never the declared size
    assert v_samples == s_samples == len(raws) == n, lines

    loader_bad: Counter = Counter()
    reasons = {}
    for raw in raws:
        try:
            decode_sample(raw, collator.image_fields)
        except BadSample as e:
            loader_bad[raw["__key__"]] += 1
            reasons[raw["__key__"]] = e.reason
    assert v_unusable == loader_bad == Counter(unusable.keys()), lines
    assert reasons == unusable
    assert counts == ({"bad_shard": 1, "lost_samples": 1} if bad_shard else {})
    if bad_shard:
        assert any(line.startswith("train/shard-000000.tar: ") for line in lines)  # the shard's damage named

    # The same through the training stream: its good samples, in order, counted.
    good = [r["__key__"] for r in raws if not _is_bad(r, collator)]
    first = next(iter(PairStream(split, collator, len(good), shuffle_buffer=1)))
    assert first["keys"] == good and first["sample_counts"][0] == len(good)

    # And from a URL: a forward-only stream skips by reading, with the same result; a bad header
    # is not retried (the bytes would be the same).
    if name == "member_over_the_cap":
        return  # 300 MB over loopback HTTP: the local read shows the rule
    url = server.url_of(shard)
    path = "/" + shard.relative_to(data.parent).as_posix()
    counts = Counter()
    with deadline(30):
        remote = list(read_shard(url, counts=counts, retries=2, backoff_s=0.01))
    assert keys(remote) == keys(raws) and counts == ({"bad_shard": 1, "lost_samples": 1} if bad_shard else {})
    if name in HOSTILE and "huge" not in name:
        assert server.requests[path] == 1


def _is_bad(raw: dict, collator: Collator) -> bool:
    try:
        decode_sample(raw, collator.image_fields)
    except BadSample:
        return True
    return False


def test_reading_groups_by_the_documented_rule(data):
    """Key = member path up to the first dot of its file name; extension = the rest, lower-cased."""
    split = _write_crafted(data.parent / "rule", "directories")
    raws = list(read_shard(str(split / fmt.shard_name(0))))
    assert [(r["__key__"], sorted(k for k in r if not k.startswith("__"))) for r in raws] == [
        ("a.b/k0", ["boxes.npy", "feat.npy", "json"]), ("a.b/c/k1", ["boxes.npy", "feat.npy", "json"]),
        ("k2", ["boxes.npy", "feat.npy", "json"])]
    upper = _write_crafted(data.parent / "rule", "upper_case_ext")
    assert sorted(k for k in list(read_shard(str(upper / fmt.shard_name(0))))[1] if not k.startswith("__")) == [
        "boxes.npy", "feat.npy", "json"]


# --------------------------------------------------------------------------- img2dataset output as it is


def _jpeg(width: int, height: int, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, 128)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _img2dataset_folder(folder: Path, shards: int = 2, per_shard: int = 6) -> Path:
    """What ``img2dataset --output_format webdataset`` writes: NNNNN.tar ({key}.jpg/.txt/.json), NNNNN_stats.json."""
    folder.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                meta = {"key": key, "status": "success", "caption": f"a photo {s} {i}", "width": 40 + i, "height": 32}
                for ext, payload in (("jpg", _jpeg(40 + i, 32, 20 * i)), ("txt", f"a photo of thing {s} {i}".encode()),
                                     ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return folder


def test_img2dataset_output_trains_as_it_is(data, server, tokenizer, tmp_path):
    folder = _img2dataset_folder(data.parent / "cc3m")
    url_list = f"{server.url_of(folder)}/{{00000..00001}}.tar"
    assert resolve_split(str(folder)).layout == IMG2DATASET_LAYOUT
    assert resolve_split(url_list).sizes == {f"{server.url_of(folder)}/{s:05d}.tar": 6 for s in range(2)}  # _stats.json
    for spec in (str(folder), url_list):
        cfg = config(f"data.root={tmp_path / 'no-data-set-here'}", "data.make_demo=false", f"data.train_split={spec}",
                     f"data.eval_split={spec}", "data.swap_split=null", f"data.tokenizer={data / 'tokenizer'}",
                     "model.image_input=patches", "model.image_size=32", "model.patch_size=16",
                     "train.micro_batch_size=4", "objectives.num_candidates=3", "objectives.num_hard=1")
        with deadline(60):
            assert check_inputs(cfg, 2) == []  # no manifest, no sizes.json: nothing to add
    assert not any(folder.glob("manifest.json")) and not any(folder.glob(fmt.SIZES_FILE))
    pixels = Collator(tokenizer, 24, PixelFields(ImageTransform(32)))
    for rank in range(2):
        local = batches(PairStream(folder, pixels, 2, rank=rank, world_size=2, seed=1, shuffle_buffer=4), 4)
        assert_same_batches(batches(PairStream(url_list, pixels, 2, rank=rank, world_size=2, seed=1, shuffle_buffer=4), 4),
                            local)
        assert local[0]["pixel_values"].shape == (2, 3, 32, 32) and local[0]["sample_counts"][1] == {}


# --------------------------------------------------------------------------- the trainer, killed and resumed


TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from iais_scale import engine
    from iais_scale.config import load_config
    kill_at, resume = int(sys.argv[1]), sys.argv[2]
    cfg = load_config("configs/demo.yaml", sys.argv[3:])
    if kill_at:  # SIGKILL mid-run, one step after a checkpoint: nothing more is saved
        real = engine.Trainer.train_step
        def train_step(self, batches):
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, batches)
        engine.Trainer.train_step = train_step
    engine.Trainer(cfg, resume).fit()
    print("FINISHED")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_trainer_killed_and_resumed_from_a_url_reaches_the_same_weights(data, server, tmp_path):
    """Single rank, in one process per run (three DeepSpeed launches would not fit the test budget):
    data.root is the HTTP URL (manifest, tokenizer, train/test/swap shards), 2 DataLoader workers."""
    from safetensors.torch import load_file

    def run(out: Path, kill_at: int, resume: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port()), "PYTHONUNBUFFERED": "1"}
        args = [f"data.root={server.url_of(data)}", "data.make_demo=false", "data.num_workers=2",
                f"train.output_dir={out}", "train.steps=18", "train.checkpoint_every=6", "train.keep_checkpoints=5",
                "train.micro_batch_size=8", "train.log_every=1", "train.threads_per_rank=1",
                "objectives.mlm_only_steps=2", "objectives.num_candidates=4", "objectives.num_hard=2"]
        return subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, str(kill_at), resume, *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)

    whole = run(tmp_path / "whole", 0, "none")
    assert "FINISHED" in whole.stdout, whole.stdout[-2000:] + whole.stderr[-3000:]
    killed = run(tmp_path / "killed", 9, "none")  # 15 batches per epoch: killed in epoch 0, resumed into epoch 1
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = sorted(p.parent.name for p in (tmp_path / "killed" / ckpt.CHECKPOINTS).glob("step*/COMPLETE"))
    assert done == ["step6"]
    resumed = run(tmp_path / "killed", 0, "auto")
    assert "FINISHED" in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resumed from step 6" in resumed.stderr and "replays exactly" in resumed.stderr
    a = load_file(tmp_path / "whole" / "hf_model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_a_store_that_never_answers_fails_after_io_timeout_s_and_is_counted(data, tmp_path):
    """A server that accepts a GET and sends nothing: each attempt fails after data.io_timeout_s
    (aiohttp alone would wait 300 s), then the shard is one counted bad_shard."""
    import time

    assert load_config(REPO / "configs" / "demo.yaml", ["data.io_timeout_s=5"]).data.io_timeout_s == 5
    with pytest.raises(Exception, match="data.io_timeout_s: must be a positive finite number"):
        load_config(REPO / "configs" / "demo.yaml", ["data.io_timeout_s=0"])
    with ShardServer(data.parent) as srv:
        shard = data / "train" / fmt.shard_name(0)
        srv.stall(shard)
        counts: Counter = Counter()
        t0 = time.monotonic()
        got = list(read_shard(srv.url_of(shard), 0, 30, counts, retries=1, backoff_s=0.1, timeout_s=1.0))
        took = time.monotonic() - t0
    assert got == [] and counts == {"bad_shard": 1, "lost_samples": 30}
    assert srv.requests[f"/{shard.relative_to(data.parent).as_posix()}"] == 2  # the attempt and its retry
    assert took < 30, took  # (two attempts of 1 s; the server would have waited 60 s)


def test_a_tokenizer_on_a_server_without_listings_loads_by_its_file_names(data, tmp_path):
    """Most web servers list no folders: the tokenizer's files are read by name, into a private
    temporary folder that is removed again."""
    import glob
    import tempfile

    from iais_scale.data.tokenizer import load_tokenizer

    leftovers = set(glob.glob(os.path.join(tempfile.gettempdir(), "iais-tokenizer-*")))
    with ShardServer(data.parent, listings=False) as srv:
        assert storage.listdir(srv.url_of(data / "tokenizer")) is None
        remote = load_tokenizer(srv.url_of(data / "tokenizer"))
        with pytest.raises(FileNotFoundError, match="none of tokenizer.json"):
            load_tokenizer(srv.url_of(data / "train"))
    local = load_tokenizer(data / "tokenizer")
    text = "a small red circle left of a large blue square"
    assert remote(text)["input_ids"] == local(text)["input_ids"] and len(remote) == len(local)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "iais-tokenizer-*"))) == leftovers
