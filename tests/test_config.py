"""Experiment configs: every shipped config loads; bad configs fail naming every bad field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iais_scale.config import ConfigError, load_config
from iais_scale.engine import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.steps=700", "objectives.iais.layers=[-1, -2]", "data.swap_split=null"])
    assert cfg.train.steps == 700
    assert cfg.objectives.iais.layers == [-1, -2]
    assert cfg.data.swap_split is None


def test_every_problem_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "train:\n  steps: ten\n  micro_batch: 4\n"
        "objectives:\n  iais:\n    alignment: soft\n    wieght: 2\n"
        "optim:\n  betas: [0.9]\n"
        "colour: red\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    text = str(e.value)
    for field in ("train.steps", "train.micro_batch", "objectives.iais.alignment", "objectives.iais.wieght",
                  "optim.betas", "colour"):
        assert field in text, field
    assert len(e.value.problems) == 6


def test_value_checks(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", ["objectives.num_hard=9", "train.micro_batch_size=4", "train.grad_accum=0"])
    text = str(e.value)
    assert "objectives.num_hard" in text and "objectives.num_candidates" in text and "train.grad_accum" in text
    # ITC mining: an ITC shortlist of num_candidates (no larger than the micro-batch allows), and
    # embeddings that only the ITC loss trains.
    itc = ["objectives.mining=itc", "model.itc_dim=8", "train.micro_batch_size=4", "objectives.itc_weight=1"]
    assert load_config(ROOT / "configs/demo.yaml", [*itc, "objectives.num_candidates=3"]).objectives.num_hard == 3
    with pytest.raises(ConfigError, match=r"objectives.num_candidates: .* at most train.micro_batch_size - 1 = 3"):
        load_config(ROOT / "configs/demo.yaml", [*itc, "objectives.num_candidates=4"])
    with pytest.raises(ConfigError, match="only the ITC loss trains"):
        load_config(ROOT / "configs/demo.yaml", [*itc[:-1], "objectives.num_candidates=3"])


def test_deepspeed_batch_arithmetic(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.micro_batch_size=8", "train.grad_accum=2"])
    ds = deepspeed_config(cfg, world_size=4, grad_accum=2)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    clash = tmp_path / "ds.json"
    clash.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}))
    cfg.train.deepspeed_config = str(clash)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16 contradicts"):
        deepspeed_config(cfg, world_size=4, grad_accum=2)


@pytest.mark.parametrize("path", sorted((ROOT / "configs/deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_parse(path, tmp_path):
    """Every shipped DeepSpeed file is valid for DeepSpeed itself once the batch arithmetic is filled in."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(ROOT / "configs/demo.yaml", [f"train.deepspeed_config={path}"])
    ds = DeepSpeedConfig(deepspeed_config(cfg, world_size=1, grad_accum=1), mpu=None)  # (it assumes 1 process here)
    assert ds.zero_optimization_stage in (1, 2, 3)
    assert ds.train_batch_size == cfg.train.micro_batch_size
