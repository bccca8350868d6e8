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


@pytest.mark.slow
def test_deepspeed_two_ranks_train_checkpoint_and_report(tiny_demo, tmp_path):
    out = tmp_path / "run"
    cmd = [
        shutil.which("deepspeed") or sys.exit("deepspeed launcher not on PATH"),
        "--num_gpus", "2", "--master_port", str(free_port()),
        "launchers/train.py", "--config", "configs/demo.yaml",
        f"data.root={tiny_demo}", "data.make_demo=false",
        f"train.output_dir={out}", "train.steps=30", "train.log_every=3", "train.micro_batch_size=8",
        "objectives.mlm_only_steps=0", "objectives.num_candidates=4", "objectives.num_hard=2",
        "model.dropout=0.0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(3, 31, 3))
    first = sum(r["loss"] for r in records[:2]) / 2
    last = sum(r["loss"] for r in records[-2:]) / 2
    assert last < 0.9 * first, [r["loss"] for r in records]
    assert all(r["bad_samples"] == 0 for r in records)
    assert {"rank", "mlm", "iais", "iais_weight", "lr", "grad_norm", "samples_per_s"} <= set(records[-1])

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
