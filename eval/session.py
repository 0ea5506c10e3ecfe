"""One streamed dialogue's context: the inference path of the model.

Training and streaming share the sequence builder (train/sequence.py); a session only appends ids (and the frame
embeddings of their `<image>` positions) to its slot of a `StreamEngine` (eval/engine.py), returns the last hidden
state for the heads, and decodes: greedy text and DST updates constrained to valid node ids and states.

Every method that runs the model is a generator: it yields `Feed` requests and receives hidden states, so the
engine can serve one dialogue at a time or many together with the same code (`hidden = yield from s.feed(ids)`;
`engine.drive(steps)` runs one to its end). Every decoder takes an optional `forced` answer: the same code path then
feeds the given tokens instead of its own choice (the replay test forces the ground truth through it to check that
streaming rebuilds the training ids).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from pipeline.timeline import STATE_RANK
from train.sequence import format_state


@dataclass
class Feed:
    """Append `ids` to `session`'s context; `embeds` holds one row per `<image>` id among them. `logits`: also
    compute the LM head's next-token logits at the last position (for greedy and constrained decoding)."""

    session: StreamSession
    ids: list[int]
    embeds: torch.Tensor
    logits: bool = False


Model = Generator[Feed, torch.Tensor, object]  # what the model-running methods return


class StreamSession:
    def __init__(self, engine, slot: int):
        self.engine, self.slot = engine, slot
        self.model, self.fmt, self.dtype = engine.model, engine.fmt, engine.dtype
        # Never generated: ids that would need frame embeddings or that only the builder places.
        fmt, tokenizer = self.fmt, self.fmt.tokenizer
        self.banned = sorted(
            {
                fmt.image_id,
                fmt.pad_id,
                *fmt.bos,
                *fmt.frame,
                *(i for i in [tokenizer.bos_token_id, tokenizer.unk_token_id] if i is not None),
            }
        )
        self.reset()

    def reset(self) -> None:
        """Start an empty context (the slot's old keys are simply overwritten)."""
        self.ids: list[int] = []
        self.chunks: list[tuple[list[int], torch.Tensor]] = []  # what was fed, to re-feed a part of it
        self.next_logits: torch.Tensor | None = None  # next-token logits after the last feed that asked for them

    @property
    def length(self) -> int:
        return len(self.ids)

    def feed(self, ids: list[int], frame_embeds: torch.Tensor | None = None, logits: bool = False) -> Model:
        """Append `ids`; `frame_embeds` holds one row per `<image>` id among them. Returns the last hidden state;
        with `logits`, `next_logits` then holds the LM head's logits there."""
        if frame_embeds is None:
            frame_embeds = torch.zeros(0, self.model.lm_head.in_features, dtype=self.dtype)
        self.next_logits = None
        hidden = yield Feed(self, list(ids), frame_embeds, logits)
        self.chunks.append((list(ids), frame_embeds))
        self.ids += ids
        return hidden

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (teacher forcing rolls generated text back). The
        engine's cache needs nothing: the next feed writes at `length`, and attention reads only that far."""
        self.ids = self.ids[:length]
        kept, total = [], 0
        for ids, embeds in self.chunks:
            if total + len(ids) > length:
                break
            kept.append((ids, embeds))
            total += len(ids)
        if total != length:
            raise ValueError(f"crop to {length} tokens would split a fed chunk")
        self.chunks = kept

    def refeed(self, chunks: list[tuple[list[int], torch.Tensor | None]]) -> Model:
        """Start over with these chunks (a context strategy's new prefix)."""
        self.reset()
        hidden = None
        for ids, embeds in chunks:
            hidden = yield from self.feed(ids, embeds)
        return hidden

    @torch.no_grad()
    def decisions(self, hidden: torch.Tensor) -> tuple[float, float]:
        """(p_update, p_speak) from a hidden state."""
        update, speak = self.model.decision_logits(hidden.to(self.dtype))
        return float(torch.sigmoid(update.float())), float(torch.sigmoid(speak.float()))

    # --------------------------------------------------------------------------------------------- decoding

    def greedy(self, prefix: list[int], max_new_tokens: int, forced: list[int] | None = None) -> Model:
        """Feed `prefix`, then greedy text until EOS (fed, so the context matches the training format); EOS is
        forced after `max_new_tokens`. Returns the generated ids without EOS and the hidden state at EOS.
        `forced`: the ids to produce instead (ending with EOS; `max_new_tokens` does not cut them)."""
        steps = len(forced) if forced is not None else max_new_tokens
        hidden = yield from self.feed(prefix, logits=forced is None and steps > 0)
        out = []
        for step in range(steps):
            if forced is not None:
                token = forced[step]
            else:
                logits = self.next_logits
                logits[self.banned] = float("-inf")
                token = int(logits.argmax())
            more = forced is None and token != self.fmt.eos_id and step + 1 < steps
            hidden = yield from self.feed([token], logits=more)
            if token == self.fmt.eos_id:
                return out, hidden
            out.append(token)
        hidden = yield from self.feed([self.fmt.eos_id])
        return out, hidden

    def choose(self, options: list[list[int]], forced: int | None = None) -> Model:
        """Greedy decoding restricted to a set of token sequences (a trie walk): at each step only tokens that
        continue some option are allowed, read from `next_logits` (the caller's last feed asked for them when
        more than one token is allowed). Feeds the chosen sequence; returns its index and the last hidden.
        `forced`: walk to that option instead."""
        alive, step = list(range(len(options))), 0
        while True:
            candidates = {options[i][step] for i in alive}
            if forced is not None:
                token = options[forced][step]
            elif len(candidates) == 1:
                token = next(iter(candidates))
            else:
                logits = self.next_logits
                token = max(candidates, key=lambda t: float(logits[t]))
            alive = [i for i in alive if options[i][step] == token]
            step += 1
            done = [i for i in alive if len(options[i]) == step]
            # the next choice (here, or the caller's next clause) reads logits unless it is forced or unique
            ahead = {options[i][step] for i in alive if len(options[i]) > step}
            hidden = yield from self.feed([token], logits=forced is None and (bool(done) or len(ahead) > 1))
            if done:
                return done[0], hidden

    def update(self, state: dict[str, str], forced: dict[str, str] | None = None) -> Model:
        """Feed the `\\nDST:` prefix and a DST update, constrained so it is always valid: each clause names a
        node not yet listed and a state later than its current one; after the first clause, EOS may end it.
        Returns the delta, its text and the hidden state at EOS. The caller checks that some node can still
        change. `forced`: the delta to produce (its clauses in order), through the same walk."""
        fmt, delta = self.fmt, {}
        hidden = yield from self.feed(fmt.dst_prefix, logits=forced is None)
        while True:
            clauses = [
                (node, s)
                for node, current in state.items()
                if node not in delta
                for s in STATE_RANK
                if STATE_RANK[s] > STATE_RANK[current]
            ]
            options = [(fmt.clause_separator if delta else []) + fmt.clause(node, s) for node, s in clauses]
            if delta:
                options.append([fmt.eos_id])
            if not clauses:  # nothing left that could change: close the update
                hidden = yield from self.feed([fmt.eos_id])
                break
            want = None
            if forced is not None:
                pending = [(node, s) for node, s in forced.items() if node not in delta]
                want = clauses.index(pending[0]) if pending else len(clauses)  # the next clause, or EOS
            choice, hidden = yield from self.choose(options, want)
            if choice == len(clauses):
                break
            delta[clauses[choice][0]] = clauses[choice][1]
        return delta, format_state(delta), hidden
