"""`--batch-size auto`: the largest token budget per micro-batch whose peak GPU memory stays under a fraction.

The probe runs forward + backward on a synthetic full-length batch of that many tokens and adds what AdamW's
state will hold (two fp32 moments per trainable parameter), since no optimizer step is taken during the search.
"""

from __future__ import annotations

from typing import Callable

import torch

from train.batch import Batch

CPU_DEFAULT_BUDGET = 4096
MIN_BUDGET = 256


def search_budget(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """Largest budget in [MIN_BUDGET, limit] with `fits(budget)`, assuming fits is monotone: double from `start`
    until it fails, then bisect (to a multiple of 64). Raises if even MIN_BUDGET does not fit."""
    if not fits(MIN_BUDGET):
        raise RuntimeError(f"even {MIN_BUDGET} tokens per micro-batch exceed the memory limit")
    good, bad = MIN_BUDGET, None
    probe = max(start, MIN_BUDGET)
    while bad is None and good < limit:
        probe = min(max(probe, good * 2), limit)
        if fits(probe):
            good = probe
        else:
            bad = probe
    if bad is None:
        return good
    while bad - good > 64:
        mid = (good + bad) // 2 // 64 * 64
        if mid <= good:
            break
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def synthetic_batch(fmt, hidden: int, tokens: int, max_seq_len: int, device) -> Batch:
    """`tokens` tokens as full sequences of at most `max_seq_len`, with frames, decisions and LM targets spread
    over them in the proportions of real windows (roughly)."""
    length = min(tokens, max_seq_len)
    rows = max(1, tokens // length)
    ids = torch.randint(0, fmt.image_id, (rows, length), device=device)
    image_mask = torch.zeros(rows, length, dtype=torch.bool, device=device)
    image_mask[:, 1::2] = True  # about half the tokens are frame tokens at 5 per frame
    n_img = int(image_mask.sum())
    pos = torch.arange(1, length, 8, device=device)
    index = torch.stack([torch.arange(rows, device=device).repeat_interleave(len(pos)), pos.repeat(rows)], 1)
    labels = (torch.rand(len(index), device=device) < 0.1).float()
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), image_mask=image_mask,
                 frame_embeds=torch.randn(n_img, hidden, device=device, dtype=torch.float16),
                 update_index=index, update_labels=labels, update_weights=torch.ones_like(labels),
                 speak_index=index, speak_labels=labels, speak_weights=torch.ones_like(labels),
                 dst_index=index[::4], response_index=index[1::4])


def resolve_token_budget(cfg, runtime, model, fmt, hidden: int) -> int:
    if cfg.batch_size != "auto":
        return int(cfg.batch_size)
    if runtime.device.type != "cuda":
        return CPU_DEFAULT_BUDGET
    from train.step import loss_terms

    device = runtime.device
    total = torch.cuda.get_device_properties(device).total_memory
    optimizer_bytes = 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)

    def fits(tokens: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            batch = synthetic_batch(fmt, hidden, tokens, cfg.max_seq_len, device)
            with runtime.autocast():
                out = model(batch)
            terms, _ = loss_terms(out, batch, cfg)
            sum(terms.values()).backward()
            peak = torch.cuda.max_memory_allocated(device) + optimizer_bytes
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
        return peak <= cfg.memory_fraction * total

    return search_budget(fits, start=cfg.max_seq_len, limit=64 * cfg.max_seq_len)
