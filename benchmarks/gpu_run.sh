#!/usr/bin/env bash
# One call of the GPU plan (benchmarks/gpu_plan.md): install, the call's items, every figure into $OUT as measured.
#   bash benchmarks/gpu_run.sh 1            # on the GPU host: call 1 (the headline); then 2, 3, 4
#   bash benchmarks/gpu_run.sh 3 ITEM...    # named items instead of the call's list (a rerun)
#   OUT=DIR PY=python PLAN_INSTALL=0 bash benchmarks/gpu_run.sh N   # CPU dry run (tests/test_gpu_plan.py)
# State that later calls reuse lives in $PLAN_STATE (default runs/gpu-plan, git-ignored, kept on a warm machine):
# compiler caches, the peers' packages, DALI's unpack record, the ImageNet-like JPEGs, each call's JSON.
set -uo pipefail
CALL=${1:?usage: gpu_run.sh CALL [ITEM...]}
shift
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-out}
PY=${PY:-python3}
STATE=${PLAN_STATE:-$PWD/runs/gpu-plan}
mkdir -p "$OUT" "$STATE"
export PLAN_STATE=$STATE PYTHONUNBUFFERED=1
# one compiler cache for every call: call 1's ResNet-50 compilation is reused by calls 2-4 (same graphs)
export TORCHINDUCTOR_CACHE_DIR=$STATE/inductor-cache TRITON_CACHE_DIR=$STATE/triton-cache
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
LOG=$OUT/call$CALL.log
t0=$(date +%s)
if [ "${PLAN_INSTALL:-1}" = 1 ]; then
  $PY -m pip install -q --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
  (nvidia-smi || true) >>"$LOG" 2>&1
fi
# the peers' wheels (carried in call 1 as .whl/): installed into the state folder, found by later calls too
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" .whl/*.whl \
    >>"$LOG" 2>&1 || echo "warning: the peers' wheels did not install (see $LOG)"
fi
[ -d "$STATE/site" ] && export PYTHONPATH=$STATE/site${PYTHONPATH:+:$PYTHONPATH}
if [ "$CALL" = 4 ]; then
  # ImageNet-like JPEGs in the background (a process pool) while DALI unpacks (one core, xz)
  $PY benchmarks/gpu_plan.py --write-jpegs >>"$LOG" 2>&1 &
  writer=$!
  parts=$(ls .devpack/dali.tar.xz.part-* 2>/dev/null | wc -l)
  if $PY -c "import nvidia.dali" 2>/dev/null; then
    echo "DALI already importable; $parts parts present, nothing unpacked" >"$STATE/dali-unpack.txt"
  elif [ "$parts" = 4 ]; then
    u0=$(date +%s)
    if cat .devpack/dali.tar.xz.part-* | $PY -c "import sys,sysconfig,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sysconfig.get_paths()['purelib'])"; then
      echo "unpacked 4 parts in $(( $(date +%s) - u0 )) s" >"$STATE/dali-unpack.txt"
    else
      echo "UNPACK FAILED" >"$STATE/dali-unpack.txt"
    fi
  else
    echo "DALI PARTS MISSING: $parts of 4 in .devpack/ (the host was given back between calls?)" >"$STATE/dali-unpack.txt"
  fi
  cat "$STATE/dali-unpack.txt"
  wait $writer || echo "warning: the JPEG writer failed (see $LOG); the train item writes them itself"
fi
echo "set-up: $(( $(date +%s) - t0 )) s"
$PY benchmarks/gpu_plan.py --call "$CALL" --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$CALL" = 4 ] && ! $PY -c "import nvidia.dali" 2>/dev/null; then
  echo "!!!!!!!! DALI DOES NOT IMPORT: $(cat "$STATE/dali-unpack.txt") !!!!!!!!"
  rc=3
fi
exit "$rc"
