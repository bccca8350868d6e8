"""Experiment configs: every shipped config loads; bad configs fail naming every bad field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iais_scale.config import ConfigError, batch_plan, load_config
from iais_scale.engine import deepspeed_config
from iais_scale.model.configuration import MODEL_SIZES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0
    if (cfg.model.init_from or "").startswith("uniter:"):  # spec section 5: UNITER's 2048-d features, <= 100 regions
        assert (cfg.model.region_feature_dim, cfg.data.max_regions) == (2048, 100), path


def _ds(cfg) -> dict:
    return json.loads((ROOT / cfg.train.deepspeed_config).read_text())


def test_itc_mining_recipe_keeps_the_papers_values():
    """Spec section 5 in the ITC-mining variant (the three paper recipes: tests/test_reproduce.py)."""
    cfg = load_config(ROOT / "configs/flickr30k_uniter_base_iais_itc_mining.yaml")
    o, t, opt, i = cfg.objectives, cfg.train, cfg.optim, cfg.objectives.iais
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay, opt.warmup_steps, opt.grad_clip) == (
        5e-5, (0.9, 0.98), 1e-6, 0.01, 500, 2.0)
    assert (t.steps, t.groups_per_step, t.micro_batch_size, o.anchors_per_batch) == (5000, 128, 64, 8)
    assert (o.num_candidates, o.num_hard, o.mining, o.group_kinds) == (63, 31, "itc", "both")
    assert (o.itm_rank_loss, o.margin, o.mlm_weight, o.itc_weight) == ("hinge", 0.2, 0.0, 1.0)
    assert (i.enabled, i.alignment, i.direction, i.layers, i.schedule, i.weight) == (
        True, "singular", "alternate", [-1], "exp", 8.0)
    assert (cfg.model.size, cfg.model.dropout, cfg.model.itc_dim, cfg.model.uniter_itm_init) == ("base", 0.1, 256, "row1")
    assert (cfg.data.max_text_len, cfg.data.max_train_caption_tokens, cfg.data.max_regions) == (62, 60, 100)
    assert _ds(cfg)["fp16"]["enabled"] is True
    # 8 anchors x 2 kinds per micro-step: 128 groups are 1 micro-step on 8 ranks, 8 on 1.
    assert [batch_plan(cfg, w)[0] for w in (1, 2, 8)] == [8, 4, 1]


def test_demo_config_values():
    cfg = load_config(ROOT / "configs/demo.yaml")
    o, t, opt, i = cfg.objectives, cfg.train, cfg.optim, cfg.objectives.iais
    assert (cfg.model.size, cfg.model.dropout, cfg.data.max_text_len, cfg.data.max_regions) == ("tiny", 0.1, 24, 8)
    assert (o.mlm_weight, o.mlm_only_steps, o.itm_rank_loss, o.num_candidates, o.num_hard) == (1.0, 300, "softmax", 6, 3)
    assert (i.enabled, i.alignment, i.direction, i.layers, i.weight, i.schedule) == (
        True, "singular", "alternate", [-1], 1.0, "exp")
    assert (opt.lr, opt.betas, opt.weight_decay, opt.warmup_steps, opt.grad_clip) == (1e-3, (0.9, 0.98), 0.01, 50, 2.0)
    assert (t.steps, t.micro_batch_size, t.grad_accum, t.deepspeed_config) == (
        800, 32, None, "configs/deepspeed/zero2.json")
    assert _ds(cfg)["zero_optimization"]["stage"] == 2 and "fp16" not in _ds(cfg) and "bf16" not in _ds(cfg)


@pytest.mark.parametrize("name, size, middle, ds", [
    ("pretrain_base", "base", 6, "zero2_bf16"),
    ("pretrain_xl_zero3", "xl", 12, "zero3_bf16"),
    ("pretrain_xl_zero3_offload", "xl", 12, "zero3_offload_bf16"),
])
def test_pretraining_config_values(name, size, middle, ds):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    o, t, opt, i, d = cfg.objectives, cfg.train, cfg.optim, cfg.objectives.iais, cfg.data
    assert (cfg.model.size, cfg.model.itc_dim, cfg.model.gradient_checkpointing) == (size, 256, True)
    assert (d.mode, [(s.path, s.weight) for s in d.sources]) == (
        "resampled", [("data/coco/train", 2.0), ("data/vg/train", 1.0), ("data/cc/train", 3.0)])
    assert o.task_mix == {"mlm": 3.0, "itm_rank": 2.0, "mrfr": 2.0, "itc": 1.0}
    assert (o.itm_rank_loss, o.num_candidates, o.num_hard, o.mrfr_weight, o.itc_weight) == ("bce", 1, 1, 1.0, 1.0)
    assert (i.enabled, i.alignment, i.direction, i.layers, i.weight, i.schedule) == (
        True, "singular", "both", [-1, middle], 0.1, "linear")
    # The middle IAIS layer is the middle of the model (spec section 7).
    assert middle == MODEL_SIZES[size][1] // 2
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay, opt.warmup_steps, opt.grad_clip) == (
        1e-4, (0.9, 0.98), 1e-8, 0.01, 10000, 2.0)
    assert (t.steps, t.micro_batch_size * t.grad_accum, t.checkpoint_every, t.eval_every) == (300000, 128, 2000, 10000)
    assert t.deepspeed_config == f"configs/deepspeed/{ds}.json"
    z = _ds(cfg)
    assert z["bf16"]["enabled"] is True and z["zero_optimization"]["stage"] == (3 if size == "xl" else 2)
    offload = z["zero_optimization"].get("offload_optimizer", {}).get("device")
    assert offload == ("cpu" if "offload" in name else None)


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


def test_type_and_value_errors_are_reported_together():
    """A field that fails its type check keeps its default; the value checks of the others still run."""
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", ["train.steps=ten", "objectives.num_hard=9", "train.grad_accum=0"])
    fields = sorted(p.split(":", 1)[0] for p in e.value.problems)
    assert fields == ["objectives.num_hard", "train.grad_accum", "train.steps"], e.value.problems
    text = str(e.value)
    assert "'ten'" in text and "(got 0)" in text and "(got 9)" in text


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


def test_yaml_python_tags_and_overflowing_timeouts_are_config_errors(tmp_path):
    """A config is data: a Python tag in the file or an override is reported (never constructed), and
    a timeout no transport can hold is refused before any rank would overflow on it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['touch /tmp/iais_yaml_ran']\n")
    with pytest.raises(ConfigError, match="not a valid experiment YAML: could not determine a constructor"):
        load_config(bad)
    with pytest.raises(ConfigError, match="train.steps: .* is not a YAML value"):
        load_config(ROOT / "configs/demo.yaml", ["train.steps=!!python/object/apply:os.system ['true']"])
    with pytest.raises(ConfigError, match=r"train.dist_timeout_s: at most 2592000 s, 30 days \(got 1e\+300\)"):
        load_config(ROOT / "configs/demo.yaml", ["train.dist_timeout_s=1e300"])
    with pytest.raises(ConfigError, match="data.io_timeout_s: must be a positive finite number"):
        load_config(ROOT / "configs/demo.yaml", ["data.io_timeout_s=0"])
    assert load_config(ROOT / "configs/demo.yaml", ["train.watchdog_s=86400"]).train.watchdog_s == 86400


def test_a_shortened_demo_needs_one_override():
    """The demo's MLM warm-up is a fraction of its steps: train.steps=60 alone gives a valid run with
    22 warm-up steps; the full demo keeps its 300 of 800; whole numbers are still checked."""
    assert load_config(ROOT / "configs/demo.yaml").objectives.mlm_only_steps == 300
    assert load_config(ROOT / "configs/demo.yaml", ["train.steps=60"]).objectives.mlm_only_steps == 22
    with pytest.raises(ConfigError, match="objectives.mlm_only_steps: must be below train.steps=60"):
        load_config(ROOT / "configs/demo.yaml", ["train.steps=60", "objectives.mlm_only_steps=60"])
    with pytest.raises(ConfigError, match="a whole number of steps, or a fraction of train.steps below 1"):
        load_config(ROOT / "configs/demo.yaml", ["objectives.mlm_only_steps=2.5"])
