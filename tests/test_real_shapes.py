"""`dst prepare` -> `dst train` (LoRA and full) -> `dst eval` on the real SmolVLM2 shapes, with random weights.

The shapes come from `pipeline/smolvlm.py` (real hidden sizes, heads, the 49,280-row vocabulary, the frame
geometry: 512 px / 16 px patches / pixel shuffle 4 -> 64 tokens per frame for 256M and 500M; 384 px / 14 px / 3 ->
81 for 2.2B) with one text and one vision layer, and SmolVLM2's real tokenizer (the `smollm2-135m` fixture's), so
the frame blocks carry the real special ids. The whole 2.2B shape (its 49,280 x 2,048 embeddings and LM head alone
are 0.8 GB in fp32) takes about a minute of this CPU, so it runs in `benchmarks/real_shapes_cpu.py` (times in
docs/benchmarks.md); here its 81-token vision geometry runs on the 256M text model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import metrics_text
from eval.config import EvalConfig, StreamConfig
from eval.evaluate import run as eval_run
from pipeline import prepare
from pipeline.config import PrepareConfig
from pipeline.shard_index import ShardIndex
from train import run as train_run
from train.config import resolve
from train.sequence import SequenceFormat

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("real_shapes", ROOT / "benchmarks" / "real_shapes.py")
real_shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_shapes)

FRAMES = 3  # 1.5 s at 2 fps: the vision layer at 512 px costs ~0.3 s of CPU per frame
# (text shape, vision shape, tokens per frame, text hidden size, training mode): LoRA and full checkpoints both
# go through eval (each case trains one mode: the suite's time is short)
CASES = [("256M", "256M", 64, 576, "lora"), ("500M", "500M", 64, 960, "full"), ("256M", "2.2B", 81, 576, "full")]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    tok, source = real_shapes.real_tokenizer()  # the files the smollm2 fixture's conversion wrote
    assert tok is not None, source
    return tok


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[Path, Path]:
    """One 3-frame video at ProAssist's 384 px with two conversations: (dst json, frames root)."""
    return real_shapes.short_video(tmp_path_factory.mktemp("real-shapes-data"), FRAMES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two torch threads on the 2 shared cores mostly wait for each other (docs/benchmarks.md): 2-3x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(shards: Path, model: Path, out: Path, lora: bool) -> Path:
    train_run.run(
        resolve(
            {
                "shards": shards,
                "model": str(model),
                "out": out,
                "max_steps": 1,
                "lora": lora,
                "batch_size": "512",
                "max_seq_len": 512,
                "num_workers": 0,
                "warmup_steps": 1,
            }
        )
    )
    return out / "checkpoints" / "last"


@pytest.mark.parametrize(
    ("text", "vision", "tokens", "hidden", "mode"),
    CASES,
    ids=[f"{t}-text-{v}-vision-{n}-tokens-{m}" for t, v, n, _, m in CASES],
)
def test_prepare_train_eval(text, vision, tokens, hidden, mode, tokenizer, video, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_text, "java_missing_reason", lambda: "skipped in this test (METEOR takes seconds)")
    dst_json, frames = video
    info = real_shapes.shape_folder(
        text, tmp_path / "model", tokenizer, text_layers=1, vision_layers=1, vision_of=vision
    )
    assert (info["tokens_per_frame"], info["text_hidden_size"]) == (tokens, hidden)

    prepare.run(
        PrepareConfig(
            split="train",
            dst_json=(dst_json,),
            model=str(tmp_path / "model"),
            out=tmp_path / "shards",
            frames_root=frames,
            tokens_per_frame="all",
            workers=0,
        )
    )
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert (manifest["tokens"], manifest["hidden_size"], manifest["counts"]["frames"]) == (tokens, hidden, FRAMES)
    index = ShardIndex.build(tmp_path / "shards")
    (key,) = index.video_ids
    rows = index.rows(key, 0, FRAMES)
    assert rows.shape == (FRAMES, tokens, hidden) and rows.dtype == np.float16 and np.isfinite(rows).all()
    fmt = SequenceFormat(tokenizer, index.tokens_per_frame)
    assert fmt.frame == [49189, 49152] + [49190] * tokens + [49189]  # the real <fake_token_around_image> etc.

    ckpt = _train(tmp_path / "shards", tmp_path / "model", tmp_path / "run", mode == "lora")
    dst = json.loads((ckpt / "dst.json").read_text())
    assert (dst["lora"], dst["tokens_per_frame"], dst["hidden_size"]) == (mode == "lora", tokens, hidden)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 1 and np.isfinite(logged[-1]["loss"])

    metrics = eval_run(
        EvalConfig(
            shards=tmp_path / "shards",
            out=tmp_path / "eval",
            ckpt=ckpt,
            stream=StreamConfig(max_new_tokens=2),
            sts_model=str(real_shapes.sts_standin(tmp_path / "sts")),
        )
    )
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["video_uid"], r["conversation"]) for r in records] == [("short", 0), ("short", 1)]
    assert all(1 <= len(r["frames"]) <= FRAMES for r in records)
    assert set(metrics["datasets"]) == {"wtag"}
