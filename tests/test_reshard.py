"""Resume on another number of ranks: the checkpoint is resharded through DeepSpeed's universal
format (optimizer state carried over exactly) and the interrupted epoch's remaining samples are
split over the new ranks, each trained on once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import ROOT, complete_steps, free_port, wait_for

from iais_scale.data.demo import make_demo

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 4  # 192 training samples, 48 pairs per optimizer step on any world size


@pytest.fixture(scope="module")
def demo192(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("reshard") / "demo", seed=2, n_train=192, n_val=4, n_test=8,
                     n_swap_groups=2, shard_size=32)


def overrides(demo: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [f"data.root={demo}", "data.make_demo=false", "data.swap_split=null", f"train.output_dir={out}",
            f"train.steps={steps}", "train.log_every=1", "train.micro_batch_size=8", "train.global_batch_size=48",
            "train.checkpoint_every=1", "train.keep_checkpoints=20", "train.log_sample_keys=true",
            "objectives.mlm_only_steps=0", "objectives.num_candidates=4", "objectives.num_hard=2",
            "eval.max_images=4", *extra]


def launch(ranks: int, demo: Path, out: Path, steps: int, *extra: str) -> subprocess.Popen:
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "launchers/train.py",
           "--config", "configs/demo.yaml", "--resume", "auto", *overrides(demo, out, steps, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_after(proc: subprocess.Popen, out: Path, step: int) -> int:
    """SIGKILL the whole run once checkpoint ``step`` is complete; the newest complete step then."""
    wait_for(out / "checkpoints" / f"step{step}" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return complete_steps(out)[-1]


def test_resume_on_one_three_then_two_ranks_trains_each_sample_once(demo192, tmp_path):
    """ZeRO-2: 2 ranks (killed), 1 rank (killed), 3 ranks (killed), 2 ranks to the end; every kill
    lands mid-epoch or on a boundary, and every epoch's 192 samples are trained on exactly once."""
    out, steps = tmp_path / "run", 3 * STEPS_PER_EPOCH
    owner: dict[int, int] = {}  # step -> the launch whose record of that step counts (the one that kept it)
    records: list[tuple[int, dict]] = []
    resumed_at = 0
    for i, (ranks, kill_at) in enumerate([(2, 1), (1, 3), (3, 7), (2, None)]):
        proc = launch(ranks, demo192, out, steps)
        if kill_at is None:
            log, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, log[-4000:]
            last = steps
        else:
            last = kill_after(proc, out, kill_at)
            log = proc.stdout.read()
        if i:
            assert f"resumed from step {resumed_at} " in log, log[-4000:]
            assert f"{resumed_at}_universal" in log, log[-4000:]  # resharded (the world size changed)
        for f in (out / "sample_keys").glob("rank*.jsonl"):
            for line in f.read_text().splitlines():
                r = json.loads(line)
                if r["world_size"] == ranks and resumed_at < r["step"] <= last:
                    records.append((i, r))
        for s in range(resumed_at + 1, last + 1):
            owner[s] = i
        resumed_at = last
    assert sorted(owner) == list(range(1, steps + 1))
    kept = [r for i, r in records if owner[r["step"]] == i]
    for epoch in range(3):
        keys = Counter(k for r in kept if epoch * STEPS_PER_EPOCH < r["step"] <= (epoch + 1) * STEPS_PER_EPOCH
                       for k in r["keys"])
        assert len(keys) == 192 and set(keys.values()) == {1}, (epoch, len(keys), keys.most_common(3))
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 4


def run_worker(ranks: int, mode: str, dump: Path, *args: str) -> str:
    proc = subprocess.run(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                           "tests/reshard_worker.py", mode, str(dump), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_resharded_optimizer_state_equals_the_saved_one(demo192, tmp_path, stage):
    """Adam's moments, step counts, the weights and the LR schedule, gathered after a resume on 1 and
    on 3 ranks, equal those gathered right after the 2-rank save (ZeRO-2 and ZeRO-3)."""
    out = tmp_path / "run"
    args = overrides(demo192, out, 10, f"train.deepspeed_config=configs/deepspeed/zero{stage}.json")
    run_worker(2, "save", tmp_path / "saved.pt", *args)
    saved = torch.load(tmp_path / "saved.pt")
    assert saved["adam_steps"] == [2.0] and saved["global_steps"] == 2
    for ranks in (1, 3):
        log = run_worker(ranks, "load", tmp_path / f"loaded{ranks}.pt", *args)
        assert "DUMPED" in log and "step2_universal" in log, log[-3000:]
        loaded = torch.load(tmp_path / f"loaded{ranks}.pt")
        assert loaded.keys() == saved.keys()
        for k, v in saved.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(loaded[k], v), k
            else:
                assert loaded[k] == v, (k, loaded[k], v)
