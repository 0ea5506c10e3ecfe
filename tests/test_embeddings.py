"""pipeline.embeddings: token pooling and frame encoding with the tiny random SmolVLM."""

from __future__ import annotations

import pytest
import torch

from pipeline.embeddings import (
    ALL,
    TOKENS_PER_FRAME_OPTIONS,
    encode_frames,
    parse_tokens_per_frame,
    pool_tokens,
    tokens_per_frame_count,
)
from pipeline.smolvlm import build_tiny_random, vision_spec


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = build_tiny_random(seed=0)
    return model


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(0)
    return torch.rand((5, 3, 64, 64), generator=g) * 2 - 1  # already normalised: [-1, 1]


def _grid(side: int, hidden: int = 2) -> torch.Tensor:
    """[1, side*side, hidden] with token (r, c) = r*side + c in channel 0 and 10x that in channel 1."""
    values = torch.arange(side * side, dtype=torch.float32)
    return torch.stack([values, 10 * values], dim=-1)[None, :, :hidden]


def test_pool_exact_values_on_a_4x4_grid():
    tokens = _grid(4)
    assert pool_tokens(tokens, 1)[0, :, 0].tolist() == [7.5]
    # mean, then the 2x2 quadrants in row-major order: TL (0,1,4,5), TR (2,3,6,7), BL (8,9,12,13), BR (10,11,14,15)
    five = pool_tokens(tokens, 5)
    assert five[0, :, 0].tolist() == [7.5, 2.5, 4.5, 10.5, 12.5]
    assert five[0, :, 1].tolist() == [75.0, 25.0, 45.0, 105.0, 125.0]
    seventeen = pool_tokens(tokens, 17)
    assert seventeen[0, :, 0].tolist() == [7.5] + list(range(16))
    assert torch.equal(pool_tokens(tokens, ALL), tokens)
    assert torch.equal(pool_tokens(tokens, 16), tokens)  # the full grid as a number


def test_pool_uneven_grid_uses_overlapping_adaptive_windows():
    # 3x3 -> 2x2: windows rows/cols [0:2] and [1:3], as for the 2.2B model's 9x9 grid
    out = pool_tokens(_grid(3), 5)[0, :, 0].tolist()
    assert out == [4.0, 2.0, 3.0, 5.0, 6.0]


def test_pool_keeps_dtype_and_batch():
    tokens = torch.randn(3, 81, 8).half()
    for option, count in [(1, 1), (5, 5), (17, 17), (ALL, 81), (81, 81)]:
        out = pool_tokens(tokens, option)
        assert out.shape == (3, count, 8) and out.dtype == torch.float16
    assert torch.allclose(pool_tokens(tokens, 1)[:, 0].float(), tokens.float().mean(1), atol=1e-3)


@pytest.mark.parametrize(
    "option,side,match",
    [(17, 2, "2x2"), (5, 1, "1x1"), (3, 4, "not 1 \\+ k\\*k"), (0, 4, "positive"), ("ten", 4, "positive")],
)
def test_pool_rejects_invalid_options(option, side, match):
    with pytest.raises(ValueError, match=match):
        pool_tokens(_grid(side), option)


def test_pool_rejects_non_square_token_counts():
    with pytest.raises(ValueError, match="square"):
        pool_tokens(torch.zeros(1, 15, 4), 5)
    with pytest.raises(ValueError, match="shape"):
        pool_tokens(torch.zeros(15, 4), 5)


def test_option_parsing_and_counts():
    assert parse_tokens_per_frame("5") == 5 and parse_tokens_per_frame(" ALL ") == ALL
    assert parse_tokens_per_frame(17) == 17
    with pytest.raises(ValueError):
        parse_tokens_per_frame(True)
    assert [tokens_per_frame_count(o, 8) for o in TOKENS_PER_FRAME_OPTIONS] == [1, 5, 17, 64]
    assert [tokens_per_frame_count(o, 9) for o in TOKENS_PER_FRAME_OPTIONS] == [1, 5, 17, 81]
    assert tokens_per_frame_count(64, 8) == 64


@pytest.mark.parametrize("option", TOKENS_PER_FRAME_OPTIONS)
def test_encode_frames_shapes_and_dtype(tiny_model, frames, option):
    spec = vision_spec(tiny_model)
    out = encode_frames(tiny_model, frames, option, batch_size=2)
    assert out.shape == (5, tokens_per_frame_count(option, spec.grid), spec.text_hidden_size)
    assert out.dtype == torch.float16 and out.device.type == "cpu" and not out.requires_grad
    assert torch.isfinite(out).all()


def test_encode_frames_is_batch_invariant(tiny_model, frames):
    together = encode_frames(tiny_model, frames, ALL, batch_size=5)
    alone = torch.cat([encode_frames(tiny_model, frames[i : i + 1], ALL, batch_size=1) for i in range(5)])
    assert torch.allclose(together.float(), alone.float(), atol=1e-3, rtol=1e-3)
    chunked = encode_frames(tiny_model, frames, ALL, batch_size=2)
    assert torch.allclose(together.float(), chunked.float(), atol=1e-3, rtol=1e-3)


def test_encode_frames_matches_transformers_get_image_features(tiny_model, frames):
    with torch.no_grad():
        features = tiny_model.get_image_features(frames[None]).pooler_output  # [1 batch, 5 images] -> list
    reference = features[0].reshape(5, 16, -1)
    for option in TOKENS_PER_FRAME_OPTIONS:
        expected = pool_tokens(reference, option).half()
        assert torch.allclose(encode_frames(tiny_model, frames, option).float(), expected.float(), atol=1e-3)


def test_encode_frames_restores_training_mode(tiny_model, frames):
    tiny_model.train()
    try:
        encode_frames(tiny_model, frames[:1], 5)
        assert tiny_model.model.vision_model.training and tiny_model.model.connector.training
    finally:
        tiny_model.eval()


def test_encode_frames_rejects_bad_input(tiny_model, frames):
    with pytest.raises(ValueError, match="float"):
        encode_frames(tiny_model, (frames * 127).to(torch.uint8), 5)
    with pytest.raises(ValueError, match="resize"):
        encode_frames(tiny_model, torch.zeros(1, 3, 32, 32), 5)
    with pytest.raises(ValueError, match="shape"):
        encode_frames(tiny_model, torch.zeros(1, 1, 64, 64), 5)
    with pytest.raises(ValueError, match="4x4"):  # the tiny grid is 4x4: a 5x5 pooled grid does not fit
        encode_frames(tiny_model, frames, 26)


def test_encode_frames_of_nothing_is_empty(tiny_model):
    out = encode_frames(tiny_model, torch.zeros(0, 3, 64, 64), 5)
    assert out.shape == (0, 5, 64) and out.dtype == torch.float16
