"""benchmarks/gpu_check.sh, in its --cpu-smoke mode: every measurement runs end to end and lands in the docs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900)


def test_cpu_smoke_appends_a_row_for_every_measurement(tmp_path):
    docs = tmp_path / "benchmarks.md"
    original = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    docs.write_text(original, encoding="utf-8")
    proc = run("--cpu-smoke", "--docs", str(docs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = docs.read_text(encoding="utf-8")
    assert text.startswith(original)  # appended, nothing rewritten
    added = text[len(original):]
    assert "### CPU smoke run of the GPU check" in added and "(tiny sizes: not measurements)" in added
    rows = [line for line in added.splitlines() if line.startswith("| ") and not line.startswith("| measurement")]
    assert not [row for row in rows if any(word in row for word in ("failed", "timed out", "skipped", "no RESULT"))]
    kinds = [row.split("|")[1].strip() for row in rows]
    assert kinds.count("prepare") == 5  # four CPU stages and the tiny-random model
    assert kinds.count("train") == 1 and "`--batch-size auto` picked 4096 tokens" in added  # the CPU default
    assert kinds.count("stream") == 2 and "slot cache" in added and "DynamicCache" in added
    assert kinds.count("eval") == 2 and "`--batch-dialogues 2`" in added


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the real check would start")
def test_without_a_gpu_it_says_so():
    proc = run("--docs", os.devnull)
    assert proc.returncode != 0 and "no CUDA GPU here; --cpu-smoke" in proc.stderr
