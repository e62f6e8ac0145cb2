#!/usr/bin/env bash
# Download the wheels `make gpu-check` needs on a GPU machine that has torch, triton and an older
# transformers but no network: the transformers version pinned in requirements/test.lock (pure Python),
# and with ALL=1 also its pinned huggingface_hub, tokenizers, safetensors and regex (binary wheels for
# CPython 3.12 on x86-64 Linux). Then carry the folder and run `WHEELS=<folder> make gpu-check` there.
#
#   benchmarks/gpu_wheels.sh [DIR]          # default DIR: .whl
#   ALL=1 PYVER=3.12 benchmarks/gpu_wheels.sh .whl
#
# transformers 5.24 asks for huggingface-hub>=1.31,<3, tokenizers>=0.23.1,<0.24, safetensors>=0.8: a
# machine image with those (the H200 image has hub 1.33, tokenizers 0.23.2, safetensors 0.8.0) needs only
# the transformers wheel. Keep one version of each package in DIR: two stop the install.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYVER=${PYVER:-3.12}
LOCK=requirements/test.lock
PY=${PYTHON:-python3}
pin() { grep -i "^$1==" "$LOCK" | head -1 || { echo "error: $1 is not pinned in $LOCK" >&2; exit 1; }; }
names=(transformers)
[ "${ALL:-0}" = 1 ] && names+=(huggingface_hub tokenizers safetensors regex)
mkdir -p "$DIR"
for n in "${names[@]}"; do
  spec=$(pin "$n")
  echo "downloading $spec into $DIR" >&2
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$DIR" "$spec"
done
ls -l "$DIR"
