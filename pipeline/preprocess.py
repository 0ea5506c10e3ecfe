"""SmolVLM frame preprocessing without torchvision (docs/design.md §4.1, §9): resize, rescale 1/255, normalize
mean 0.5 std 0.5.

Matches transformers 5.24 `SmolVLMImageProcessor` with `do_image_splitting=False` (without torchvision it *is*
`SmolVLMImageProcessorPil`), step for step:
  1. resize so the longest edge is `size["longest_edge"]` (aspect kept; the other side `int(...)`, bumped to even),
  2. resize to a `max_image_size["longest_edge"]` square (aspect NOT kept: non-square frames are stretched),
  both with PIL LANCZOS on uint8 pictures (rounded to uint8 after each step),
  3. `x.astype(float64) * (1/255)` cast to float32, then `(x - 0.5) / 0.5` in float32 (done as a lookup of
     the 256 levels, bit-identical).
Step 1 is the `longest_edge` argument. Left out (None), frames go straight to the square in one LANCZOS resize, which
is SmolVLM2's video path (its `video_size` longest edge equals `max_image_size`, so step 1 is the same square
resize); with `longest_edge=size["longest_edge"]` (2048 in SmolVLM2 checkpoints) the result equals the image
processor exactly, at the cost of upsampling every frame to 2048 px first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

MEAN = STD = 0.5  # SmolVLM's image_mean / image_std, same for the 3 channels
_MAX_IMAGE_SIZE = 4096  # the processor's absolute cap; we refuse larger longest_edge rather than copy its rule


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) after the processor's longest-edge resize (its `_resize_output_size_rescale_to_max_len`)."""
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _normalize_table() -> np.ndarray:
    """float32 value of every uint8 level, by the processor's arithmetic (float64 rescale, float32 cast, float32
    normalize). Each output depends only on its input level, so a lookup gives bit-identical values, much faster."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (levels - np.float32(MEAN)) / np.float32(STD)


NORMALIZED = _normalize_table()


def check_frame(frame: np.ndarray) -> None:
    if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected a uint8 frame [H, W, 3], got {frame.dtype} {frame.shape}")


def preprocess_into(
    frames: Sequence[np.ndarray], image_size: int, out: np.ndarray, longest_edge: int | None = None
) -> None:
    """Write the pixel values of uint8 RGB frames (each [H, W, 3], sizes may differ) into `out[:len(frames)]`,
    a float32 array [>= N, 3, image_size, image_size] (e.g. a shared-memory buffer of the frame feeder)."""
    if longest_edge is not None and not 0 < longest_edge <= _MAX_IMAGE_SIZE:
        raise ValueError(f"longest_edge must be in 1..{_MAX_IMAGE_SIZE}, got {longest_edge}")
    if out.dtype != np.float32 or out.shape[1:] != (3, image_size, image_size) or len(out) < len(frames):
        raise ValueError(
            f"out must be float32 [>= {len(frames)}, 3, {image_size}, {image_size}], got {out.dtype} {out.shape}"
        )
    for i, frame in enumerate(frames):
        check_frame(frame)
        image = Image.fromarray(frame, "RGB")
        if longest_edge is not None:
            h, w = longest_edge_size(frame.shape[0], frame.shape[1], longest_edge)
            image = image.resize((w, h), Image.LANCZOS)  # PIL returns a copy when the size is unchanged
        square = np.asarray(image.resize((image_size, image_size), Image.LANCZOS))
        out[i] = NORMALIZED[square].transpose(2, 0, 1)


def preprocess_frames(frames: np.ndarray, image_size: int, longest_edge: int | None = None) -> torch.Tensor:
    """uint8 RGB frames [N, H, W, 3] -> float32 torch pixel values [N, 3, image_size, image_size] in [-1, 1].

    `image_size` is the processor's `max_image_size["longest_edge"]` (the vision encoder's input, 512 for
    SmolVLM2-256M/500M); `longest_edge` is its `size["longest_edge"]` step (see module doc)."""
    import torch  # here, not at the top: the frame feeder's worker processes use only preprocess_into

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {frames.shape}")
    pixels = torch.empty((len(frames), 3, image_size, image_size), dtype=torch.float32)
    preprocess_into(list(frames), image_size, pixels.numpy(), longest_edge)
    return pixels
