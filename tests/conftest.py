"""Shared fixtures: a tiny demo data set, made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from iais_scale.data.demo import make_demo

TINY = dict(n_train=96, n_val=8, n_test=16, n_swap_groups=6, shard_size=32)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("tiny_demo") / "demo", seed=1, **TINY)
