"""4-bit loading (pipeline/models.py, train/build.py, dst.json) and eval's merged LoRA (train/checkpoint.py).

There is no GPU or bitsandbytes here: the 4-bit tests fake `bitsandbytes` and `from_pretrained` and check what the
loader asks of transformers and peft; the merge test runs for real on the tiny model."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import SmolVLMForConditionalGeneration

from pipeline import models
from pipeline.models import ModelLoadError, load_model
from pipeline.smolvlm import SMOLLM2, TINY_RANDOM, build_tiny_random, build_tiny_tokenizer
from train import build, checkpoint
from train.build import Runtime, build_model
from train.checkpoint import DST_META, dst_meta, load_dst_model
from train.config import TrainConfig, TrainConfigError
from train.model import DSTModel, freeze_vision, wrap_lora

GPU = torch.device("cuda", 1)
HUB_NAME = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"


@pytest.fixture
def fake_4bit(monkeypatch):
    """bitsandbytes "installed" and `from_pretrained` recorded: it returns the tiny model in fp16."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    calls = []

    def from_pretrained(path, **kwargs):
        calls.append((path, kwargs))
        return build_tiny_random(0)[0].half()

    monkeypatch.setattr(SmolVLMForConditionalGeneration, "from_pretrained", from_pretrained)
    return calls


