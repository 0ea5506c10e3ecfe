#!/usr/bin/env bash
# The GPU measurements docs/benchmarks.md lists as missing, in one run of under 8 minutes on one GPU; the rows are
# appended to docs/benchmarks.md under a dated heading with the GPU's name (see benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh                 on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --cpu-smoke     tiny sizes on the CPU in seconds: checks the check (the tests run it)
#   ... --docs FILE                         append to FILE instead; --budget-s S: stop starting steps after S s
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
if [ ! -x "$python" ]; then
    python="$(command -v python3)"
fi
exec "$python" "$here/gpu_check.py" "$@"
