"""A pre-allocated KV cache with one slot per streamed dialogue, and the attention that reads only filled slots.

Why not transformers' `DynamicCache`: it appends by concatenation, copying the whole cache at every step, and SDPA
with a mask repeats every key/value head for grouped-query attention (another copy per layer and step). Both grow
with the context, so a frame at 4,000 tokens cost about 4x a frame at the start. Here each layer holds one buffer
`[slots, kv_heads, capacity, head_dim]` written in place, and attention runs on a view of a dialogue's filled slots
with its query heads grouped onto their shared key/value head (`[kv_heads, groups * q, head_dim]`: no repeat).

Several dialogues' new tokens are packed into one sequence, without padding (`PackedStep`): the projections and
MLPs run on all of them at once; only attention is per dialogue, on that dialogue's own slot: one call per
dialogue (`segments`, the CPU default: no work on padding), or one call for all of them over the slots' buffers
with padded queries and a mask (`padded`, the GPU default: one kernel launch per layer instead of one per
dialogue; the buffers are read in place, the padding costs arithmetic, not copies). The transformers
model runs unchanged (pinned 5.24): this module registers an attention function under `ATTENTION` and
`packed_attention` switches the text config to it for the duration of a forward; the step plan reaches it as the
`packed_step` keyword, which transformers passes through to the attention function.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

ATTENTION = "dst_packed_sdpa"


@dataclass(frozen=True)
class Segment:
    """One dialogue's new tokens in a packed step: `length` tokens at `[start, start + length)` of the packed
    sequence, going to cache slot `slot` after the `past` tokens it already holds."""

    slot: int
    start: int
    length: int
    past: int


class PackedStep:
    """Where each token of one packed forward goes, and the causal masks of its segments (built once, shared by
    every layer)."""

    def __init__(self, segments: list[Segment], device: torch.device, padded: bool = False):
        self.segments = segments
        slots = [s.slot for s in segments for _ in range(s.length)]
        positions = [s.past + i for s in segments for i in range(s.length)]
        self.slot_index = torch.tensor(slots, device=device)
        self.position = torch.tensor(positions, device=device)
        self.device = device
        self._masks: dict[tuple[int, int], torch.Tensor | None] = {}
        self.padded = padded and len(segments) > 1
        if self.padded:  # slots lo..hi-1 (a view of the buffers), queries padded to the longest segment
            self.lo, self.hi = min(s.slot for s in segments), max(s.slot for s in segments) + 1
            self.longest = max(s.length for s in segments)
            self.keys = max(s.past + s.length for s in segments)
            self.row = self.slot_index - self.lo
            self.offset = torch.tensor([i for s in segments for i in range(s.length)], device=device)

    def mask(self, segment: Segment, groups: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive `[1, 1, groups * length, past + length]`: query `i` sees keys `j <= past + i` (0), not the
        later ones (-inf); the grouped query rows repeat the pattern once per head of a group. Additive rather
        than boolean: SDPA would convert a boolean mask at every layer. None for one token (it sees everything)."""
        if segment.length == 1:
            return None
        key = (segment.start, groups)
        if key not in self._masks:
            rows = torch.arange(segment.length, device=self.device)[:, None] + segment.past
            hidden = torch.arange(segment.past + segment.length, device=self.device)[None, :] > rows
            additive = torch.zeros(hidden.shape, dtype=dtype, device=self.device).masked_fill_(hidden, float("-inf"))
            self._masks[key] = additive.repeat(groups, 1)[None, None]
        return self._masks[key]

    def padded_mask(self, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive `[slots, 1, groups * longest, keys]` for the padded call: a segment's query `i` sees keys
        `j <= past + i`; padding rows (and slots without a segment) see key 0 only, so they stay finite."""
        key = (-1, groups)
        if key not in self._masks:
            rows = self.hi - self.lo
            past = torch.full((rows,), -1, dtype=torch.long)
            length = torch.zeros(rows, dtype=torch.long)
            for s in self.segments:
                past[s.slot - self.lo], length[s.slot - self.lo] = s.past, s.length
            past, length = past.to(self.device), length.to(self.device)
            i = torch.arange(self.longest, device=self.device)[None, :, None]
            j = torch.arange(self.keys, device=self.device)[None, None, :]
            allowed = ((i < length[:, None, None]) & (j <= past[:, None, None] + i)) | (j == 0)
            additive = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill_(~allowed, float("-inf"))
            self._masks[key] = (
                additive[:, None]
                .expand(rows, groups, self.longest, self.keys)
                .reshape(rows, 1, groups * self.longest, self.keys)
            )
        return self._masks[key]


class SlotLayer(CacheLayerMixin):
    """One layer's buffers. Lengths live with the dialogues (the sessions), not here: a dialogue that rolls back
    or starts over simply writes its next tokens at its own length."""

    is_croppable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("SlotCache.update writes through the packed step")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise NotImplementedError("the packed attention builds its own masks")

    def get_seq_length(self) -> int:
        raise NotImplementedError("lengths are per slot; positions are always passed explicitly")

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (slots, kv_heads, capacity, head_dim)
        super().__init__(
            layers=[
                SlotLayer(
                    torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
                )
                for _ in range(layers)
            ]
        )
        self.step: PackedStep | None = None

    @classmethod
    def for_model(cls, config, slots: int, capacity: int, dtype, device) -> SlotCache:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, slots, config.num_key_value_heads, head_dim, capacity, dtype, device)

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2]

    def reserve(self, length: int) -> None:
        """Grow every buffer (doubling, copying once) so that `length` positions fit."""
        if length <= self.capacity:
            return
        new = max(length, 2 * self.capacity)
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                grown = old.new_zeros(*old.shape[:2], new, old.shape[3])
                grown[:, :, : old.shape[2]] = old
                setattr(layer, name, grown)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Write the step's keys/values `[1, kv_heads, tokens, head_dim]` into their slots; return the whole
        buffers (the packed attention takes each dialogue's filled view)."""
        step, layer = self.step, self.layers[layer_idx]
        if step is None:
            raise RuntimeError("SlotCache.update outside a packed step")
        if len(step.segments) == 1:  # one dialogue: a plain slice write
            s = step.segments[0]
            layer.keys[s.slot, :, s.past : s.past + s.length] = key_states[0]
            layer.values[s.slot, :, s.past : s.past + s.length] = value_states[0]
        else:
            layer.keys[step.slot_index, :, step.position] = key_states[0].transpose(0, 1)
            layer.values[step.slot_index, :, step.position] = value_states[0].transpose(0, 1)
        return layer.keys, layer.values


def packed_sdpa(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_step: PackedStep | None = None,
    **kwargs,
):
    """Attention for a packed step: per segment, its queries `[heads, q, d]` regrouped to
    `[kv_heads, groups * q, d]` against the filled view of its slot. Returns `[1, tokens, heads, d]`."""
    if packed_step is None:
        raise RuntimeError(f"attention {ATTENTION} needs the packed_step keyword (use StreamEngine)")
    _, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if packed_step.padded:
        return _padded_sdpa(query, key, value, scaling, packed_step, kv_heads, groups), None
    outputs = []
    for seg in packed_step.segments:
        q = query[0, :, seg.start : seg.start + seg.length].reshape(1, kv_heads, groups * seg.length, dim)
        end = seg.past + seg.length
        out = torch.nn.functional.scaled_dot_product_attention(
            q,
            key[seg.slot : seg.slot + 1, :, :end],
            value[seg.slot : seg.slot + 1, :, :end],
            attn_mask=packed_step.mask(seg, groups, query.dtype),
            scale=scaling,
        )
        outputs.append(out.reshape(heads, seg.length, dim))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


def _padded_sdpa(query, key, value, scaling, step: PackedStep, kv_heads: int, groups: int) -> torch.Tensor:
    """All segments in one call: queries scattered to `[slots, kv_heads, groups * longest, d]`, attention over the
    slots' buffers up to the longest filled length, the real rows gathered back. Returns `[1, tokens, heads, d]`."""
    _, heads, _, dim = query.shape
    rows, longest = step.hi - step.lo, step.longest
    padded = query.new_zeros(rows, longest, heads, dim)
    padded[step.row, step.offset] = query[0].transpose(0, 1)
    padded = (
        padded.view(rows, longest, kv_heads, groups, dim)
        .permute(0, 2, 3, 1, 4)
        .reshape(rows, kv_heads, groups * longest, dim)
    )
    out = torch.nn.functional.scaled_dot_product_attention(
        padded,
        key[step.lo : step.hi, :, : step.keys],
        value[step.lo : step.hi, :, : step.keys],
        attn_mask=step.padded_mask(groups, query.dtype),
        scale=scaling,
    )
    out = out.view(rows, kv_heads, groups, longest, dim).permute(0, 3, 1, 2, 4).reshape(rows, longest, heads, dim)
    return out[step.row, step.offset].unsqueeze(0)


AttentionInterface.register(ATTENTION, packed_sdpa)


@contextmanager
def packed_attention(config):
    """Route the text model's attention through `packed_sdpa` for one forward; training forwards keep theirs."""
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
