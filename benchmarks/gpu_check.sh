#!/usr/bin/env bash
# The device check (benchmarks/gpu_check.py): the real dst commands on the real SmolVLM2 shapes in one call of
# under 9 minutes on one GPU; everything goes under --out, nothing in the repository changes.
#
#   benchmarks/gpu_check.sh --out DIR [--wheels DIR] [--tokenizer DIR] [--cap-gib 24]    on a CUDA machine
#   benchmarks/gpu_check.sh --out DIR --cpu-smoke       the same steps, tiny model, on the CPU (the tests run it)
#
# Python: $PYTHON, else the repository's .venv, else python3 (a lent GPU machine's own torch).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
if [ ! -x "$python" ]; then
    python="$(command -v python3)"
fi
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in the checkout: everything this writes goes under --out
exec "$python" "$here/gpu_check.py" "$@"
