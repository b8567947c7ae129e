#!/usr/bin/env bash
# Downloads, into .whl/ at the repository root (git-ignored), the wheels that
# experiments/gpu_check.sh installs on a GPU machine without network access: the packages that
# training, evaluation and sampling import and that such a machine does not already have
# (it has Python 3.12, jax/jaxlib + CUDA plugin, flax, optax, orbax-checkpoint, tensorboard,
# numpy, scikit-learn, matplotlib, pillow, absl-py, etils; no TensorFlow). Also copies the
# CIFAR-10 training subset from ../shared/data into .whl/data/ when it exists (never committed:
# .whl/ is ignored), so the GPU run trains the tiny model on it; without it the run uses the
# embedded digits.
#
# Usage: experiments/fetch_gpu_wheels.sh [PYTHON]   (PYTHON: the pip to download with)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
mkdir -p .whl
# NAME==VERSION: the versions setup.cfg pins; pure-python wheels are platform independent.
WHEELS=(
  ml-collections==1.1.0
  clu==0.0.12
  grain==0.2.18
  array-record==0.8.6
  portpicker==1.6.0
)
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$w"
done
if [ -f ../shared/data/cifar10_train_subset.npz ]; then
  mkdir -p .whl/data
  cp ../shared/data/cifar10_train_subset.npz .whl/data/
fi
ls -la .whl .whl/data 2>/dev/null || true
du -sh .whl
