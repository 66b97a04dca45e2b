#!/usr/bin/env bash
# Carries NVIDIA DALI to a GPU host without network: downloads DALI 2.4 for CUDA 13 and the wheels it imports, for
# Python 3.12 on x86_64, unpacks them into one site tree and writes it as xz parts of at most 56 MiB under
# .devpack/ (git-ignored), small enough to copy over one at a time. benchmarks/gpu_run.sh unpacks them there.
# Usage, from the repository root, on a machine with network:  bash benchmarks/pack_dali.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.devpack/' .git/info/exclude 2>/dev/null || echo '/.devpack/' >> .git/info/exclude
rm -rf .devpack && mkdir -p .devpack
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$work/wheels" \
  nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 \
  nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13 astunparse gast optree nvtx makefun 'libcst~=1.8'
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
tar -C "$work/site" -cf - . | xz -T0 -6 | split -b 56m -d - .devpack/dali.tar.xz.part-
ls -la .devpack
