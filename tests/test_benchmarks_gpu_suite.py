"""benchmarks/gpu_suite.py in its dry mode: every step's code path on the CPU with tiny shapes (DeepSpeed
on 2 CPU ranks for steps 3 and 4), one table, one JSON that never claims GPU figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("1", "2", "3", "4", "5")


@pytest.mark.slow
def test_dry_suite_runs_every_step_and_writes_the_json(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "benchmarks/gpu_suite.py", "--dry", "--out", str(out), "--work", str(tmp_path / "work"),
           "--budget-s", "540"]
    # About 2 minutes on 2 cores; the first run on a machine also compiles DeepSpeed's CPU Adam (~1.5 min).
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "DRY (CPU)" in proc.stdout and "NOT performance figures" in proc.stdout, log

    data = json.loads((out / "gpu_suite.json").read_text())
    assert data["dry"] is True and data["device"] == "cpu", data
    assert "cpu" in data["device_name"] and "NOT performance figures" in data["note"]
    assert (out / "gpu_suite.log").is_file()
    for step in STEPS:
        entry = data["steps"][step]
        # figures, or a stated reason for a skip
        assert entry["status"] in ("ok", "skipped"), (step, entry.get("status"), entry.get("reason"), log)
        if entry["status"] == "skipped":
            assert entry["reason"], (step, entry)
        else:
            assert entry.get("figures"), (step, entry)

    s1 = data["steps"]["1"]["figures"]
    assert s1["device"] == "cpu" and s1["speedup_static"] > 0 and "skipped" in s1["sync_check"]

    rows = data["steps"]["2"]["figures"]["rows"]
    assert {(r["model"], r["iais"], r["checkpointing"]) for r in rows} == {
        ("bert", False, False), ("ours", False, False), ("ours", True, False), ("ours", False, True), ("ours", True, True)}
    assert all(r["mfu"] is None and r["peak_gib"] is None for r in rows)  # no GPU figure is invented

    runs = data["steps"]["3"]["figures"]["runs"]
    assert set(runs) == {"bf16", "fp16"}
    for prec, run in runs.items():
        assert run.get("skipped", "").startswith("skipped on CPU") or (run["rc"] == 0 and run["eval_json"]), (prec, run)
    assert runs["fp16"].get("skipped") or runs["fp16"]["overflow_steps_eval"] is not None
    assert data["steps"]["3"]["figures"]["accelerator"].get("backend") == "gloo"

    s4 = data["steps"]["4"]["figures"]
    assert s4["logged_steps"][-1] == s4["steps"] and s4["step_s"] > 0 and s4["memory_mb_max"] > 0

    s5 = data["steps"]["5"]["figures"]
    assert {m["name"] for m in s5["mining"]} == {"cross", "itc+7", "itc"}
    assert {"all_pairs", "itc", "rerank"} <= set(s5["evaluation"])
    assert s5["evaluation"]["rerank"]["pairs"] < s5["evaluation"]["all_pairs"]["pairs_full"]

    assert [r[0] for r in data["table"]] and all(r[4] in ("dry", "") for r in data["table"])


def test_dry_suite_step_subset_marks_the_rest_skipped(tmp_path):
    """--steps: the others are recorded as skipped, with the reason."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--dry", "--steps", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    assert data["steps"]["1"]["status"] == "ok"
    for step in ("2", "3", "4", "5"):
        assert data["steps"][step] == {"name": data["steps"][step]["name"], "status": "skipped",
                                       "reason": "not selected (--steps)"}
