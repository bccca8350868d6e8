"""Shared fixtures: a tiny demo data set, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from iais_scale.data.demo import make_demo

TINY = dict(n_train=96, n_val=8, n_test=16, n_swap_groups=6, shard_size=32)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("tiny_demo") / "demo", seed=1, **TINY)


def damage_json(shard: Path, keys: list[str]) -> None:
    """Rewrite a shard with the JSON of samples ``keys`` torn (each then a counted ``bad_json`` sample)."""
    import io
    import tarfile

    members = []
    with tarfile.open(shard) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            if info.name.rsplit(".", 1)[0] in keys and info.name.endswith(".json"):
                data = b'{"captions": ["torn'
            info.size = len(data)
            members.append((info, data))
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def damaged_demo(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo with two damaged training samples: skipped and counted as bad, never fatal."""
    import shutil

    root = tmp_path_factory.mktemp("damaged_demo") / "demo"
    shutil.copytree(tiny_demo, root)
    damage_json(root / "train" / "shard-000001.tar", ["train-000040", "train-000057"])
    return root


@pytest.fixture(autouse=True)
def _no_leaked_shm():
    """DeepSpeed's CPU all-reduce buffers that a killed or in-process run of a test left in /dev/shm
    (the trainer unlinks its own): removed after the test, or a long suite fills the RAM disk."""
    import glob
    import os

    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        try:
            os.unlink(path)
        except OSError:
            pass
