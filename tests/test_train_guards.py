"""`dst train` on non-finite values and mismatched inputs: it stops with one line naming the shard file and sample
(exit 1 for NaN/inf, 2 for settings), never saves non-finite weights and never prunes a good checkpoint."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.shards import encode_sample, read_shard, write_shard
from train import run as train_run
from train.config import TrainConfigError, resolve
from train.guards import NonFiniteError, check_weights

BASE = {
    "model": "tiny-random",
    "batch_size": "600",
    "max_seq_len": 300,
    "num_workers": 0,
    "log_every": 1,
    "warmup_steps": 5,
    "lr": 3e-3,
}


def config(shards, out, **extra):
    return resolve({"shards": shards, "out": out, **BASE, **extra})


def checkpoints(run: Path) -> tuple[list[str], str | None]:
    folder = run / "checkpoints"
    steps = sorted(p.name for p in folder.glob("step-*")) if folder.exists() else []
    last = folder / "last"
    return steps, (last.resolve().name if last.exists() else None)


def rewrite_sample(folder: Path, video_uid: str, edit) -> tuple[Path, str]:
    """Apply `edit(emb, meta)` to one video's sample in place (its shard rewritten, counts unchanged)."""
    for path in sorted(folder.glob("shard-*.tar")):
        samples = list(read_shard(path))
        if any(meta.video_uid == video_uid for _, _, meta in samples):
            hit = next(key for key, _, meta in samples if meta.video_uid == video_uid)
            encoded = []
            for key, emb, meta in samples:
                if key == hit:
                    emb, meta = edit(emb.copy(), meta)
                encoded.append(encode_sample(key, emb, meta))
            write_shard(path, encoded)
            return path, hit
    raise AssertionError(f"{video_uid} not in {folder}")


@pytest.fixture
def shards(tiny_shards, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards"))


def with_nan_row(emb, meta, row=3):
    emb[row, 2, 5] = np.nan
    return emb, meta


def test_nan_embedding_stops_naming_shard_and_sample_and_keeps_the_good_checkpoint(shards, tmp_path):
    run = tmp_path / "run"
    train_run.run(config(shards, run, max_steps=4, save_every=2, keep_checkpoints=1))
    assert checkpoints(run) == (["step-000004"], "step-000004")
    path, key = rewrite_sample(shards, "vid-c", with_nan_row)  # in the batch of step 5
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--shards",
            str(shards),
            "--model",
            "tiny-random",
            "--out",
            str(run),
            "--max-steps",
            "60",
            "--batch-size",
            "600",
            "--max-seq-len",
            "300",
            "--num-workers",
            "2",
            "--resume",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    message = " ".join(result.output.split()[result.output.split().index("error:") :])
    assert message == (
        f"error: step 5: non-finite frame embeddings in {path}: sample {key} (video vid-c): 1 rows, first row 3; the "
        "shard is corrupt (dst prepare never writes such values): prepare it again"
    )
    assert checkpoints(run) == (["step-000004"], "step-000004")  # nothing saved, nothing pruned


def test_nan_in_validation_shards_is_named(shards, tiny_shards, tmp_path):
    path, key = rewrite_sample(shards, "vid-a", lambda e, m: with_nan_row(e, m, row=0))
    with pytest.raises(NonFiniteError) as exc:
        train_run.run(
            resolve(
                {
                    "shards": tiny_shards,
                    "val_shards": shards,
                    "out": tmp_path / "run",
                    **BASE,
                    "max_steps": 4,
                    "eval_every": 2,
                    "save_every": 1,
                }
            )
        )
    assert str(exc.value).startswith(
        f"validation at step 2: non-finite frame embeddings in {path}: sample {key} (video vid-a): 1 rows, first row 0;"
    )
    assert checkpoints(tmp_path / "run") == (["step-000001"], "step-000001")
    assert all(line["step"] <= 2 for line in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()))


def test_nan_loss_from_finite_inputs_stops_before_the_update(tiny_shards, tmp_path, monkeypatch):
    from train import loop

    real, calls = loop.loss_terms, []

    def nan_at_third_step(out, batch, cfg):
        calls.append(1)
        terms, here = real(out, batch, cfg)
        if len(calls) == 3:
            terms = {**terms, "speak": terms["speak"] * float("nan")}
        return terms, here

    monkeypatch.setattr(loop, "loss_terms", nan_at_third_step)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as exc:
        train_run.run(config(tiny_shards, run, max_steps=10, save_every=1, keep_checkpoints=2))
    assert str(exc.value).startswith(f"step 3: non-finite speak loss from finite inputs, in a batch of {tiny_shards}/")
    assert "the run diverged (lower the learning rate" in str(exc.value)
    assert checkpoints(run) == (["step-000001", "step-000002"], "step-000002")


def test_nan_gradients_without_a_scaler_are_never_applied(tiny_shards, tmp_path, monkeypatch):
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_grad_at_second_step(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append(1)
        if len(calls) == 2:
            params[0].grad.view(-1)[0] = float("inf")
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_grad_at_second_step)
    run = tmp_path / "run"
    with pytest.raises(
        NonFiniteError,
        match=r"^step 2: non-finite gradients \(norm (nan|inf)\) from finite inputs "
        r"and loss, in a batch of .*the step was not applied",
    ):
        train_run.run(config(tiny_shards, run, max_steps=5, save_every=1))
    assert checkpoints(run) == (["step-000001"], "step-000001")


