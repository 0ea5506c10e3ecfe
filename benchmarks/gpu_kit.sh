#!/usr/bin/env bash
# What the device check needs on a GPU machine without network, in one folder to copy there:
#   DIR/tokenizer/   SmolVLM2's tokenizer (the smollm2-135m conversion's files, ~3.5 MB)  -> --tokenizer DIR/tokenizer
#   DIR/wheels/      pinned wheels for Python $PY_VERSION on x86-64 Linux                 -> --wheels DIR/wheels
#
#   benchmarks/gpu_kit.sh DIR [PACKAGE==VERSION ...]
#
# Without PACKAGE arguments: the pins of pyproject.toml that a stock CUDA + PyTorch image usually lacks (polars and
# its runtime, webdataset and braceexpand: about 55 MB). `gpu_check.sh`'s deps step lists what is missing on the
# machine itself, with each wheel's size; pass those here. Nothing here is run on the GPU machine.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
out="${1:?usage: benchmarks/gpu_kit.sh DIR [PACKAGE==VERSION ...]}"
shift
pin() { grep -o "\"$1==[^\"]*\"" "$here/../pyproject.toml" | tr -d '"'; }
if [ "$#" -eq 0 ]; then
    set -- "$(pin polars)" "polars-runtime-32==$(pin polars | cut -d= -f3)" "$(pin webdataset)" braceexpand==0.1.7
fi
mkdir -p "$out/tokenizer" "$out/wheels"
PYTHONPATH="$here/.." "$python" - "$out/tokenizer" <<'EOF'
import shutil
import sys
from pathlib import Path

from pipeline.smollm2 import ensure_converted

folder = ensure_converted()  # converts the GGUF once if this machine has not yet
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
    if (folder / name).is_file():
        shutil.copy2(folder / name, Path(sys.argv[1]) / name)
EOF
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
    --implementation cp "${platforms[@]}" -d "$out/wheels" "$@"
du -sh "$out/tokenizer" "$out/wheels"
