"""What a user reads: a run logged to a file (a SLURM log, ``> log``) has no progress-bar carriage
returns glued to log lines, lines of sane length, the progress (step/total, ETA) in its log lines,
and no INFO chatter of other libraries."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers import ROOT, finish, free_port, one_rank


@pytest.mark.slow
def test_a_run_logged_to_a_file_reads_line_by_line(tiny_demo, tmp_path):
    out = tmp_path / "run"
    code, log = finish(one_rank(f"data.root={tiny_demo}", "data.make_demo=false", "data.swap_split=null",
                                f"train.output_dir={out}", "train.steps=6", "train.log_every=2",
                                "train.micro_batch_size=8", "objectives.mlm_only_steps=2", "objectives.num_candidates=4",
                                "objectives.num_hard=2", "eval.max_images=4", "data.val_split=val",
                                "train.eval_every=2", "--resume", "none"))
    assert code == 0, log[-3000:]
    assert "\r" not in log, [line for line in log.split("\n") if "\r" in line][:3]
    long = [line for line in log.splitlines() if len(line) > 400]
    assert not long, long[:2]
    progress = [line for line in log.splitlines() if " INFO step " in line]
    assert [line.split(" INFO step ")[1].split()[0] for line in progress] == ["2/6", "4/6", "6/6"], progress
    assert all(" ETA " in line for line in progress), progress
    for chatter in ("Processing zero checkpoint", "Loading checkpoint shards", "[INFO] [", "train:  "):
        assert chatter not in log, chatter
    assert log.count("FutureWarning") <= 1
    assert f"outputs in {out}: train_log.jsonl, eval.json, eval.md, hf_model, tensorboard" in log, log[-2000:]

    # TensorBoard holds the training curves, the model-selection evaluations and the reported one.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "tensorboard").glob("events.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "val/rsum", "eval/rsum", "eval/tr_r1"} <= tags, sorted(tags)


def test_help_is_quick_enough_to_read_as_a_test_of_imports():
    """``--help`` parses before torch, DeepSpeed or transformers are imported (timings belong in a
    benchmark; this checks the imports themselves); the data tools never need them but for
    ``features --backbone``."""
    runs = {"launchers/train.py": "runpy.run_path('launchers/train.py', run_name='__main__')",
            "launchers/evaluate.py": "runpy.run_path('launchers/evaluate.py', run_name='__main__')",
            "data_tools": "runpy.run_module('data_tools', run_name='__main__')"}
    for launcher, run in runs.items():
        code = ("import runpy, sys; sys.argv = ['x', '--help']\n"
                f"try:\n    {run}\nexcept SystemExit:\n    pass\n"
                "heavy = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
                "print('HEAVY', heavy)")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip().endswith("HEAVY []"), (launcher, proc.stdout[-500:], time.monotonic() - t0)


@pytest.mark.slow
def test_errors_in_values_and_files_come_in_one_list_printed_once(tmp_path):
    """Two ranks; a value out of range, missing shards, a missing tokenizer and a missing init_from:
    one list naming all of them, printed once (not once per rank), exit code 2."""

    proc = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launchers/train.py", "--config", "demo",
         f"data.root={tmp_path / 'nowhere'}", "data.make_demo=false", f"train.output_dir={tmp_path / 'run'}",
         "objectives.num_hard=99", f"model.init_from=uniter:{tmp_path / 'uniter-base.pt'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("invalid config:") == 1, out[-3000:]
    for problem in ("objectives.num_hard: must lie in [1, num_candidates=6] (got 99)", "data: ",
                    "data.tokenizer: ", f"model.init_from: {tmp_path / 'uniter-base.pt'} not found"):
        assert problem in out, (problem, out[-3000:])
