"""The real job: DeepSpeed launches 2 CPU ranks (gloo), trains a few steps, checkpoints, evaluates."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tiny_demo: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        shutil.which("deepspeed") or sys.exit("deepspeed launcher not on PATH"),
        "--num_gpus", "2", "--master_port", str(free_port()),
        "launchers/train.py", "--config", "configs/demo.yaml",
        f"data.root={tiny_demo}", "data.make_demo=false",
        f"train.output_dir={out}", "train.steps=30", "train.log_every=3", "train.micro_batch_size=8",
        "objectives.mlm_only_steps=0", "objectives.num_candidates=4", "objectives.num_hard=2",
        "model.dropout=0.0", *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def losses_fall(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in records[:2]) / 2
    last = sum(r["loss"] for r in records[-2:]) / 2
    assert last < 0.9 * first, [r["loss"] for r in records]
    return records


@pytest.mark.slow
def test_deepspeed_two_ranks_train_checkpoint_and_report(tiny_demo, tmp_path):
    """ZeRO-2 with ITC mining: the 2 hardest negatives of each pair come from both ranks' pairs."""
    out = tmp_path / "run"
    proc = train(tiny_demo, out, "objectives.mining=itc", "model.itc_dim=16", "objectives.itc_weight=0.5")

    records = losses_fall(out)
    assert [r["step"] for r in records] == list(range(3, 31, 3))
    assert all(r["bad_samples"] == 0 for r in records)
    assert {"itm_rank", "itc", "mlm", "iais", "iais_weight", "lr", "grad_norm", "samples_per_s"} <= set(records[-1])

    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step30"
    assert list((ckpt / "step30").glob("*model_states.pt")), list((ckpt / "step30").iterdir())
    assert len(list((ckpt / "step30").glob("*optim_states.pt"))) == 2  # ZeRO-2: one partition per rank
    assert (out / "hf_model" / "model.safetensors").is_file()

    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 16 and report["captions"] == 32
    assert 0 <= report["tr_r1"] <= 100 and report["relation_swap"]["groups"] == 6
    assert "layer3/entropy/S_L" in report["relations"]
    assert "| TR R@1 |" in proc.stdout


@pytest.mark.slow
def test_zero3_fine_tuning_with_hard_negative_groups(tiny_demo, tmp_path):
    """ZeRO-3: 2 groups per micro-batch, each the positive and the 2 hardest of 6 scored candidates,
    IAIS on the positives; the final weights are consolidated into a Hugging Face folder."""
    out = tmp_path / "run"
    train(tiny_demo, out, "train.deepspeed_config=configs/deepspeed/zero3.json", "objectives.anchors_per_batch=2",
          "objectives.num_candidates=6", "objectives.itm_rank_loss=hinge", "objectives.iais.schedule=constant")
    records = losses_fall(out)
    assert records[-1]["iais"] > 0 and records[-1]["iais_weight"] == 1.0
    assert (out / "checkpoints" / "step30" / "COMPLETE").is_file()
    assert len(list((out / "checkpoints" / "step30").glob("*model_states.pt"))) == 2  # partitioned: one per rank
    assert (out / "hf_model" / "model.safetensors").is_file()
    assert json.loads((out / "eval.json").read_text())["images"] == 16


def test_a_step_is_classified_by_deepspeeds_overflow_flag_and_the_loss():
    from iais_scale.engine import classify_step

    assert classify_step(False, True, 1.5, fp16=True) == "ok"
    assert classify_step(False, False, float("nan"), fp16=True) == "overflow"  # the loss-scale warm-up
    assert classify_step(True, False, float("nan"), fp16=True) == "nonfinite"  # a NaN loss is never an overflow
    assert classify_step(False, False, float("nan"), fp16=False) == "nonfinite"  # no scaler: a skip is a fault
    assert classify_step(False, True, float("inf"), fp16=False) == "nonfinite"


@pytest.mark.slow
def test_fp16_loss_scale_overflows_do_not_abort_the_run(tiny_demo, tmp_path):
    """fp16 on 2 CPU ranks: DeepSpeed's scaler starts at 2^16 and skips overflowing steps while it
    lowers its scale; with max_nonfinite_steps=2 the run must still finish, counting them apart."""
    out = tmp_path / "run"
    train(tiny_demo, out, "train.deepspeed_config=configs/deepspeed/zero2_fp16.json", "train.max_nonfinite_steps=2",
          "train.steps=12")
    report = json.loads((out / "eval.json").read_text())
    assert report["overflow_steps"] >= 1 and report["nonfinite_steps"] == 0, report
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert records[-1]["overflow_steps"] == report["overflow_steps"]
