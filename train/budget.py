"""The token budget per micro-batch: `--batch-size N` checked, or `--batch-size auto` searched on the GPU.

A budget is never below the longest window a run can cut (`max_seq_len`): a longer window would go alone into a
micro-batch bigger than the budget, a size the search never measured.

The search runs forward + backward on probe batches shaped like the worst real batch of that budget (see
`ProbeShape`) and keeps the largest budget whose peak, counted as the run will hold it (`run_peak`), stays under
`memory_fraction` of the card. Budgets are whole multiples of `max_seq_len`: the probe at budget B is
ceil(B / max_seq_len) full-length rows, so every budget between two multiples measures the same as the upper one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from core.errors import DataError
from train.batch import Batch
from train.config import TrainConfigError
from train.sequence import build_window
from train.windows import cut_windows

CPU_DEFAULT_BUDGET = 4096
MAX_ROWS = 64  # the search stops at 64 full-length rows: larger micro-batches are no faster
PROBE_VIDEOS = 64  # videos whose windows set the probe's shares (evenly spaced over the shards)
OPTIMIZER_BYTES_PER_PARAM = 8  # AdamW's two fp32 moments; no optimizer step is taken during the search
DDP_BYTES_PER_PARAM = 4  # DDP's fp32 gradient buckets, created after the search, under world size > 1
# Memory the caching allocator never reports (absent from max_memory_reserved): the CUDA context with its loaded
# kernels and the cuBLAS/cuDNN handles (about 0.3-0.7 GiB), and NCCL's communicator buffers under DDP (a few hundred
# MiB). cuBLAS workspaces come from the allocator, so the probe's reserved memory holds them already.
CONTEXT_BYTES = 768 * 2**20
NCCL_BYTES = 512 * 2**20
# Errors that mean "this budget does not fit": torch's own, and a cuBLAS or kernel allocation failing outside the
# allocator, which arrives as a plain RuntimeError.
OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


# ----------------------------------------------------------------------------------------------- memory arithmetic


class MemoryReader(Protocol):
    """Where the search reads memory: the card's size and the allocator's peak since the last `reset`."""

    def total(self) -> int: ...

    def peak_reserved(self) -> int: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class CudaMemory:
    device: torch.device

    def total(self) -> int:
        # a process capped with set_per_process_memory_fraction (the device check's 24 GB stand-in) owns that share
        card = torch.cuda.get_device_properties(self.device).total_memory
        return int(card * torch.cuda.get_per_process_memory_fraction(self.device))

    def peak_reserved(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def reset(self) -> None:
        torch.cuda.empty_cache()  # reserved memory starts from what is allocated, not from the last probe's cache
        torch.cuda.reset_peak_memory_stats(self.device)


def run_peak(peak_reserved: int, trainable: int, world: int) -> int:
    """Bytes the card holds at a real step's peak, from a probe's peak reserved memory (weights, activations,
    gradients and the allocator's fragmentation): plus AdamW's state, DDP's buckets when world > 1, and what the
    allocator does not see (`CONTEXT_BYTES`, `NCCL_BYTES` under DDP).

    The rule: the chosen budget is the largest with `run_peak <= memory_fraction * total`, so at the default 0.9 a
    real run's peak (reserved + context) lands at 87-90% of the card when a row is a few % of it; the rest is
    headroom for fragmentation that grows over a run's varying batch shapes."""
    ddp = (DDP_BYTES_PER_PARAM * trainable + NCCL_BYTES) if world > 1 else 0
    return peak_reserved + OPTIMIZER_BYTES_PER_PARAM * trainable + ddp + CONTEXT_BYTES


def memory_fits(
    step: Callable[[int], None], memory: MemoryReader, fraction: float, trainable: int, world: int
) -> Callable[[int], bool]:
    """`fits(tokens)`: run `step(tokens)` (a probe's forward + backward) and compare its `run_peak` with
    `fraction` of the card. Out-of-memory errors pass through to `search_budget`."""

    def fits(tokens: int) -> bool:
        memory.reset()
        step(tokens)
        return run_peak(memory.peak_reserved(), trainable, world) <= fraction * memory.total()

    return fits


# ----------------------------------------------------------------------------------------------- search


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(m.lower() in str(exc).lower() for m in OOM_MARKERS)
    )


