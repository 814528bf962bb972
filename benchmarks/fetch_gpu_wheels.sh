#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a GPU machine without internet access, into .whl/.
#
#   benchmarks/fetch_gpu_wheels.sh            # from the repository root, where PyPI is reachable
#
# The GPU image already holds torch, torchvision, numpy, pillow, pyarrow, pandas, click, pyyaml, fsspec, tqdm,
# safetensors, huggingface-hub, packaging and typing-extensions. It lacks what the worker loop imports besides:
# zarr (+ numcodecs, donfig, google-crc32c), pydantic (+ pydantic-core, annotated-types, typing-inspection) and
# braceexpand. timm is carried too, so that the engine's hooks meet the timm they are tested with, and
# typing-extensions because pydantic-core needs a recent one. Ray is not needed (gpu_check runs no cluster).
# Versions are those of the development environment (.venv), so the GPU runs the code as tested here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES=(zarr numcodecs donfig google-crc32c pydantic pydantic-core annotated-types typing-inspection braceexpand
  timm typing-extensions)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl
mkdir -p .whl
pins=()
for name in "${PACKAGES[@]}"; do
  pins+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -ch .whl/*.whl | tail -1
