"""pipeline.smolvlm: the tiny offline build, its tokenizer, real-checkpoint shapes and the loading path."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import ModelLoadError, load_model
from pipeline.smolvlm import (
    END_OF_UTTERANCE,
    FAKE_IMAGE,
    GLOBAL_IMG,
    IM_END,
    IM_START,
    IMAGE,
    ROW_COL_TOKENS,
    TINY_RANDOM,
    _tiny_tokenizer_json,
    build_random,
    build_tiny_random,
    build_tiny_tokenizer,
    shape_config,
    vision_spec,
)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_random(seed=0)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone(tiny):
    model, _ = tiny
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again, _ = build_tiny_random(seed=0)
    assert torch.equal(torch.rand(3), expected)  # building did not consume the caller's RNG
    assert _same_weights(model, again)
    other, _ = build_tiny_random(seed=1)
    assert not _same_weights(model, other)


def test_tiny_build_shapes_dtype_and_attention(tiny):
    model, tokenizer = tiny
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert not model.training
    tc = model.config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads) == (64, 2, 4, 2)
    assert tc.vocab_size == len(tokenizer) == model.lm_head.out_features
    assert model.config.image_token_id == tokenizer.image_token_id
    spec = vision_spec(model)
    assert (spec.image_size, spec.patch_size, spec.scale_factor, spec.grid) == (64, 8, 2, 4)
    assert spec.tokens_per_frame == 16 == model.model.image_seq_len  # transformers' own formula agrees
    assert spec.text_hidden_size == 64


def test_pad_is_not_eos_and_special_tokens_are_single_tokens(tiny):
    model, tok = tiny
    assert tok.eos_token == END_OF_UTTERANCE and tok.pad_token == IM_END and tok.bos_token == IM_START
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.unk_token_id == 0 and tok.bos_token_id == 1 and tok.pad_token_id == 2  # real SmolVLM2 layout
    for token in [IM_START, IM_END, END_OF_UTTERANCE, IMAGE, FAKE_IMAGE, GLOBAL_IMG, *ROW_COL_TOKENS]:
        ids = tok(f"a{token}b", add_special_tokens=False).input_ids
        assert tok.convert_tokens_to_ids(token) in ids and len(tok(token, add_special_tokens=False).input_ids) == 1
    assert (tok.image_token, tok.fake_image_token, tok.global_image_token) == (IMAGE, FAKE_IMAGE, GLOBAL_IMG)
    tc = model.config.text_config
    assert (tc.eos_token_id, tc.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert tc.bos_token_id == tok.bos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_tokenizer_is_deterministic_and_round_trips_text():
    # the trained JSON is cached per process: retrain for real to check the training itself is deterministic
    assert _tiny_tokenizer_json.__wrapped__() == _tiny_tokenizer_json.__wrapped__() == _tiny_tokenizer_json()
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a is not b and a.get_vocab() == b.get_vocab()
    assert len(a) == 1118  # 990 trained BPE tokens + 128 added tokens, as in the real layout (49152 + 128)
    texts = [
        "Now you should attach the wheel to the chassis.",
        "S1=completed; S2=in_progress; S13=not_started",
        "  leading spaces, tabs\tand\nnew lines  ",
        "Unicode: café, naïve, 東京, emoji 🙂 — dash",
        "",
    ]
    for text in texts:
        ids = a(text, add_special_tokens=False).input_ids
        assert ids == b(text, add_special_tokens=False).input_ids
        assert a.decode(ids) == text


def test_tokenizer_adds_no_bos_or_eos_by_itself(tiny):
    _, tok = tiny
    ids = tok("hello").input_ids
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


def test_chat_template_is_smolvlm2s(tiny):
    _, tok = tiny
    messages = [{"role": "user", "content": "What now?"}, {"role": "assistant", "content": "Tighten the nut."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>User: What now?<end_of_utterance>\nAssistant: Tighten the nut.<end_of_utterance>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<end_of_utterance>\nAssistant:")
    image_msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert tok.apply_chat_template(image_msg, tokenize=False) == "<|im_start|>User:<image>Hi<end_of_utterance>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.eos_token_id) == 2 and tok.pad_token_id not in ids


def test_save_pretrained_then_load_model_round_trips(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(tmp_path)
    assert _same_weights(model, loaded)
    assert loaded.config._attn_implementation == "sdpa" and not loaded.training
    assert loaded_tok.get_vocab() == tok.get_vocab()
    assert (loaded_tok.eos_token_id, loaded_tok.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert loaded_tok.image_token_id == tok.image_token_id
    assert loaded_tok.chat_template == tok.chat_template
    text = "<|im_start|>User: attach the wheel<image><end_of_utterance>\nAssistant:"
    assert loaded_tok(text).input_ids == tok(text).input_ids
    half, _ = load_model(tmp_path, dtype="float16")
    assert all(p.dtype == torch.float16 for p in half.parameters())


def test_load_model_tiny_random_and_dtype(tiny):
    model, tok = load_model(TINY_RANDOM, dtype=torch.float16, device="cpu")
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert len(tok) == model.config.text_config.vocab_size
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(TINY_RANDOM, dtype="float8")


def test_load_model_missing_folder_fails_fast_and_clearly(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model") as info:
        load_model(missing)
    assert TINY_RANDOM in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_model(tmp_path / "empty")


# Numbers from the checkpoints' config.json on the hub (see pipeline/smolvlm.py).
REAL = {
    # name: (text hidden, layers, heads, kv heads, intermediate, vision hidden, vision layers, image, patch, scale,
    #        rope theta, tokens per frame)
    "256M": (576, 30, 9, 3, 1536, 768, 12, 512, 16, 4, 100000.0, 64),
    "500M": (960, 32, 15, 5, 2560, 768, 12, 512, 16, 4, 100000.0, 64),
    "2.2B": (2048, 24, 32, 32, 8192, 1152, 27, 384, 14, 3, 273768.0, 81),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_shape_config_has_the_real_checkpoint_shapes(name):
    config = shape_config(name)
    tc, vc = config.text_config, config.vision_config
    got = (
        tc.hidden_size,
        tc.num_hidden_layers,
        tc.num_attention_heads,
        tc.num_key_value_heads,
        tc.intermediate_size,
        vc.hidden_size,
        vc.num_hidden_layers,
        vc.image_size,
        vc.patch_size,
        config.scale_factor,
        tc.rope_parameters["rope_theta"],
        vision_spec(config).tokens_per_frame,
    )
    assert got == REAL[name]
    assert tc.vocab_size == 49280 and config.image_token_id == 49190 and not config.tie_word_embeddings
    assert (tc.bos_token_id, tc.pad_token_id, tc.eos_token_id) == (1, 2, 49279)
    assert vision_spec(config).text_hidden_size == tc.hidden_size


# fp32 model.safetensors sizes in the hub file listings: 1.03 GB, 2.03 GB, 4.96 + 4.03 GB -> parameter counts.
@pytest.mark.parametrize("name,params", [("256M", 256_484_928), ("500M", 507_482_304), ("2.2B", 2_246_784_880)])
def test_build_random_parameter_count_matches_the_checkpoint(name, params):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_random(name, seed=0)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.model.image_seq_len == vision_spec(model).tokens_per_frame


def test_shape_config_rejects_unknown_size():
    with pytest.raises(ValueError, match="256M"):
        shape_config("1B")
