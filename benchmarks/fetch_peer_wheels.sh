#!/usr/bin/env bash
# Download the optional peers (Liger-Kernel, cut-cross-entropy) as pure-Python wheels into .whl/ so that
# benchmarks/gpu_run.sh can install them on a device machine that reaches no package index. --no-deps: both
# only need torch and triton, which the GPU image has; nothing here pulls another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "liger-kernel==${LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}"
ls -l .whl
