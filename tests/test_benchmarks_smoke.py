"""Every benchmark script runs end to end at a tiny size, so that none of them rots between the runs
that measure. (Covered elsewhere: iais_term.py and model_step.py --sweep by the dry GPU suite,
tests/test_benchmarks_gpu_suite.py; rerank.py in tests/test_evaluate.py; relations.py in
tests/test_relations.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_model_step_cpu_section():
    out = bench("model_step.py", "--size", "tiny", "--pairs", "2", "--repeats", "1", "--threads", "1")
    assert "tiny (4 x 128), 2 pairs" in out
    for part in ("(a) ratio", "(b) ratio", "(c)"):
        assert part in out, out


def test_loader(tmp_path):
    out = bench("loader.py", "--region-samples", "64", "--jpegs", "16", "--image-size", "64", "--batch-size", "8",
                "--repeats", "1", "--latency-ms", "5", "--prefetch-samples", "500")
    for line in ("region features   :", "JPEG -> 64 px", "PIL decode+resize", "regions   http", "JPEG      pipe:cat",
                 "prefetch  (2 shards of 250 samples", "prefetch on"):
        assert line in out, out


def test_convert():
    out = bench("convert.py", "--n", "10", "--size", "64", "--shard-size", "5")
    assert "10/10 samples byte-identical to their source files (sha256): PASS" in out, out


def test_mining(tmp_path):
    out = bench("mining.py", "--data", str(tmp_path / "data"), "--train-images", "64", "--test-images", "8",
                "--pool", "16", "--hard", "2", "--shortlist", "4", "--anchors", "2", "--steps", "1",
                "--pretrain-steps", "2", "--repeats", "1", "--threads", "1")
    for line in ("start : TR R@1", "cross : step", "itc   : step", "itc+4 : step"):
        assert line in out, out


@pytest.mark.slow
def test_mining_comm():
    out = bench("mining_comm.py", "--worlds", "2", "--pairs", "8", "--anchors", "2", "--top", "2", "--shortlist", "4",
                "--hard", "2", "--feature-dim", "8", "--pixels", "32")
    assert "Bytes received per rank per step" in out and "Extrapolated bytes received" in out, out
    assert "(all-gather) mining emb." in out


def test_cli_start():
    out = bench("cli_start.py", "--repeats", "1")
    for name in ("launchers/train.py --help", "launchers/evaluate.py --help", "python -m data_tools --help"):
        assert name in out and "x the trainer import" in out, out
