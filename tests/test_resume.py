"""The trainer survives: exact resume after a SIGKILL mid-epoch (ZeRO-2 and ZeRO-3, data workers,
gradient accumulation, bad samples), a save cut short is never resumed from, a signal leaves a
checkpoint that resumes to the uninterrupted run's weights, and the NaN guard on 2 ranks.

One uninterrupted run per ZeRO stage (module fixtures) is the reference of every interrupted one:
the resumed runs must log the very same values at every step after their resume point and end with
the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import (
    ROOT,
    assert_same_weights,
    complete_steps,
    finish,
    free_port,
    log_records,
    one_rank,
    wait_for,
    weights,
)

from iais_scale.engine import lr_lambda

# 96 samples (2 of them damaged) / (2 ranks x 8 pairs x 2 micro-steps): 3 steps per epoch, 4 epochs.
STEPS, STEPS_PER_EPOCH, WARMUP, LR = 12, 3, 4, 1e-3
TIMING = {"samples_per_s", "tokens_per_s", "memory_mb"}  # wall-clock measures: differ between runs


def overrides(demo: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"data.root={demo}", "data.make_demo=false", "data.swap_split=null", "data.num_workers=2",
        "data.max_bad_fraction=0.5", f"train.output_dir={out}", f"train.steps={steps}", "train.log_every=1",
        "train.micro_batch_size=8", "train.grad_accum=2", "train.checkpoint_every=2", "train.keep_checkpoints=3",
        f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}", "objectives.mlm_only_steps=2",
        "objectives.num_candidates=4", "objectives.num_hard=2", "eval.max_images=4", "eval.isd_alignments=[singular]",
        *extra,
    ]


def launch(demo: Path, out: Path, *extra: str, steps: int = STEPS) -> subprocess.Popen:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launchers/train.py",
           "--config", "configs/demo.yaml", *overrides(demo, out, steps, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_same_records(run: Path, reference: Path, after: int, steps: int = STEPS) -> None:
    """The run's last records are steps after+1 .. steps, each logging the reference's values."""
    want = {r["step"]: r for r in log_records(reference)}
    got = log_records(run)[-(steps - after):]
    assert [r["step"] for r in got] == list(range(after + 1, steps + 1)), [r["step"] for r in log_records(run)]
    for r in got:
        w = want[r["step"]]
        assert r.keys() == w.keys(), r["step"]
        for k in r.keys() - TIMING:
            assert r[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9, nan_ok=True), (r["step"], k, r[k], w[k])


def reference_run(demo: Path, out: Path, stage: str) -> Path:
    code, log = finish(launch(demo, out, f"train.deepspeed_config=configs/deepspeed/{stage}.json"))
    assert code == 0, log[-4000:]
    return out


@pytest.fixture(scope="module")
def whole_zero2(damaged_demo, tmp_path_factory) -> Path:
    return reference_run(damaged_demo, tmp_path_factory.mktemp("whole_zero2") / "run", "zero2")


@pytest.fixture(scope="module")
def whole_zero3(damaged_demo, tmp_path_factory) -> Path:
    return reference_run(damaged_demo, tmp_path_factory.mktemp("whole_zero3") / "run", "zero3")


@pytest.mark.slow
def test_the_uninterrupted_run_logs_its_schedule_bad_samples_and_prunes(whole_zero2):
    """What the resume tests compare against: the learning rate of every step is the linear
    warm-up/decay schedule, bad samples are counted (the two damaged ones, once per epoch), and only
    the newest train.keep_checkpoints=3 step checkpoints are kept."""
    records = log_records(whole_zero2)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    f = lr_lambda(WARMUP, STEPS)
    for r in records:  # the rate the next step will use, as the scheduler holds it after step r
        assert r["lr"] == pytest.approx(LR * f(r["step"]), rel=1e-9), r
    assert [round(r["lr"] / LR, 6) for r in records[:WARMUP]] == [0.5, 0.75, 1.0, 1.0]
    assert records[-1]["lr"] == 0.0
    # mlm_only_steps=2: ranking (and IAIS) from step 3 on
    assert all("itm_rank" not in r for r in records[:2]) and all("itm_rank" in r for r in records[2:])
    # Cumulative bad samples over both ranks: each damaged sample once per epoch (4 epochs), none lost.
    assert records[-1]["bad_samples"] == 2 * STEPS // STEPS_PER_EPOCH
    report = json.loads((whole_zero2 / "eval.json").read_text())
    assert report["bad_samples"] == {"bad_json": 2 * STEPS // STEPS_PER_EPOCH}
    assert complete_steps(whole_zero2) == [8, 10, 12]
    assert sorted(p.name for p in (whole_zero2 / "checkpoints").iterdir() if p.is_dir()) == ["step10", "step12", "step8"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_sigkill_mid_epoch_and_a_torn_save_resume_to_the_same_run(request, damaged_demo, tmp_path, stage):
    """SIGKILL after the step-4 checkpoint; then the newest checkpoint is made a save cut short (no
    COMPLETE marker, a stray partial file): --resume auto must take the one before it,
    a mid-epoch checkpoint, and from there log every step and end with the weights of the
    uninterrupted run (data workers, 2 micro-steps per step, dropout, bad samples replayed)."""
    reference = request.getfixturevalue(f"whole_{stage}")
    out = tmp_path / "killed"
    ds = f"train.deepspeed_config=configs/deepspeed/{stage}.json"
    proc = launch(damaged_demo, out, ds)
    wait_for(out / "checkpoints" / "step4" / "COMPLETE", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to save anything more
    proc.wait()
    done = complete_steps(out)
    assert len(done) >= 2 and done[-1] < STEPS, done
    # Its files are intact and loadable: only the missing marker says that the save did not finish.
    torn = out / "checkpoints" / f"step{done[-1]}"
    (torn / "COMPLETE").unlink()
    (torn / "zero_pp_rank_1_mp_rank_00_optim_states.pt.partial").write_bytes(b"\0garbage")
    start = done[-2]
    assert start % STEPS_PER_EPOCH, "the resume point must lie inside an epoch"

    code, log = finish(launch(damaged_demo, out, ds, "--resume", "auto"))
    assert code == 0, log[-4000:]
    assert f"resumed from step {start} " in log, log[-4000:]
    assert "the data stream replays exactly" in log
    assert_same_records(out, reference, after=start)
    assert_same_weights(out, reference)
    report, want = (json.loads((d / "eval.json").read_text()) for d in (out, reference))
    assert report["bad_samples"] == want["bad_samples"] == {"bad_json": 8}  # the counters were restored


@pytest.mark.slow
def test_sigusr1_saves_a_checkpoint_that_resumes_to_the_same_weights(whole_zero2, damaged_demo, tmp_path):
    """SIGUSR1 to one rank, and a second signal (SIGINT, as launchers forward one request twice) to
    the same rank at once: counted once, both ranks stop at the same step and save it, exit 143.
    Resumed to the end, the run logs and ends as the uninterrupted one."""
    out = tmp_path / "run"
    proc = launch(damaged_demo, out, "train.checkpoint_every=0")
    wait_for(out / "train_log.jsonl", proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "--local_rank" in " ".join(p.cmdline()) and "deepspeed.launcher.launch" in " ".join(p.parent().cmdline())]
    assert len(ranks) == 2  # (not their data workers)
    ranks[0].send_signal(signal.SIGUSR1)  # one rank is enough: they agree at the end of the step
    time.sleep(0.2)
    ranks[0].send_signal(signal.SIGINT)  # within the repeat window: the same request, not "exit now"
    code, log = finish(proc)
    assert code == 143, log[-3000:]  # interrupted, not finished: the documented code, passed on by the launcher
    assert "got signal 10; stopping after this step" in log and "got signal 2" not in log, log[-3000:]
    saved = complete_steps(out)
    assert len(saved) == 1 and 0 < saved[0] < STEPS, (saved, log[-3000:])
    assert f"checkpoint {out / 'checkpoints' / f'step{saved[0]}'} saved; stopping (exit code 143)" in log

    code, log = finish(launch(damaged_demo, out, "--resume", "auto", "train.checkpoint_every=0"))
    assert code == 0, log[-3000:]
    assert f"resumed from step {saved[0]} " in log
    assert_same_records(out, whole_zero2, after=saved[0])
    assert_same_weights(out, whole_zero2)


NAN_SCRIPT = r"""
import math, sys, pytest, torch, torch.distributed as dist
from iais_scale import engine, objectives
from iais_scale.config import load_config
from iais_scale.data.pipeline import make_train_stream, train_loader
real = objectives.training_loss
POISON = {}  # step -> ranks whose loss is NaN at that step
def poisoned(model, batch, cfg, *, step, **kw):
    loss, parts = real(model, batch, cfg, step=step, **kw)
    return (loss * float("nan"), parts) if dist.get_rank() in POISON.get(step, ()) else (loss, parts)
