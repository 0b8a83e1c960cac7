#!/usr/bin/env bash
# GPU results in one or two device calls of ≤ 10 minutes on a lent H100/H200. Output goes to $OUT
# (benchmarks/results/gpu when $OUT is unset).
#
#   bash benchmarks/gpu_run.sh [all|parity|bench|resume]
#     all     (default) the self-test and the Triton parity tests compiled for the GPU (no interpreter), then the GPU benchmark
#             preset under a time budget: the cases are ordered most important first (V=151936 stopgrad
#             sweep, teacher sweep, other variants, then V=128256) and what does not fit is skipped
#     parity  only the parity tests;  bench  only the benchmarks, with the whole time for them
#     resume  the benchmarks again, taking the cases already in benchmarks/results/gpu/results.jsonl
#             (copied back from a first call) from there and measuring only the rest
#
#   here, once (optional, adds the Liger and CCE peers):  bash benchmarks/fetch_peer_wheels.sh
#   device:  run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
#   then:    copy the returned files into benchmarks/results/gpu/; if bench.log says the budget skipped
#            cases, run(command="bash benchmarks/gpu_run.sh resume", carry=[".whl"]) and copy again; commit
#
# Files (7, the device tool returns at most 8): parity.log bench.log results.json results.jsonl results.md
# memory_vs_n.png time_vs_n.png.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
MODE=${1:-all}
case "$MODE" in all|parity|bench|resume) ;; *) echo "usage: $0 [all|parity|bench|resume]"; exit 2;; esac
LIMIT=${GPU_RUN_LIMIT:-575}                       # seconds for the whole script
OUT_DIR=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

if compgen -G ".whl/*.whl" > /dev/null; then     # peers carried as wheels (nothing can be fetched there)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/opd_peers \
      .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/opd_peers"
fi

{
  echo "== $(date -u) gpu_run.sh at $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
  $PY -c "import liger_kernel, cut_cross_entropy; print('peers: liger-kernel and cut-cross-entropy importable')" \
      || echo "peers: liger-kernel / cut-cross-entropy missing (run benchmarks/fetch_peer_wheels.sh here and carry .whl)"
} 2>&1 | tee "$OUT_DIR/env.log"

# 1. Triton parity tests, compiled for this GPU
if [ "$MODE" = all ] || [ "$MODE" = parity ]; then
  cat "$OUT_DIR/env.log" > "$OUT_DIR/parity.log"
  # the library's own self-test first: every family compiled for this GPU, parity at a small and a mid shape
  echo "== selftest (python -m opd_kernels.selftest)" | tee -a "$OUT_DIR/parity.log"
  timeout "${SELFTEST_LIMIT:-150}" $PY -m opd_kernels.selftest 2>&1 | tee -a "$OUT_DIR/parity.log"
  echo "== selftest exit status ${PIPESTATUS[0]} after $((SECONDS - T0)) s" | tee -a "$OUT_DIR/parity.log"
  PARITY=()
  for f in tests/test_triton_student.py tests/test_triton_teacher.py; do [ -f "$f" ] && PARITY+=("$f"); done
  if [ ${#PARITY[@]} -gt 0 ]; then
    echo "== parity: ${PARITY[*]}" | tee -a "$OUT_DIR/parity.log"
    timeout "${PARITY_LIMIT:-240}" $PY -m pytest -q -p no:cacheprovider -ra "${PARITY[@]}" 2>&1 | tee -a "$OUT_DIR/parity.log"
    echo "== parity exit status ${PIPESTATUS[0]} after $((SECONDS - T0)) s" | tee -a "$OUT_DIR/parity.log"
  else
    echo "== parity: no tests/test_triton_*.py found" | tee -a "$OUT_DIR/parity.log"
  fi
fi
[ "$MODE" = parity ] && { rm -f "$OUT_DIR/env.log"; exit 0; }

# 2. benchmarks: stop starting new cases 90 s before the end; the report is written at session end
LEFT=$((LIMIT - (SECONDS - T0)))
BUDGET=$((LEFT - 90)); [ $BUDGET -lt 30 ] && BUDGET=30
RESUME=()
if [ "$MODE" = resume ]; then
  [ -f benchmarks/results/gpu/results.jsonl ] || { echo "resume: no benchmarks/results/gpu/results.jsonl"; exit 2; }
  cp benchmarks/results/gpu/results.jsonl /tmp/opd_first_part.jsonl
  RESUME=(--resume-from /tmp/opd_first_part.jsonl)
fi
{ cat "$OUT_DIR/env.log"; echo "== benchmarks ($MODE): ${LEFT} s left, budget ${BUDGET} s"; } | tee "$OUT_DIR/bench.log"
rm -f "$OUT_DIR/env.log" "$OUT_DIR/results.md"
timeout $((LEFT > 20 ? LEFT - 10 : 10)) $PY -m pytest -q -p no:cacheprovider -ra benchmarks/ --preset gpu \
    --results-dir "$OUT_DIR" --time-budget "$BUDGET" "${RESUME[@]}" 2>&1 | tee -a "$OUT_DIR/bench.log"
STATUS=${PIPESTATUS[0]}
if [ ! -f "$OUT_DIR/results.md" ] && [ -f "$OUT_DIR/results.jsonl" ]; then   # killed before the report
  $PY -m benchmarks.report "$OUT_DIR/results.jsonl" 2>&1 | tee -a "$OUT_DIR/bench.log"
fi
# 3. the static model next to what was measured (the first GPU run calibrates it)
if [ -f "$OUT_DIR/results.jsonl" ]; then
  echo "== modelled vs measured (benchmarks/model.py)" | tee -a "$OUT_DIR/bench.log"
  timeout 60 $PY -m benchmarks.model --measured "$OUT_DIR/results.jsonl" 2>&1 | tee -a "$OUT_DIR/bench.log"
fi
echo "== done in $((SECONDS - T0)) s (benchmark pytest exit status $STATUS)" | tee -a "$OUT_DIR/bench.log"
