"""Frame embeddings: SmolVLM2's vision encoder + connector on whole (unsplit) frames, pooled to a small token budget.

A frame becomes the connector's G x G grid of text-width tokens (G = 8 for 256M/500M, 9 for 2.2B). `pool_tokens`
cuts that to `tokens_per_frame`:

- `1`: the mean over the grid;
- `1 + k*k` (5 = 1 + 2x2, 17 = 1 + 4x4, ...): the mean, then the grid average-pooled to k x k, row-major
  (`adaptive_avg_pool2d`, so windows overlap when k does not divide G, e.g. 9 -> 2);
- `"all"` (or G*G): the grid unchanged.

Stored as float16 (docs/design.md §4.1).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from pipeline.config import ALL, DEFAULT_TOKENS_PER_FRAME, TOKENS_PER_FRAME_OPTIONS, parse_tokens_per_frame


def _pooled_side(tokens_per_frame: int | str, grid: int) -> int | None:
    """k for `1 + k*k` (0 for the mean alone), or None for the whole grid; ValueError where it is undefined."""
    option = parse_tokens_per_frame(tokens_per_frame)
    if option == ALL or option == grid * grid:
        return None
    k = round((option - 1) ** 0.5)
    if k * k != option - 1:
        raise ValueError(
            f"tokens_per_frame={option} is not 1 + k*k (1, 5, 17, ...) nor the full grid ({grid * grid}); "
            f"options are {TOKENS_PER_FRAME_OPTIONS}"
        )
    if k > grid:
        raise ValueError(
            f"tokens_per_frame={option} needs a {k}x{k} pooled grid but the connector gives only {grid}x{grid} "
            "tokens per frame"
        )
    return k


def tokens_per_frame_count(tokens_per_frame: int | str, grid: int) -> int:
    """How many tokens a frame becomes with this option on a `grid` x `grid` connector output."""
    k = _pooled_side(tokens_per_frame, grid)
    return grid * grid if k is None else 1 + k * k


def pool_tokens(tokens: torch.Tensor, tokens_per_frame: int | str) -> torch.Tensor:
    """`[N, G*G, H]` connector tokens (row-major grid) -> `[N, T, H]`: mean first, then the k x k pooled grid."""
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens of shape [N, G*G, H], got {tuple(tokens.shape)}")
    n, seq, hidden = tokens.shape
    grid = round(seq**0.5)
    if grid * grid != seq:
        raise ValueError(f"{seq} tokens per frame are not a square grid")
    k = _pooled_side(tokens_per_frame, grid)
    if k is None:
        return tokens
    mean = tokens.mean(dim=1, keepdim=True)
    if k == 0:
        return mean
    # [N, G*G, H] -> [N, H, G, G] -> [N, H, k, k] -> [N, k*k, H]; pooling in fp32 so fp16 inputs lose nothing extra
    as_image = tokens.float().transpose(1, 2).reshape(n, hidden, grid, grid)
    pooled = F.adaptive_avg_pool2d(as_image, k).reshape(n, hidden, k * k).transpose(1, 2).to(tokens.dtype)
    return torch.cat([mean, pooled], dim=1)


def connector_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[B, 3, S, S]` normalised frames -> `[B, G*G, H_text]`: what `SmolVLMModel.get_image_features` computes
    for single unsplit images (all-true patch mask, vision transformer, pixel-shuffle connector), minus its
    dropping of all-zero "padding" images, which would silently lose a real frame here."""
    inner = model.model
    patch = inner.config.vision_config.patch_size
    b, _, h, w = pixel_values.shape
    patch_mask = torch.ones((b, h // patch, w // patch), dtype=torch.bool, device=pixel_values.device)
    hidden = inner.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_mask).last_hidden_state
    return inner.connector(hidden)


def encode_frames(
    model,
    pixel_values: torch.Tensor,
    tokens_per_frame: int | str = DEFAULT_TOKENS_PER_FRAME,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Encode `[N, 3, S, S]` float frames (resized to the model's image_size, /255, normalised with mean 0.5 and
    std 0.5) into `[N, T, H_text]` float16 frame tokens, on CPU.

    Runs on `device` (default: where the vision tower is; a given device moves the vision tower and connector
    there). CUDA computes under fp16 autocast (Turing has no bf16); CPU computes in the model's dtype.
    """
    if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
        raise ValueError("pixel_values must be a float tensor of normalised frames (uint8 frames are not normalised)")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"expected pixel_values of shape [N, 3, S, S], got {tuple(pixel_values.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vc = model.config.vision_config
    if pixel_values.shape[-2:] != (vc.image_size, vc.image_size):
        raise ValueError(
            f"frames are {tuple(pixel_values.shape[-2:])} but the model expects {vc.image_size}x{vc.image_size}; "
            "resize before encoding"
        )
    inner = model.model
    if device is not None:
        inner.vision_model.to(device)
        inner.connector.to(device)
    param = next(inner.vision_model.parameters())
    run_device, dtype = param.device, param.dtype
    grid = vc.image_size // vc.patch_size // model.config.scale_factor
    count = tokens_per_frame_count(tokens_per_frame, grid)  # validates the option before any compute

    autocast = torch.autocast("cuda", dtype=torch.float16) if run_device.type == "cuda" else nullcontext()
    modules = (inner.vision_model, inner.connector)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    out = []
    try:
        # no_grad rather than inference_mode: the result may later meet autograd (e.g. streaming eval)
        with torch.no_grad(), autocast:
            for start in range(0, pixel_values.shape[0], batch_size):
                batch = pixel_values[start : start + batch_size].to(run_device, dtype=dtype)
                pooled = pool_tokens(connector_tokens(model, batch), tokens_per_frame)
                out.append(pooled.to("cpu", torch.float16))
    finally:
        for m, flag in zip(modules, was_training):
            m.train(flag)
    if not out:
        return torch.empty((0, count, model.config.text_config.hidden_size), dtype=torch.float16)
    return torch.cat(out, dim=0)
