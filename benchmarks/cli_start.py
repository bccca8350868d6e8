"""How long the command lines take to answer ``--help`` (they parse before torch, DeepSpeed or
transformers are imported), beside the time of importing the trainer itself for comparison.

    python benchmarks/cli_start.py [--repeats 3]

Prints the median wall time of each command and its ratio to the trainer import.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "launchers/train.py --help": [sys.executable, "launchers/train.py", "--help"],
    "launchers/evaluate.py --help": [sys.executable, "launchers/evaluate.py", "--help"],
    "python -m data_tools --help": [sys.executable, "-m", "data_tools", "--help"],
    "(import iais_scale.engine)": [sys.executable, "-c", "import iais_scale.engine"],
}


def seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = {name: statistics.median(seconds(cmd) for _ in range(args.repeats)) for name, cmd in COMMANDS.items()}
    base = times["(import iais_scale.engine)"]
    for name, t in times.items():
        print(f"{name:32s} {t:6.2f} s  ({t / base:.2f}x the trainer import)")


if __name__ == "__main__":
    main()