@pytest.fixture
def home_checkpoint(tmp_path, monkeypatch):
    """A checkpoint folder under a fake home, named `~/ckpt` (the tokenizer is real; the weights are faked)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    build_tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_4bit_loads_the_resolved_folder_in_fp16_with_an_fp16_compute_dtype(fake_4bit, home_checkpoint):
    model, tokenizer = load_model("~/ckpt", dtype=torch.float32, device=GPU, load_in_4bit=True)
    [(path, kwargs)] = fake_4bit
    assert path == str(home_checkpoint)  # `~` expanded, as without --load-in-4bit
    quant = kwargs.pop("quantization_config")
    assert kwargs == {"dtype": torch.float16, "attn_implementation": "sdpa", "device_map": {"": GPU}}
    assert (quant.load_in_4bit, quant.bnb_4bit_compute_dtype, quant.bnb_4bit_quant_type) == (True, torch.float16, "nf4")
    # placed and typed by from_pretrained: not cast afterwards (a quantized model cannot be)
    assert model.dtype == torch.float16 and not model.training
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|im_end|>", "<end_of_utterance>")


@pytest.mark.parametrize(
    ("name", "device", "message"),
    [
        (TINY_RANDOM, GPU, "'tiny-random' is built in code .* cannot be loaded in 4 bits"),
        (SMOLLM2, GPU, "'smollm2-135m' is built in code .* converted from a GGUF"),
        (HUB_NAME, torch.device("cpu"), "needs a CUDA GPU"),
        ("./no-such-folder", GPU, "'./no-such-folder' does not exist or is not a folder"),
    ],
)
def test_4bit_refuses_what_it_cannot_load(fake_4bit, name, device, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(name, device=device, load_in_4bit=True)
    assert fake_4bit == []


def test_4bit_without_bitsandbytes_says_how_to_install_it(fake_4bit, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ModelLoadError, match="pip install bitsandbytes"):
        load_model(HUB_NAME, device=GPU, load_in_4bit=True)


def test_4bit_hub_errors_become_a_model_load_error(fake_4bit, monkeypatch):
    def offline(path, **kwargs):
        raise OSError(f"cannot reach the hub for {path}")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match=f"could not load SmolVLM2 model '{HUB_NAME}': cannot reach the hub"):
        load_model(HUB_NAME, device=GPU, load_in_4bit=True)


def test_4bit_checks_pad_against_eos_before_loading_weights(fake_4bit, home_checkpoint):
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(home_checkpoint)
    with pytest.raises(ModelLoadError, match="equal to EOS"):
        load_model(str(home_checkpoint), device=GPU, load_in_4bit=True)
    assert fake_4bit == []


def _train_config(tmp_path, **kwargs) -> TrainConfig:
    return TrainConfig(
        shards=tmp_path / "shards",
        model=HUB_NAME,
        out=tmp_path / "run",
        load_in_4bit=True,
        lora_rank=4,
        lora_alpha=8,
        **kwargs,
    )


def test_train_prepares_the_4bit_base_for_kbit_training(tmp_path, monkeypatch):
    import peft

    loads, prepared = [], []

    def fake_load(name, **kwargs):
        loads.append((name, kwargs))
        model, tokenizer = build_tiny_random(0)
        return model.half(), tokenizer

    def prepare(model, **kwargs):
        prepared.append(kwargs)
        return real_prepare(model, **kwargs)

    real_prepare = peft.prepare_model_for_kbit_training
    monkeypatch.setattr(build, "load_model", fake_load)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    monkeypatch.setattr(DSTModel, "to", lambda self, *args, **kwargs: self)  # no GPU to move the heads to
    model, _ = build_model(_train_config(tmp_path), Runtime(0, 1, 0, torch.device("cuda", 0), "fp16"))
    assert loads == [(HUB_NAME, {"device": torch.device("cuda", 0), "load_in_4bit": True})]
    assert prepared == [{"use_gradient_checkpointing": False}]
    base = model.vlm.get_base_model()
    # peft's preparation: the base frozen and its fp16 weights made fp32 master weights; LoRA trains on top
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    trainable = {n for n, p in model.vlm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(TrainConfigError, match="trains LoRA adapters only"):
        build_model(_train_config(tmp_path, lora=False), Runtime(0, 1, 0, torch.device("cuda", 0), "fp16"))


def _lora_checkpoint(folder, in_4bit: bool) -> DSTModel:
    """A saved LoRA checkpoint of the tiny model with non-zero B (LoRA starts as a no-op), and the model."""
    vlm, tokenizer = build_tiny_random(0)
    freeze_vision(vlm)
    torch.manual_seed(3)
    model = DSTModel(wrap_lora(vlm, rank=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.eval().save(folder, tokenizer)
    cfg = TrainConfig(shards=folder, model=TINY_RANDOM, out=folder, load_in_4bit=in_4bit)
    (folder / DST_META).write_text(json.dumps(dst_meta(cfg, SimpleNamespace(tokens_per_frame=5, hidden_size=64))))
    return model


def _logits(model: DSTModel) -> torch.Tensor:
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        hidden, _ = model.hidden_states(ids, ids == -1, torch.zeros(0, 64))
        update, speak = model.decision_logits(hidden)
        return torch.cat([model.lm_head(hidden)[0], update.T, speak.T], dim=1)


def test_eval_merges_lora_into_a_full_base_with_the_same_logits(tmp_path):
    trained = _lora_checkpoint(tmp_path, in_4bit=False)
    loaded, _, meta = load_dst_model(tmp_path)
    assert meta["lora"] and meta["load_in_4bit"] is False
    assert not isinstance(loaded.vlm, PeftModel)
    assert [n for n, _ in loaded.named_modules() if "lora" in n] == []
    assert all("lora" not in type(m).__name__.lower() for m in loaded.modules())
    torch.testing.assert_close(_logits(loaded), _logits(trained), atol=1e-5, rtol=1e-5)
    # the adapters mattered: a merge that dropped them would not match
    base = DSTModel(build_tiny_random(0)[0]).eval()
    base.load_extra_state(tmp_path)
    assert (_logits(base) - _logits(trained)).abs().max() > 1e-3


def test_dst_json_records_4bit_and_eval_loads_that_base_in_4bit_unmerged(tmp_path, monkeypatch):
    _lora_checkpoint(tmp_path, in_4bit=True)
    assert json.loads((tmp_path / DST_META).read_text())["load_in_4bit"] is True
    loads = []

    def fake_load(name, **kwargs):
        loads.append((name, kwargs))
        model, tokenizer = build_tiny_random(0)
        return model.half(), tokenizer

    monkeypatch.setattr(checkpoint, "load_model", fake_load)
    monkeypatch.setattr(DSTModel, "to", lambda self, *args, **kwargs: self)  # no GPU to move the model to
    loaded, _, meta = load_dst_model(tmp_path, torch.device("cuda", 0), torch.float16)
    assert loads == [(TINY_RANDOM, {"dtype": torch.float16, "device": torch.device("cuda", 0), "load_in_4bit": True})]
    assert meta["load_in_4bit"] is True
    assert isinstance(loaded.vlm, PeftModel)  # merging into 4-bit weights would be lossy: kept as adapters
    assert any("lora_B" in n for n, _ in loaded.named_parameters())
