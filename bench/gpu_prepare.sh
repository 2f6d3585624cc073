#!/usr/bin/env bash
# Prepares, where PyPI is reachable, what bench/gpu_check.sh needs on a GPU machine without network,
# in the git-ignored folder .gpu/:
#   .gpu/wheels/   what a Python with torch, torchvision, numpy, scikit-learn, matplotlib, tqdm and
#                  pytest lacks: medmnist and grad-cam (versions from requirements.txt), ttach, fire
#                  and fire's termcolor. Under 1 MB: it travels with every check.
#   .gpu/deps/     what such a Python may lack besides: pandas and scikit-image (imported by
#                  medmnist), opencv-python-headless (by grad-cam), and their own needs. About 85 MB:
#                  copy it too where the GPU machine lacks those three.
#   .gpu/pneumoniamnist.npz   the data, checked against the official md5.
# Wheels are for the GPU machine's Python (CPython 3.12, manylinux x86-64; change
# --python-version below for another).
#
#   bash bench/gpu_prepare.sh [DATA_DIR]      # DATA_DIR holds pneumoniamnist.npz (default: data)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data}
py=${PYTHON:-python3}
md5=28209eda62fecd6e6a2d98b1501bb15f
spec() { grep -oE "^$1[^ ]*" requirements.txt; }     # e.g. medmnist>=3.0.2

rm -rf .gpu && mkdir -p .gpu/wheels .gpu/deps
binary=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$py" -m pip download -q "${binary[@]}" -d .gpu/wheels "$(spec medmnist)" ttach fire termcolor
# grad-cam >= 1.5 is published as a source archive only, so --only-binary would quietly fetch
# 1.0.0: build its (pure-Python) wheel here instead.
"$py" -m pip wheel -q --no-deps -w .gpu/wheels "$(spec grad-cam)"
"$py" -m pip download -q "${binary[@]}" -d .gpu/deps pandas scikit-image imageio tifffile \
  lazy_loader opencv-python-headless
cp "$data/pneumoniamnist.npz" .gpu/
echo "$md5  .gpu/pneumoniamnist.npz" | md5sum -c --quiet
ls .gpu/wheels .gpu/deps
du -sh .gpu/wheels .gpu/deps .gpu/pneumoniamnist.npz
