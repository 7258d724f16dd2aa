#!/usr/bin/env bash
# Downloads into .whl/ the wheels that experiments/gpu_check.sh needs and the H200 image lacks.
#
#   bash experiments/gpu_wheels.sh          # here, with PyPI reachable; then carry .whl to the device
#
# The device image (/work/.library/device/KINDS.md, "Python packages already there") is Python 3.12
# with jax, flax, optax, orbax-checkpoint, tensorstore, etils, absl-py, PyYAML, rich, safetensors,
# protobuf, humanize, uvloop, simplejson, prometheus-client, cloudpickle... but no grain,
# ml_collections or TensorFlow. What the check's stages import (found with
# `python -X importtime`-style import tracing on the stages' modules, see tests/test_gpu_check.py):
#
#   ml_collections  configs/models.py, medcg.model.*, every bench (pure Python; needs absl-py, PyYAML)
#   grain           medcg.train.checkpoint / data pipeline: the medcg.compile stage (binary cp312 wheel)
#   array_record    grain's data sources (binary cp312 wheel; needs absl-py, etils)
#   portpicker      grain's process prefetch (pure Python; needs psutil)
#
# Every dependency these declare is already on the image, so --no-deps and one version of each is
# the whole set (two versions of one name would stop the install). The versions are the ones
# requirements.txt resolves to in .venv. .whl/ is git-ignored (.gitignore) and travels only as
# `carry=[".whl"]`; it counts towards the device call's 64 MiB working-tree limit (about 7 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  ml_collections==1.1.0
  grain==0.2.18
  array_record==0.8.6
  portpicker==1.6.0
)
PYTHON=${PYTHON:-python3}

mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  # The device README's line; pip matches manylinux_2_N exactly, so the usual N are all listed.
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$spec"
done
ls -l .whl
du -sh .whl
