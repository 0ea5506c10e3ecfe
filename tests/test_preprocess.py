"""Our SmolVLM frame preprocessing: exact values, and agreement with transformers' SmolVLMImageProcessor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.frames_files import synthetic_jpegs
from pipeline.preprocess import longest_edge_size, preprocess_frames


def test_constant_channels_give_known_values():
    frames = np.zeros((2, 20, 30, 3), np.uint8)
    frames[..., 1] = 255
    frames[..., 2] = 128
    out = preprocess_frames(frames, 8)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32 and out.is_contiguous()
    # LANCZOS keeps a constant picture constant; 128 -> float32((128/255 - 0.5) / 0.5) exactly.
    v128 = float((np.float32(128 * (1 / 255)) - np.float32(0.5)) / np.float32(0.5))
    assert torch.equal(out[:, 0], torch.full((2, 8, 8), -1.0))
    assert torch.equal(out[:, 1], torch.full((2, 8, 8), 1.0))
    assert torch.equal(out[:, 2], torch.full((2, 8, 8), v128))
    assert v128 == pytest.approx(1 / 255, abs=1e-6)


def test_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        preprocess_frames(np.zeros((1, 8, 8, 3), np.float32), 8)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        preprocess_frames(np.zeros((8, 8, 3), np.uint8), 8)


@pytest.mark.parametrize(
    "h, w, edge, expected",
    [
        (48, 48, 96, (96, 96)),
        (30, 50, 96, (58, 96)),  # int(96 * 30 / 50) = 57 -> bumped to even 58
        (50, 31, 99, (99, 62)),
        (384, 384, 2048, (2048, 2048)),
    ],
)
def test_longest_edge_rule(h, w, edge, expected):
    assert longest_edge_size(h, w, edge) == expected


def _gradient_frames(n: int, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in synthetic_jpegs(n, size)])


CASES = [  # (longest_edge, image_size, frames): square and non-square, with and without the longest-edge step
    (None, 32, "gradient48"),
    (96, 32, "gradient48"),
    (100, 24, "gradient48"),
    (96, 32, "noise30x50"),
    (97, 24, "noise50x31"),
]


def _frames(name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    return {
        "gradient48": lambda: _gradient_frames(3, 48),
        "noise30x50": lambda: rng.integers(0, 256, (2, 30, 50, 3), dtype=np.uint8),
        "noise50x31": lambda: rng.integers(0, 256, (2, 50, 31, 3), dtype=np.uint8),
    }[name]()


def _reference(cls, frames: np.ndarray, longest_edge: int | None, image_size: int) -> torch.Tensor:
    # `size` is the first, aspect-keeping resize; with longest_edge None, size == image_size makes that step the
    # same square resize as ours (square inputs only, which is how CASES uses it).
    proc = cls(
        do_image_splitting=False,
        size={"longest_edge": longest_edge or image_size},
        max_image_size={"longest_edge": image_size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        resample=Image.LANCZOS,
    )
    out = proc(images=[[f] for f in frames], return_tensors="pt")["pixel_values"]
    assert out.shape[1] == 1  # unsplit: one picture per frame
    return out[:, 0]


@pytest.mark.parametrize("longest_edge, image_size, name", CASES)
def test_matches_pil_image_processor(longest_edge, image_size, name):
    """SmolVLMImageProcessorPil needs no torchvision: same PIL LANCZOS resizes and float arithmetic, so the values
    agree to float32 rounding (atol 1e-6; they are bit-identical here)."""
    from transformers import SmolVLMImageProcessorPil

    frames = _frames(name)
    ours = preprocess_frames(frames, image_size, longest_edge)
    ref = _reference(SmolVLMImageProcessorPil, frames, longest_edge, image_size)
    assert ours.shape == ref.shape == (len(frames), 3, image_size, image_size)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("longest_edge, image_size", [(None, 32), (96, 32)])
def test_matches_default_image_processor(longest_edge, image_size):
    """`SmolVLMImageProcessor` as users get it. Without torchvision transformers 5.24 falls back to the PIL class
    (so no skip is needed): exact, atol 1e-6. With torchvision it resizes with torchvision's LANCZOS (or BICUBIC
    on CUDA / torchvision < 0.27), so only closeness on smooth pictures is asserted: mean |diff| < 0.02 and
    max |diff| < 0.15 in normalized units (about 2.5 and 19 grey levels)."""
    from transformers import SmolVLMImageProcessor

    frames = _gradient_frames(3, 48)
    ours = preprocess_frames(frames, image_size, longest_edge)
    ref = _reference(SmolVLMImageProcessor, frames, longest_edge, image_size)
    assert ours.shape == ref.shape
    proc_name = type(SmolVLMImageProcessor(do_image_splitting=False)).__name__
    if proc_name == "SmolVLMImageProcessorPil":
        torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=0)
    else:
        diff = (ours - ref.float()).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.15, (proc_name, diff.mean(), diff.max())
