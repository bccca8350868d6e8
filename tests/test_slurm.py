"""launchers/slurm.sh on a real (one-host, two emulated nodes) SLURM, and DeepSpeed's --no_ssh multi-node form.

The cluster comes from tests/slurm_cluster.py (apt-installs SLURM when missing; needs root). Each job
runs the tiny demo on 2 nodes x 1 CPU rank (gloo), so the world size is 2 and the ranks rendezvous
through MASTER_ADDR=n1 exactly as on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_weights, free_port, log_records
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "launchers/slurm.sh"

pytestmark = pytest.mark.slow


def tiny_overrides(demo: Path, out: Path, steps: int) -> list[str]:
    return [
        f"data.root={demo}", "data.make_demo=false", f"train.output_dir={out}", f"train.steps={steps}",
        "train.log_every=5", "train.micro_batch_size=8", "objectives.mlm_only_steps=0",
        "objectives.num_candidates=4", "objectives.num_hard=2",
    ]


def submit(cluster: SlurmCluster, tmp: Path, *train_args: str, env: dict | None = None) -> tuple[str, Path]:
    """sbatch slurm.sh on both nodes, one CPU rank each; returns (job id, its output file)."""
    job = cluster.sbatch(
        ["--nodes=2", "--gpus-per-node=0", "--time=00:20:00", f"--output={tmp}/%x-%j.out",
         SCRIPT, "configs/demo.yaml", *train_args],
        cwd=ROOT, env={"PYTHONUNBUFFERED": "1", **(env or {})},
    )
    return job, tmp / f"iais-{job}.out"


def describe(cluster: SlurmCluster, job: str, out: Path) -> str:
    text = out.read_text(errors="replace") if out.exists() else "(no job output)"
    return f"job {job}: {cluster.job(job)}\n--- job output ---\n{text[-6000:]}\n--- daemons ---\n{cluster.logs(1500)}"


STEPS = 150  # the demo job and the preempted one (the same run, so their weights must agree); long enough
# that USR1, sent at the first record (step 5), reaches the ranks mid-run on a fast machine too


@pytest.fixture(scope="module")
def demo_job(slurm_cluster, tiny_demo, tmp_path_factory):  # noqa: F811
    """The uninterrupted job: (job id, its output file, its run folder)."""
    tmp = tmp_path_factory.mktemp("slurm_demo")
    run = tmp / "run"
    t0 = time.monotonic()
    job, out = submit(slurm_cluster, tmp, *tiny_overrides(tiny_demo, run, steps=STEPS))
    info = slurm_cluster.wait(job, timeout=600)
    print(f"demo job {job}: {info['JobState']} in {time.monotonic() - t0:.0f} s")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), describe(slurm_cluster, job, out)
    return job, out, run


def test_sbatch_demo_on_two_nodes(demo_job):
    job, out, run = demo_job
    log = out.read_text()
    assert "nodes (2): n1 n2" in log and "rendezvous n1:" in log and "world size 2" in log, log[:3000]
    assert "slurm.sh[node 0" in log and "slurm.sh[node 1" in log, log[-3000:]
    records = log_records(run)
    assert [r["step"] for r in records] == list(range(5, STEPS + 1, 5))
    report = json.loads((run / "eval.json").read_text())
    assert report["images"] == 16 and report["captions"] == 32
    assert (run / "checkpoints" / f"step{STEPS}").is_dir()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"iais-slurm-{job}.node*")), "per-node files left"


def test_sbatch_usr1_checkpoints_requeues_and_resumes(slurm_cluster, demo_job, tiny_demo, tmp_path):  # noqa: F811
    """USR1 to the batch shell mid-run: the ranks save, the job requeues itself, resumes from that
    checkpoint and ends with the weights (and, after the resume, the logged values) of the same job
    run without interruption."""
    run = tmp_path / "run"
    steps = STEPS
    t0 = time.monotonic()
    job, out = submit(slurm_cluster, tmp_path, *tiny_overrides(tiny_demo, run, steps=steps))
    train_log = run / "train_log.jsonl"
    while not (train_log.exists() and train_log.read_text().strip()):  # mid-run: the first record is written
        info = slurm_cluster.job(job)
        assert info["JobState"] in {"PENDING", "RUNNING"}, describe(slurm_cluster, job, out)
        assert time.monotonic() - t0 < 400, describe(slurm_cluster, job, out)
        time.sleep(0.5)
    t_signal = time.monotonic()
    # What --signal=B:USR1@T does before the time limit, sent now: to the batch shell only.
    slurm_cluster.scancel("--signal=USR1", "--batch", job)

    info = slurm_cluster.wait(job, timeout=600)
    done = time.monotonic()
    log = out.read_text()
    print(f"preemption job {job}: signalled after {t_signal - t0:.0f} s, {info['JobState']} "
          f"(restarts {info['Restarts']}) after {done - t0:.0f} s")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        describe(slurm_cluster, job, out)

    # the signal reached each rank exactly once, through the batch shell's trap
    assert log.count("got SIGUSR1: forwarding it") == 1, log
    assert len(re.findall(r"slurm\.sh\[node [01]\]: SIGUSR1 -> ranks \d+", log)) == 2, log
    assert len(re.findall(r"rank \d: got signal 10", log)) == 2, log
    saved = re.findall(r"checkpoint \S+/step(\d+) saved; asking SLURM to requeue job " + job, log)
    assert len(saved) == 1, log
    step = int(saved[0])
    assert 0 < step < steps
    # the requeued run: same job id, SLURM_RESTART_COUNT=1, resumes from that checkpoint
    first, second = log.split(f"job {job} (iais) restart 1", 1)
    assert f"job {job} (iais) restart 0" in first
    assert f"resumed from step {step} " in second and "starting at step 0" not in second, second[:4000]
    # one record per 5 steps, none repeated: the second run went on from the checkpoint, not from 0
    records = log_records(run)
    assert [r["step"] for r in records] == list(range(5, steps + 1, 5)), records
    assert json.loads((run / "eval.json").read_text())["images"] == 16
    # The same weights and, for every logging window wholly after the resume, the same values.
    reference = demo_job[2]
    assert_same_weights(run, reference)
    want = {r["step"]: r for r in log_records(reference)}
    after = [r for r in records if r["step"] - 5 >= step]
    assert after and after[-1]["step"] == steps
    for r in after:
        for k in ("loss", "itm_rank", "mlm", "iais", "grad_norm", "lr"):
            assert r[k] == pytest.approx(want[r["step"]][k], rel=1e-6), (r["step"], k)


def test_two_nodes_start_from_missing_demo_data(slurm_cluster, tmp_path):  # noqa: F811
    """Both nodes share the disk and no data exists yet: one rank writes the demo data (atomically),
    the other waits for it; the job trains and reports."""
    data, run = tmp_path / "data" / "demo", tmp_path / "run"
    args = [a for a in tiny_overrides(data, run, steps=5) if not a.startswith("data.make_demo")]
    job, out = submit(slurm_cluster, tmp_path, *args, "data.make_demo=true", "eval.max_images=20")
    info = slurm_cluster.wait(job, timeout=600)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), describe(slurm_cluster, job, out)
    log = out.read_text()
    assert log.count("demo shards missing") == 1, log[-4000:]  # one writer for the whole job
    assert (data / "manifest.json").is_file() and not list(data.parent.glob(".demo.*"))  # no leftovers
    assert json.loads((run / "eval.json").read_text())["images"] == 20


def test_requeued_job_resumes_on_fewer_nodes(slurm_cluster, tiny_demo, tmp_path):  # noqa: F811
    """USR1 on 2 nodes: checkpoint, requeue held (IAIS_REQUEUE_HOLD=1); the job is moved to 1 node and
    released; it resumes on 1 rank from the 2-rank checkpoint (resharded) and finishes."""
    run, steps = tmp_path / "run", 60
    job, out = submit(slurm_cluster, tmp_path, *tiny_overrides(tiny_demo, run, steps=steps),
                      env={"IAIS_REQUEUE_HOLD": "1"})
    train_log = run / "train_log.jsonl"
    t0 = time.monotonic()
    while not (train_log.exists() and train_log.read_text().strip()):
        assert slurm_cluster.job(job)["JobState"] in {"PENDING", "RUNNING"}, describe(slurm_cluster, job, out)
        assert time.monotonic() - t0 < 400, describe(slurm_cluster, job, out)
        time.sleep(0.5)
    slurm_cluster.scancel("--signal=USR1", "--batch", job)
    while True:  # parked: pending and held after the checkpoint
        info = slurm_cluster.job(job)
        if info["JobState"] == "PENDING" and info.get("Restarts") == "1":
            break
        assert info["JobState"] in {"RUNNING", "COMPLETING", "PENDING", "REQUEUED"}, describe(slurm_cluster, job, out)
        assert time.monotonic() - t0 < 600, describe(slurm_cluster, job, out)
        time.sleep(0.5)
    # min-max ("1" alone keeps the maximum at 2) and one task: one node task per node (slurm.sh)
    slurm_cluster.scontrol("update", f"JobId={job}", "NumNodes=1-1", "NumTasks=1")
    slurm_cluster.scontrol("release", job)
    info = slurm_cluster.wait(job, timeout=600)
    assert (info["JobState"], info["ExitCode"], info["NumNodes"]) == ("COMPLETED", "0:0", "1"), \
        describe(slurm_cluster, job, out)
    log = out.read_text()
    step = int(re.findall(r"checkpoint \S+/step(\d+) saved; asking SLURM to requeue job", log)[0])
    second = log.split(f"job {job} (iais) restart 1", 1)[1]
    assert "world size 1" in second and f"resumed from step {step} " in second, second[-4000:]
    assert f"step{step}_universal" in second, second[-4000:]
    records = [r["step"] for r in log_records(run)]
    assert records == list(range(5, steps + 1, 5)), records
    assert json.loads((run / "eval.json").read_text())["images"] == 16


def test_sbatch_failing_training_fails_the_job(slurm_cluster, tiny_demo, tmp_path):  # noqa: F811
    t0 = time.monotonic()
    job, out = submit(slurm_cluster, tmp_path, *tiny_overrides(tiny_demo, tmp_path / "run", steps=-1))
    info = slurm_cluster.wait(job, timeout=600)
    print(f"failing job {job}: {info['JobState']} {info['ExitCode']} in {time.monotonic() - t0:.0f} s")
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), describe(slurm_cluster, job, out)
    log = out.read_text()
    assert "train.steps: must be at least 1" in log and "training exited with 2" in log, log[-3000:]


def test_no_ssh_two_nodes_rendezvous_on_loopback(tiny_demo, tmp_path):
    """What each node runs on a cluster without passwordless SSH (docs/clusters.md), both 'nodes' here."""
    deepspeed = shutil.which("deepspeed") or sys.exit("deepspeed launcher not on PATH")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # --no_ssh never contacts these names
    run = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SLURM_JOB_ID", None)
    procs = [
        subprocess.Popen(
            [deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--num_nodes", "2",
             "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             "launchers/train.py", "--config", "configs/demo.yaml", *tiny_overrides(tiny_demo, run, steps=10)],
            cwd=ROOT, env=env, stdout=open(tmp_path / f"node{node}.log", "w"), stderr=subprocess.STDOUT,
        )
        for node in (0, 1)
    ]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], "\n\n".join(log[-4000:] for log in logs)
    assert "node_rank=1" in logs[1] and "dist_world_size=2" in logs[1]
    assert "2 ranks" in logs[0], logs[0][-4000:]
    assert [r["step"] for r in log_records(run)] == [5, 10]
    assert json.loads((run / "eval.json").read_text())["images"] == 16
