#!/usr/bin/env bash
# The GPU proof suite (issue 17): one command, about 8 minutes on one H200; docs/performance.md.
#
#     bash benchmarks/gpu_suite.sh            # GPU machine: install what is missing, measure, JSON into $OUT
#     bash benchmarks/gpu_suite.sh --dry      # any CPU machine: the same code paths, tiny shapes, no installs
#
# Everything after the script name goes to benchmarks/gpu_suite.py (--steps 1,2,5 --budget-s 480
# --out DIR --wheelhouse DIR ...). The Python that runs it is $PYTHON, else python3, else python: on
# the GPU machine that is the interpreter that holds the CUDA build of torch.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
if [ -z "$PY" ]; then
    echo "gpu_suite: no python3 or python on PATH (set PYTHON=...)" >&2
    exit 3
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_suite.py "$@"