def test_non_finite_weights_are_never_saved(tiny_shards, tmp_path, monkeypatch):
    """Weights that turned non-finite however it happened: the save is refused, the good checkpoints stay."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def corrupt_a_weight_at_third_step(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                params[-1].view(-1)[0] = float("nan")
            params[-1].grad = None  # AdamW leaves a parameter without a gradient as it is
        return real([p for p in params if p.grad is not None], max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", corrupt_a_weight_at_third_step)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as exc:
        train_run.run(config(tiny_shards, run, max_steps=6, save_every=1, keep_checkpoints=2))
    assert str(exc.value) == (
        f"step 3: non-finite weights in frame_adapter.down.bias: no checkpoint written (the "
        f"last good one, {run / 'checkpoints' / 'last'}, is kept)"
    )
    assert checkpoints(run) == (["step-000001", "step-000002"], "step-000002")


def test_check_weights_names_the_parameter():
    good, bad = torch.zeros(3), torch.tensor([0.0, float("inf")])
    check_weights([("a", good)], 7, "x")
    with pytest.raises(NonFiniteError, match=r"^step 7: non-finite weights in b: no checkpoint written"):
        check_weights([("a", good), ("b", bad)], 7, "x")


def test_shards_of_another_model_are_refused(shards, tmp_path):
    for path in sorted(shards.glob("shard-*.tar")):
        write_shard(
            path,
            [
                encode_sample(k, e, replace(m, model="HuggingFaceTB/SmolVLM2-256M-Video-Instruct"))
                for k, e, m in read_shard(path)
            ],
        )
    with pytest.raises(TrainConfigError) as exc:
        train_run.run(config(shards, tmp_path / "run", max_steps=1))
    assert str(exc.value) == (
        f"the shards {shards} were prepared with --model HuggingFaceTB/SmolVLM2-256M-Video-"
        "Instruct, this run trains tiny-random; use the same model (or allow_other_model = true "
        "if it is the same one under another name)"
    )
    assert not (tmp_path / "run").exists()


def test_shards_of_another_hidden_size_are_refused(tmp_path):
    from test_shard_integrity import (  # hidden size 8; tiny-random's text model has 64
        sample,
        write_folder,
    )

    folder = write_folder(tmp_path / "s", [[sample("a"), sample("b")]])
    result = CliRunner().invoke(
        app, ["train", "--shards", str(folder), "--model", "tiny-random", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert " ".join(result.output.split()) == (
        f"error: the shards {folder} hold embeddings of hidden size 8 (prepared with tiny-random), the model "
        "tiny-random has text hidden size 64; prepare the shards with the same --model"
    )


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--lr", "nan", "lr must be a finite number, got nan"),
        ("--lr", "0", "lr must be > 0, got 0.0"),
        ("--max-seq-len", "0", "max_seq_len must be >= 1, got 0"),
        ("--max-steps", "0", "max_steps must be >= 1, got 0"),
        ("--batch-size", "0", "batch_size must be 'auto' or a positive token budget, got '0'"),
        ("--accumulation", "0", "accumulation must be >= 1, got 0"),
        ("--rho", "nan", "rho must be a finite number, got nan"),
        ("--num-workers", "-1", "num_workers must be >= 0, got -1"),
        ("--memory-fraction", "1.5", "memory_fraction must be <= 1, got 1.5"),
    ],
)
def test_nonsense_numbers_are_exit_2(tmp_path, option, value, message):
    result = CliRunner().invoke(
        app,
        ["train", "--shards", str(tmp_path), "--model", "tiny-random", "--out", str(tmp_path / "run"), option, value],
    )
    assert result.exit_code == 2 and " ".join(result.output.split()) == f"error: {message}"


@pytest.mark.parametrize(
    "line, message",
    [
        ('max_steps = "10"', "max_steps must be an integer, got '10'"),
        ("seed = -1", "seed must be >= 0, got -1"),
        (
            "w_upd = 0\nw_dst = 0\nw_spk = 0\nw_rsp = 0",
            "the loss weights w_upd, w_dst, w_spk, w_rsp are all 0: nothing to train (variant dst)",
        ),
        (
            'variant = "none"\nw_spk = 0\nw_rsp = 0',
            "the loss weights w_spk, w_rsp are all 0: nothing to train (variant none)",
        ),
        ("lora = 1", "lora must be true or false, got 1"),
        ("shards = 3", "must be a path string, got 3"),
        ("[train.dataset_weights]\nwtag = -1", "dataset_weights.wtag must be >= 0, got -1"),
    ],
)
def test_nonsense_config_file_values_are_refused(tmp_path, line, message):
    path = tmp_path / "train.toml"
    shards = "" if line.startswith("shards") else 'shards = "s"\n'
    path.write_text(f'[train]\nmodel = "tiny-random"\nout = "run"\n{shards}{line}\n')
    with pytest.raises(TrainConfigError) as exc:
        resolve({}, path)
    assert str(exc.value).endswith(message)
