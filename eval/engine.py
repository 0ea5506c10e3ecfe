"""Runs streamed dialogues through the model, one or many at a time, with one forward per round.

Each dialogue is a generator (eval/stream.py) that yields `Feed` requests through its `StreamSession` and receives
the hidden state of its last fed token. The engine serves them:

- `drive(steps)`: one dialogue, one request per forward (what `--batch-dialogues 1` runs);
- `run_many(jobs)`: continuous batching over `slots` sessions. Every round takes the pending request of each busy
  slot, packs their tokens into one sequence (no padding: a 300-token re-seed next to 1-token decoding costs what
  its tokens cost) and runs one forward on the shared `SlotCache`; a slot whose dialogue ends takes the next job.

A dialogue's computation is the same whichever others share its rounds: attention is per dialogue on its own slot,
and only the shapes of the shared matrix products change (floating-point rounding of the last bits).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator

import torch

from eval.kv_cache import PackedStep, Segment, SlotCache, packed_attention
from eval.session import Feed, StreamSession
from train.sequence import SequenceFormat

Steps = Generator[Feed, torch.Tensor, object]  # a dialogue: yields Feed, receives hidden, returns its result


class StreamEngine:
    def __init__(
        self,
        model,
        fmt: SequenceFormat,
        device: torch.device | str = "cpu",
        slots: int = 1,
        use_cache: bool = True,
        capacity: int = 4096,
        attention: str = "auto",
    ):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if attention not in ("auto", "segments", "padded"):
            raise ValueError(f"attention must be auto, segments or padded, got {attention!r}")
        self.model, self.fmt, self.device = model, fmt, torch.device(device)
        # one attention call per dialogue on a CPU (no arithmetic on padding), one for all on a GPU (one launch)
        self.padded = attention == "padded" or attention == "auto" and self.device.type == "cuda"
        self.dtype = model.update_head.weight.dtype
        self.use_cache = use_cache  # False: recompute every context in full at every step (reference, slow)
        self.config = model.text_model.config
        self.cache = SlotCache.for_model(self.config, slots, capacity, self.dtype, self.device) if use_cache else None
        self.sessions = [StreamSession(self, slot) for slot in range(slots)]

    # --------------------------------------------------------------------------------------------- forward

    @torch.no_grad()
    def forward(self, requests: list[Feed]) -> list[torch.Tensor]:
        """One round: every request's tokens in one packed forward (requests come from distinct sessions).
        Returns each request's last hidden state and sets its session's `next_logits` when asked."""
        if not self.use_cache:
            last = [self._recompute(r) for r in requests]
        else:
            last = self._packed(requests)
        wanted = [i for i, r in enumerate(requests) if r.logits]
        if wanted:
            logits = self.model.lm_head(torch.stack([last[i] for i in wanted]).to(self.dtype)).float()
            for row, i in enumerate(wanted):
                requests[i].session.next_logits = logits[row]
        return last

    def _packed(self, requests: list[Feed]) -> list[torch.Tensor]:
        segments, start = [], 0
        for r in requests:
            segments.append(Segment(r.session.slot, start, len(r.ids), r.session.length))
            start += len(r.ids)
        self.cache.reserve(max(s.past + s.length for s in segments))
        step = PackedStep(segments, self.device, self.padded)
        input_ids = torch.tensor([[t for r in requests for t in r.ids]], device=self.device)
        embeds = torch.cat([r.embeds.to(self.device) for r in requests])
        inputs = self.model.embed(input_ids, input_ids == self.fmt.image_id, embeds)
        self.cache.step = step
        try:
            with packed_attention(self.config):
                out = self.model.text_model(
                    inputs_embeds=inputs,
                    position_ids=step.position[None],
                    cache=self.cache,
                    use_cache=True,
                    packed_step=step,
                )
        finally:
            self.cache.step = None
        hidden = out.last_hidden_state[0]
        return [hidden[s.start + s.length - 1] for s in segments]

    def _recompute(self, request: Feed) -> torch.Tensor:
        chunks = [*request.session.chunks, (request.ids, request.embeds)]
        input_ids = torch.tensor([[t for ids, _ in chunks for t in ids]], device=self.device)
        embeds = torch.cat([e.to(self.device) for _, e in chunks])
        hidden, _ = self.model.hidden_states(input_ids, input_ids == self.fmt.image_id, embeds)
        return hidden[0, -1]

    # --------------------------------------------------------------------------------------------- scheduling

    def drive(self, steps: Steps):
        """Run one dialogue's generator to its end, one forward per request; returns its result."""
        try:
            request = next(steps)
            while True:
                request = steps.send(self.forward([request])[0])
        except StopIteration as done:
            return done.value

    def run_many(self, jobs: Iterable[tuple[object, Callable[[StreamSession], Steps]]]) -> Iterator[tuple]:
        """Continuous batching: `jobs` yields `(key, start)` where `start(session)` makes the dialogue's generator
        on a freshly reset session. Yields `(key, result)` as dialogues finish (completion order)."""
        jobs = iter(jobs)
        busy: dict[int, tuple[object, Steps, Feed]] = {}
        free = list(range(len(self.sessions)))
        exhausted = False
        while True:
            while free and not exhausted:
                job = next(jobs, None)
                if job is None:
                    exhausted = True
                    break
                key, start = job
                slot = free.pop(0)
                session = self.sessions[slot]
                session.reset()
                steps = start(session)
                try:
                    busy[slot] = (key, steps, next(steps))
                except StopIteration as done:  # a dialogue with nothing to stream
                    free.insert(0, slot)
                    yield key, done.value
            if not busy:
                return
            order = sorted(busy)
            hidden = self.forward([busy[slot][2] for slot in order])
            for slot, h in zip(order, hidden):
                key, steps, _ = busy[slot]
                try:
                    busy[slot] = (key, steps, steps.send(h))
                except StopIteration as done:
                    del busy[slot]
                    free.append(slot)
                    free.sort()
                    yield key, done.value
