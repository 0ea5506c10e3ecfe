"""Incremental forward over one streamed sequence with a KV cache: the inference path of the model.

Training and streaming share the sequence builder (train/sequence.py); this class only appends ids (and the frame
embeddings of their `<image>` positions) to a `DynamicCache`, returns the last hidden state for the heads, and
decodes: greedy text and DST updates constrained to valid node ids and states.

Every decoder takes an optional `forced` answer: the same code path then feeds the given tokens instead of its own
choice (the replay test forces the ground truth through it to check that streaming rebuilds the training ids).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from pipeline.timeline import STATE_RANK
from train.model import DSTModel
from train.sequence import SequenceFormat, format_state


class StreamSession:
    def __init__(self, model: DSTModel, fmt: SequenceFormat, device: torch.device | str = "cpu",
                 use_cache: bool = True):
        self.model, self.fmt, self.device = model, fmt, torch.device(device)
        self.use_cache = use_cache  # False: recompute the whole sequence at every step (a reference, and slow)
        self.dtype = model.update_head.weight.dtype
        # Never generated: ids that would need frame embeddings or that only the builder places.
        tokenizer = fmt.tokenizer
        self.banned = sorted({fmt.image_id, fmt.pad_id, *fmt.bos, *fmt.frame,
                              *(i for i in [tokenizer.bos_token_id, tokenizer.unk_token_id] if i is not None)})
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache()
        self.ids: list[int] = []
        self.chunks: list[tuple[list[int], torch.Tensor | None]] = []  # what was fed, to re-feed a part of it

    @property
    def length(self) -> int:
        return len(self.ids)

    @torch.no_grad()
    def feed(self, ids: list[int], frame_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Append `ids`; `frame_embeds` holds one row per `<image>` id among them. Returns the last hidden state."""
        if frame_embeds is None:
            frame_embeds = torch.zeros(0, self.model.lm_head.in_features, device=self.device)
        self.chunks.append((list(ids), frame_embeds))
        if not self.use_cache:
            self.ids += ids
            everything = torch.cat([e.to(self.device) for _, e in self.chunks])
            input_ids = torch.tensor([self.ids], device=self.device)
            hidden, _ = self.model.hidden_states(input_ids, input_ids == self.fmt.image_id, everything)
            return hidden[0, -1]
        input_ids = torch.tensor([ids], device=self.device)
        positions = torch.arange(self.length, self.length + len(ids), device=self.device)[None]
        hidden, self.cache = self.model.hidden_states(input_ids, input_ids == self.fmt.image_id,
                                                      frame_embeds.to(self.device), cache=self.cache,
                                                      position_ids=positions)
        self.ids += ids
        return hidden[0, -1]

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (teacher forcing rolls generated text back)."""
        if self.use_cache and self.length > length:
            self.cache.crop(length - self.length)  # transformers 5.24: a negative count removes that many tokens
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

    def refeed(self, chunks: list[tuple[list[int], torch.Tensor | None]]) -> torch.Tensor:
        """Start over with these chunks (a context strategy's new prefix)."""
        self.reset()
        hidden = None
        for ids, embeds in chunks:
            hidden = self.feed(ids, embeds)
        return hidden

    @torch.no_grad()
    def decisions(self, hidden: torch.Tensor) -> tuple[float, float]:
        """(p_update, p_speak) from a hidden state."""
        update, speak = self.model.decision_logits(hidden.to(self.dtype))
        return float(torch.sigmoid(update.float())), float(torch.sigmoid(speak.float()))

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden.to(self.dtype)).float()

    # --------------------------------------------------------------------------------------------- decoding

    def greedy(self, hidden: torch.Tensor, max_new_tokens: int,
               forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
        """Greedy text until EOS (fed, so the cache matches the training format); EOS is forced after
        `max_new_tokens`. Returns the generated ids without EOS and the hidden state at EOS. `forced`: the ids to
        produce instead (ending with EOS; `max_new_tokens` does not cut them)."""
        out = []
        for step in range(len(forced) if forced is not None else max_new_tokens):
            if forced is not None:
                token = forced[step]
            else:
                logits = self.logits(hidden)
                logits[self.banned] = float("-inf")
                token = int(logits.argmax())
            hidden = self.feed([token])
            if token == self.fmt.eos_id:
                return out, hidden
            out.append(token)
        return out, self.feed([self.fmt.eos_id])

    def choose(self, hidden: torch.Tensor, options: list[list[int]],
               forced: int | None = None) -> tuple[int, torch.Tensor]:
        """Greedy decoding restricted to a set of token sequences (a trie walk): at each step only tokens that
        continue some option are allowed. Feeds the chosen sequence; returns its index and the last hidden.
        `forced`: walk to that option instead."""
        alive, step = list(range(len(options))), 0
        while True:
            if forced is not None:
                token = options[forced][step]
            else:
                logits = self.logits(hidden)
                token = max({options[i][step] for i in alive}, key=lambda t: float(logits[t]))
            hidden = self.feed([token])
            alive = [i for i in alive if options[i][step] == token]
            step += 1
            done = [i for i in alive if len(options[i]) == step]
            if done:
                return done[0], hidden

    def update(self, hidden: torch.Tensor, state: dict[str, str],
               forced: dict[str, str] | None = None) -> tuple[dict[str, str], str, torch.Tensor]:
        """A DST update after the `\\nDST:` prefix, constrained so it is always valid: each clause names a node not
        yet listed and a state later than its current one; after the first clause, EOS may end it. Returns the
        delta, its text and the hidden state at EOS. The caller checks that some node can still change.
        `forced`: the delta to produce (its clauses in order), through the same walk."""
        fmt, delta = self.fmt, {}
        while True:
            clauses = [(node, s) for node, current in state.items() if node not in delta
                       for s in STATE_RANK if STATE_RANK[s] > STATE_RANK[current]]
            options = [(fmt.clause_separator if delta else []) + fmt.clause(node, s) for node, s in clauses]
            if delta:
                options.append([fmt.eos_id])
            if not clauses:  # nothing left that could change: close the update
                hidden = self.feed([fmt.eos_id])
                break
            want = None
            if forced is not None:
                pending = [(node, s) for node, s in forced.items() if node not in delta]
                want = clauses.index(pending[0]) if pending else len(clauses)  # the next clause, or EOS
            choice, hidden = self.choose(hidden, options, want)
            if choice == len(clauses):
                break
            delta[clauses[choice][0]] = clauses[choice][1]
        return delta, format_state(delta), hidden
