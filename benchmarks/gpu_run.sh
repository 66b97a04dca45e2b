#!/usr/bin/env bash
# The prepared GPU session (device tool): install, the kernel and CUDA-only tests, the report.
#   OUT=DIR bash benchmarks/gpu_run.sh        # CPU mode too: tests on the interpreter, tiny report
#   SECTIONS=step OUT=DIR bash benchmarks/gpu_run.sh   # a rerun of some report sections only
# Worst case within one 10-minute device call: TEST_TIMEOUT (180 s) + REPORT_TIMEOUT (390 s) + install.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
$PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
(nvidia-smi || true) >"$OUT/nvidia-smi.txt" 2>&1
# DALI, when its four parts were carried to .devpack/ (../shared/offline-dali/README.md)
if [ "$(ls .devpack 2>/dev/null | wc -l)" = 4 ]; then
  cat .devpack/dali.tar.xz.part-* | $PY -c "import sys,sysconfig,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sysconfig.get_paths()['purelib'])"
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
echo "== kernel and CUDA-only tests"
timeout "${TEST_TIMEOUT:-180}" $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_paths.py \
  "tests/test_train.py::test_steady_state_step_never_syncs_on_cuda" \
  --durations=5 2>&1 \
  | tee "$OUT/pytest-kernels.log" | tail -25
echo "== ops report"
timeout "${REPORT_TIMEOUT:-390}" $PY benchmarks/gpu_report.py --out "$OUT/report" \
  --sections "${SECTIONS:-loss,ema,lars,dali,step}" 2>&1 | tee "$OUT/report.log" | tail -60