def search_budget(fits: Callable[[int], bool], start: int, limit: int, unit: int = 64, context: str = "") -> int:
    """Largest multiple of `unit` in [unit, limit] with `fits(budget)`, assuming fits is monotone: double from
    `start` until it fails, then bisect. An out-of-memory error from `fits` counts as not fitting; any other error
    propagates. Raises DataError (message + `context`) when even `unit` tokens do not fit."""

    def ok(units: int) -> bool:
        try:
            return fits(units * unit)
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            return False  # the exception (and the probe's tensors its frames hold) is released here

    if not ok(1):
        raise DataError(f"even {unit} tokens per micro-batch exceed the memory limit{context}")
    good, bad, top = 1, None, max(1, limit // unit)
    probe = max(1, start // unit)
    while bad is None and good < top:
        probe = min(max(probe, good * 2), top)
        if ok(probe):
            good = probe
        else:
            bad = probe
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good * unit


# ----------------------------------------------------------------------------------------------- probe batches


@dataclass(frozen=True)
class ProbeShape:
    """What a probe row looks like. `length` is the longest a window can be; the shares are the largest of any
    sampled real window, so a packed batch (its targets over its padded tokens) never has a larger share."""

    length: int
    lm_share: float  # LM-target tokens (DST, response, summary) per token
    image_share: float  # `<image>` tokens per token


def probe_shape(index, fmt, max_seq_len: int, videos: int = PROBE_VIDEOS) -> ProbeShape:
    """From the real windows of up to `videos` videos, evenly spaced over the shards (all of them when fewer)."""
    ids = list(index.video_ids)
    sample = ids[:: max(1, len(ids) // videos)][:videos]
    lm = image = 0.0
    for vid in sample:
        meta = index.meta(vid)
        try:
            windows = cut_windows(fmt, meta, vid, max_seq_len)
        except ValueError as exc:  # a frame that cannot fit max_seq_len: the loader would refuse it too
            raise TrainConfigError(f"{exc}; raise --max-seq-len") from None
        for w in windows:
            seq = build_window(fmt, meta, w.conversation, w.start, w.end)
            targets = len(seq.dst_targets) + len(seq.response_targets) + len(seq.summary_targets)
            lm = max(lm, targets / w.n_tokens)
            image = max(image, len(seq.image_positions) / w.n_tokens)
    return ProbeShape(max_seq_len, lm, image)


def probe_batch(shape: ProbeShape, tokens: int, fmt, hidden: int, device) -> Batch:
    """ceil(tokens / length) rows of `length` tokens with the shape's shares: LM targets (all in the response term:
    one large logits tensor is the costlier case), frames, one decision pair per frame, and one pad token in the
    last row, so attention takes the masked path that padded real batches take."""
    length = shape.length
    rows = max(1, math.ceil(tokens / length))
    ids = torch.randint(0, fmt.image_id, (rows, length), device=device)
    attention = torch.ones_like(ids)
    if rows > 1:
        attention[-1, -1] = 0
    n_img = min(length, math.ceil(shape.image_share * length))
    image_mask = torch.zeros(rows, length, dtype=torch.bool, device=device)
    image_mask[:, :n_img] = True
    n_lm = min(length - 2, math.ceil(shape.lm_share * length))  # targets in [1, length - 1): shift and pad
    n_dec = max(1, n_img // fmt.tokens_per_frame)
    row = torch.arange(rows, device=device)

    def index(positions: torch.Tensor) -> torch.Tensor:
        return torch.stack([row.repeat_interleave(len(positions)), positions.repeat(rows)], 1)

    decisions = index(torch.linspace(0, length - 2, n_dec, device=device).long())
    labels = (torch.rand(len(decisions), device=device) < 0.1).float()
    return Batch(
        input_ids=ids,
        attention_mask=attention,
        image_mask=image_mask,
        frame_embeds=torch.randn(rows * n_img, hidden, device=device, dtype=torch.float16),
        update_index=decisions,
        update_labels=labels,
        update_weights=torch.ones_like(labels),
        speak_index=decisions,
        speak_labels=labels,
        speak_weights=torch.ones_like(labels),
        dst_index=torch.zeros(0, 2, dtype=torch.long, device=device),
        response_index=index(torch.arange(length - 1 - n_lm, length - 1, device=device)),
    )


# ----------------------------------------------------------------------------------------------- the budget


def longest_window(cfg) -> int:
    """The longest window any of the run's data may cut (the curriculum's short windows may be set longer)."""
    return max(cfg.max_seq_len, (cfg.curriculum_max_seq_len or 0) if cfg.curriculum_steps else 0)


def memory_advice(cfg, precision: str) -> str:
    """`: model M (mode) ...; try ...`, the end of the one line a run that does not fit stops with."""
    mode = (
        ("LoRA" if cfg.lora else "full fine-tuning")
        + (", 4-bit" if cfg.load_in_4bit else "")
        + (", gradient checkpointing" if cfg.gradient_checkpointing else "")
        + f", {precision}"
    )
    tries = [] if cfg.lora else ["LoRA (--lora)"]
    tries += [] if cfg.load_in_4bit else ["--load-in-4bit" + ("" if cfg.lora else " with --lora")]
    tries += [] if cfg.gradient_checkpointing else ["--gradient-checkpointing"]
    tries.append(f"a shorter --max-seq-len (now {cfg.max_seq_len})")
    return f" of {cfg.memory_fraction:.0%} of the GPU for {cfg.model} ({mode}); try " + ", ".join(tries)


def resolve_token_budget(cfg, runtime, model, fmt, index, memory: MemoryReader | None = None) -> int:
    """`--batch-size N` (refused below the longest window), or auto: the search on CUDA (or on any device with
    an injected `memory` reader), CPU_DEFAULT_BUDGET (at least the longest window) on CPU."""
    longest = longest_window(cfg)
    if cfg.batch_size != "auto":
        budget = int(cfg.batch_size)
        if budget < longest:
            raise TrainConfigError(
                f"--batch-size {budget} is below the longest window ({longest} tokens: "
                "--max-seq-len, or curriculum_max_seq_len) and would leave such a window alone "
                f"in a larger micro-batch; raise --batch-size to at least {longest} or lower "
                "--max-seq-len"
            )
        return budget
    if memory is None:
        if runtime.device.type != "cuda":
            return max(CPU_DEFAULT_BUDGET, longest)
        memory = CudaMemory(runtime.device)
    from train.step import loss_terms

    shape = probe_shape(index, fmt, longest)
    hidden = index.hidden_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step(tokens: int) -> None:
        try:
            batch = probe_batch(shape, tokens, fmt, hidden, runtime.device)
            with runtime.autocast():
                out = model(batch)
            terms, _ = loss_terms(out, batch, cfg)
            sum(terms.values()).backward()
        finally:
            model.zero_grad(set_to_none=True)

    fits = memory_fits(step, memory, cfg.memory_fraction, trainable, runtime.world)
    return search_budget(
        fits, start=longest, limit=MAX_ROWS * longest, unit=longest, context=memory_advice(cfg, runtime.precision)
    )