engine.training_loss = poisoned
cfg = load_config("configs/demo.yaml", [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
t = engine.Trainer(cfg)
rank = t.rank
t._stream = make_train_stream(cfg.data, t.collator, cfg.train.micro_batch_size, rank, t.world, 0)
batches = iter(train_loader(t._stream, 0))

def fingerprint():  # this rank's full weights, and whether both ranks hold the same
    flat = torch.cat([p.detach().reshape(-1) for p in t.module.parameters()])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    return flat, torch.equal(both[0], both[1])

# 1. Only rank 1's loss is NaN at steps 2 and 3: both ranks skip those updates and stay identical.
POISON.update({2: (1,), 3: (1,)})
changed, norms = [], []
for _ in range(6):
    before, _ = fingerprint()
    norms.append(t.train_step(batches)["grad_norm"])
    after, same = fingerprint()
    assert same, f"rank {rank}: the ranks' weights differ after step {t.step}"
    changed.append(not torch.equal(before, after))
assert changed == [True, True, False, False, True, True], changed
assert t.health.nonfinite_total == 2 and t.health.nonfinite_in_row == 0 and t.step == 6, (t.health.nonfinite_total, t.step)
assert all(torch.isfinite(p).all() for p in t.module.parameters())
print(f"rank {rank}: ONE RANK POISONED OK", norms, flush=True)

# 2. max_nonfinite_steps=3 poisoned steps in a row (rank 0 only) abort at the third, on every rank.
POISON.clear()
POISON.update({s: (0,) for s in range(7, 20)})
t.train_step(batches)  # step 6 -> 7, clean
try:
    for _ in range(10):
        t.train_step(batches)
except RuntimeError as e:
    assert "3 non-finite steps in a row at step 9" in str(e), e
    assert t.health.nonfinite_total == 5, t.health.nonfinite_total
    print(f"rank {rank}: ABORTED OK: {e}", flush=True)
else:
    raise AssertionError("no abort")

# 3. fp16 loss-scale overflows (a finite loss whose update DeepSpeed's scaler skipped) are counted
# apart and never abort, 4 in a row against max_nonfinite_steps=3. DeepSpeed's "not applied" flag
# stands in for the scaler: fp16 kernels are missing on some CPUs (test_train runs the real scaler
# where they exist); the trainer's accounting is tested here on every machine.
POISON.clear()
t.health.fp16, t.health.nonfinite_in_row, before = True, 0, t.health.nonfinite_total
applied = t.engine.was_step_applied
t.engine.was_step_applied = lambda: False
for _ in range(4):  # a skipped update has no gradient norm to log
    assert math.isnan(t.train_step(batches)["grad_norm"])
t.engine.was_step_applied = applied
assert t.health.overflow_total == 4 and t.health.nonfinite_total == before and t.health.nonfinite_in_row == 0, (t.health.overflow_total, t.health.nonfinite_total)
parts = t.train_step(batches)
assert t.health.overflow_total == 4 and math.isfinite(parts["grad_norm"]), parts  # applied again
print(f"rank {rank}: OVERFLOWS COUNTED OK", flush=True)

# 4. The schedule's step: DeepSpeed steps it with applied updates only (optim.schedule_steps=applied);
# with "all" a skipped step moves it too, as the authors' global_step.
t.health.nonfinite_in_row = 0
for mode, moves in (("applied", 0), ("all", 1)):
    t.cfg.optim.schedule_steps = mode
    POISON.update({t.step: (1,)})
    before = t.scheduler.last_epoch
    t.train_step(batches)
    assert not t.engine.was_step_applied() and t.scheduler.last_epoch == before + moves, (mode, before, t.scheduler.last_epoch)
    assert t.scheduler.get_last_lr()[0] == pytest.approx(cfg.optim.lr * engine.lr_lambda(cfg.optim.warmup_steps, cfg.train.steps)(before + moves))
print(f"rank {rank}: SCHEDULE STEPS OK", flush=True)
"""


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_is_skipped_on_both_and_too_many_abort(tiny_demo, tmp_path):
    script = tmp_path / "nan_guard.py"
    script.write_text(NAN_SCRIPT)
    proc = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(script),
         f"data.root={tiny_demo}", "data.make_demo=false", f"train.output_dir={tmp_path / 'run'}",
         "train.micro_batch_size=8", "objectives.mlm_only_steps=0", "objectives.num_candidates=4",
         "objectives.num_hard=2", "train.max_nonfinite_steps=3", "model.dropout=0.0"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("ONE RANK POISONED OK") == 2 and out.count("ABORTED OK") == 2, out[-4000:]
    assert out.count("OVERFLOWS COUNTED OK") == 2 and out.count("SCHEDULE STEPS OK") == 2, out[-4000:]


# --------------------------------------------------------------------------- one rank, no launcher


def resampled(demo: Path, out: Path, *extra: str) -> list[str]:
    """Resampled mode: a 2:1 mixture of the train and val shards, drawn with replacement."""
    return [f"data.root={demo}", "data.make_demo=false", "data.swap_split=null", "data.mode=resampled",
            f"data.sources=[{{path: {demo / 'train'}, weight: 2}}, {{path: {demo / 'val'}, weight: 1}}]",
            "data.num_workers=1", "data.val_split=val", f"train.output_dir={out}", "train.steps=8", "train.log_every=1",
            "train.micro_batch_size=8", "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.eval_every=4",
            "objectives.mlm_only_steps=1", "objectives.num_candidates=4", "objectives.num_hard=2", "eval.max_images=4",
            "eval.isd_alignments=[singular]", *extra]


@pytest.mark.slow
def test_resampled_stream_resumes_from_a_named_checkpoint_and_the_best_is_kept(tiny_demo, tmp_path):
    """Resampled mode, 1 rank with a data worker: a run resumed with ``--resume PATH`` (a step
    checkpoint of another run, in a new output folder) replays the stream and reaches the same step-8
    weights. The first run also keeps the newest 2 step checkpoints only, and with data.val_split and
    eval_every=4 keeps the best validation RSUM in checkpoints/best, whose weights it exports."""
    from iais_scale import checkpoint as ckpt

    first, second = tmp_path / "first", tmp_path / "second"
    code, log = finish(one_rank(*resampled(tiny_demo, first)))
    assert code == 0, log[-4000:]
    assert complete_steps(first) == [6, 8] and (first / "checkpoints" / "best" / "COMPLETE").is_file()
    assert sorted(p.name for p in (first / "checkpoints").iterdir() if p.is_dir()) == ["best", "step6", "step8"]
    history = [json.loads(line) for line in (first / "eval_history.jsonl").read_text().splitlines()]
    assert [(h["split"], h["step"]) for h in history] == [("val", 4), ("val", 8), ("test", 8)]
    best = max(history[:2], key=lambda h: h["rsum"])  # the first of equals: a later one must do better
    report = json.loads((first / "eval.json").read_text())
    assert report["selected_by"] == {"split": "val", "rsum": best["rsum"], "step": best["step"]}
    exported = weights(first)
    selected = ckpt.consolidated_state_dict(first / "checkpoints" / "best")
    assert all(torch.equal(v, selected[k]) for k, v in exported.items())

    code, log = finish(one_rank(*resampled(tiny_demo, second), "--resume", str(first / "checkpoints" / "step6")))
    assert code == 0, log[-4000:]
    assert "resumed from step 6 " in log and "the data stream replays exactly" in log, log[-4000:]
    assert [r["step"] for r in log_records(second)] == [7, 8]
    assert_same_records(second, first, after=6, steps=8)
    a, b = (ckpt.consolidated_state_dict(run / "checkpoints" / "step8") for run in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "{calls}"
echo "scontrol: error: Invalid job id specified" >&2
exit 1
"""


@pytest.mark.slow
def test_sigterm_saves_and_a_failing_requeue_stops_as_interrupted(tiny_demo, tmp_path):
    """SIGTERM (scancel, a time limit) to the rank: it saves the step and exits 143. Resumed under
    SLURM (auto), SIGUSR1 saves and asks ``scontrol requeue``; when scontrol fails, the run says so
    and exits 143 (interrupted) instead of 0 (requeued)."""
    out = tmp_path / "run"
    args = [f"data.root={tiny_demo}", "data.make_demo=false", "data.swap_split=null", f"train.output_dir={out}",
            "train.steps=400", "train.log_every=1", "train.micro_batch_size=8", "objectives.mlm_only_steps=0",
            "objectives.num_candidates=4", "objectives.num_hard=2"]
    proc = one_rank(*args)
    wait_for(out / "train_log.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc, timeout=120)
    assert code == 143, log[-3000:]
    saved = complete_steps(out)
    assert len(saved) == 1 and 0 < saved[0] < 400, saved
    assert "got signal 15; stopping after this step" in log and "saved; stopping (exit code 143)" in log

    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.format(calls=calls))
    (bin_dir / "scontrol").chmod(0o755)
    steps_before = len(log_records(out))
    proc = one_rank(*args, env={"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    deadline = time.time() + 300
    while len(log_records(out)) <= steps_before:  # a step of the resumed run
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    code, log = finish(proc, timeout=120)
    assert code == 143, log[-3000:]
    assert f"resumed from step {saved[0]} " in log, log[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "asking SLURM to requeue job 4242 (scontrol requeue)" in log
    assert "scontrol requeue failed (scontrol: error: Invalid job id specified): stopping as interrupted" in log
    assert len(complete_steps(out)) == 2 and complete_steps(out)[-1] > saved[0]


PREEMPTION_SCRIPT = """
import time
from iais_scale.preemption import Preemption
p = Preemption(0)
p.install()
print("READY", flush=True)
seen = "start"
while True:
    if p.signum != seen:
        seen = p.signum
        print("SIGNUM", seen, p._first_at, flush=True)  # (time.monotonic is one clock for all processes)
    time.sleep(0.02)
"""


def test_repeats_within_five_seconds_count_once_and_a_later_signal_exits_at_once(tmp_path):
    err = tmp_path / "stderr"
    proc = subprocess.Popen([sys.executable, "-c", PREEMPTION_SCRIPT], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=open(err, "w"), text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert proc.stdout.readline().split()[:2] == ["SIGNUM", "None"]
        proc.send_signal(signal.SIGTERM)
        signum, first = proc.stdout.readline().split()[1:]
        assert signum == "15"  # a request: stop after this step
        proc.send_signal(signal.SIGINT)  # a launcher forwarding the same request
        proc.send_signal(signal.SIGUSR1)
        # Timed from the moment the child took the request, not from when this process sent it.
        time.sleep(max(0.0, float(first) + 4.5 - time.monotonic()))
        assert proc.poll() is None  # still running: the repeats were the same request
        time.sleep(max(0.0, float(first) + 5.3 - time.monotonic()))
        proc.send_signal(signal.SIGINT)  # 5 s later: the user insists
        assert proc.wait(timeout=5) == 130
        assert "SIGNUM" not in proc.stdout.read()  # the request never changed
        assert err.read_text().count("got signal") == 1
    finally:
        if proc.poll() is None:
            proc.kill()


EXITING_SCRIPT = """
import os, signal, sys, time
from iais_scale.preemption import EXIT_INTERRUPTED, Preemption, ignore_while_exiting
p = Preemption(0)
p.install()
os.kill(os.getpid(), signal.SIGUSR1)  # the request; the run saves and stops
class SlowDestructor:  # what a rank's exit does after Python has restored the default handlers
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's repeat, arriving in that window
        time.sleep(1.0)
kept = SlowDestructor()
if sys.argv[1] == "ignore":
    ignore_while_exiting()
sys.exit(EXIT_INTERRUPTED)
"""


@pytest.mark.parametrize("exiting", ["ignore", "plain"])
def test_a_repeat_arriving_while_the_rank_exits_keeps_its_exit_code(exiting):
    """The repeat of a stop request can reach a rank after it has saved, while Python tears down
    (where it has put the default handlers back): without ``ignore_while_exiting`` the rank dies by
    SIGINT (the run of the test with "plain" shows that this window is real)."""
    code = subprocess.run([sys.executable, "-c", EXITING_SCRIPT, exiting], cwd=ROOT, timeout=60).returncode
    assert code == (143 if exiting == "ignore" else -signal.SIGINT)


@pytest.mark.slow
def test_too_many_bad_samples_on_one_rank_end_the_whole_job(tiny_demo, tmp_path):
    """A shard whose 32 samples are all damaged: the rank whose ranges hold it most passes
    data.max_bad_fraction first and aborts naming its counts; the other rank, waiting in a
    collective, does not hang: the job fails within a bounded time and no rank is left running."""
    import shutil

    from conftest import damage_json

    data = tmp_path / "demo"
    shutil.copytree(tiny_demo, data)
    damage_json(data / "train" / "shard-000002.tar", [f"train-{i:06d}" for i in range(64, 96)])
    out = tmp_path / "run"
    proc = launch(data, out, "data.max_bad_fraction=0.2", "data.num_workers=0", "train.grad_accum=1",
                  "train.checkpoint_every=0", steps=400)
    code, log = finish(proc, timeout=600)
    # Ended by the abort, not by a hang: no watchdog (124), no collective timeout.
    assert code not in (0, 124) and "no progress for" not in log and "Timed out" not in log, log[-3000:]
    aborts = [line for line in log.splitlines() if "samples were bad" in line and "RuntimeError" in line]
    assert len(aborts) == 1 and "(bad_json: " in aborts[0] and "data.max_bad_fraction" in aborts[0], log[-4000:]
    assert 2 < len(log_records(out)) < 400
    leftover = [p for p in psutil.process_iter(["cmdline"]) if f"train.output_dir={out}" in " ".join(p.info["cmdline"] or [])]
    assert not leftover, leftover
