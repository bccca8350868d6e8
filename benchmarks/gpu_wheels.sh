#!/usr/bin/env bash
# Build the wheelhouse that benchmarks/gpu_suite.sh installs from on a GPU machine that cannot
# download anything. Run it HERE (a machine that reaches PyPI), in the repository root:
#
#     bash benchmarks/gpu_wheels.sh            # -> .whl/  (ignored by .gitignore)
#     bash benchmarks/gpu_wheels.sh DIR 3.12   # another folder / the GPU machine's Python version
#
# then carry the folder with the device tool's run (carry: [".whl"]); the suite finds .whl/ by
# itself (or --wheelhouse DIR / IAIS_WHEELHOUSE=DIR).
#
# What it holds: the packages this project needs that the GPU image (docs/performance.md) lacks:
# DeepSpeed (a pure-Python wheel built from its source release with DS_BUILD_OPS=0: its ops are
# compiled just in time where they run) and DeepSpeed's and webdataset's own needs. torch is NOT
# included: the image brings a CUDA build, and a CUDA wheel is far above the 64 MiB a run carries.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
PYVER=${2:-3.12}
PY=${PYTHON:-python3}
DEEPSPEED=${IAIS_DEEPSPEED_VERSION:-0.19.8}
mkdir -p "$OUT"

# Pure-Python packages (any platform) and the one compiled need (pydantic-core) for CPython $PYVER.
pure=(hjson==3.1.0 pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2
      webdataset==1.0.2 braceexpand==0.1.7)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$OUT" "${pure[@]}" pydantic-core==2.46.4

# DeepSpeed publishes source releases only: build a py3-none-any wheel with no ops compiled in.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$DEEPSPEED"
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$OUT" "$tmp"/deepspeed-*.tar.gz

echo "wheelhouse $OUT:"
ls -l "$OUT"
du -sh "$OUT"
