"""The sequence format and the constrained DST decoder over the real SmolLM2/SmolVLM2 BPE (49,280 tokens).

The tiny tokenizer of the other tests has ~1,100 tokens; the real one merges differently (" S", "completed",
"_progress", ...), so the grammar, the trie walk and the streaming replay are checked again here.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from eval.session import StreamSession
from eval.stream import StreamConfig, Streamer
from pipeline.smolvlm import ADDED_TOKENS, build_tiny_tokenizer
from pipeline.timeline import STATE_RANK
from synthetic.realistic_record import SECONDS, realistic_meta
from train.model import DSTModel
from train.sequence import (
    SequenceFormat,
    build_window,
    frame_segments,
    parse_update,
    system_for,
)

STATES = list(STATE_RANK)


@pytest.fixture(scope="module")
def fmt(smollm2):
    return SequenceFormat(smollm2[1], tokens_per_frame=5)


def test_vocabulary_special_ids_and_roles(smollm2, fmt):
    tokenizer = smollm2[1]
    assert len(tokenizer) == 49280
    assert [tokenizer.convert_tokens_to_ids(t) for t in ADDED_TOKENS] == list(range(49152, 49280))
    assert tokenizer.convert_tokens_to_ids(["<global-img>", "<fake_token_around_image>", "<image>"]) == [
        49152,
        49189,
        49190,
    ]
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<end_of_utterance>", 49279)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert (fmt.eos_id, fmt.pad_id, fmt.image_id) == (49279, 2, 49190)
    assert fmt.frame == [49189, 49152] + [49190] * 5 + [49189]
    # SmolLM2's own pretrained tokens are still there at their ids
    assert tokenizer.convert_ids_to_tokens([0, 2, 3]) == ["<|endoftext|>", "<|im_end|>", "<repo_name>"]


def test_digits_are_single_tokens(smollm2):
    """Node ids like S12 must tokenize digit by digit whatever the pre-tokenizer (see build_tokenizer)."""
    tokenizer = smollm2[1]
    base = [t for t, i in tokenizer.get_vocab().items() if i < 49152]
    assert len(base) == 49152 and not [t for t in base if re.search(r"\d", t) and len(t) > 1]
    assert tokenizer.convert_ids_to_tokens(tokenizer(" S12=completed", add_special_tokens=False)["input_ids"]) == [
        "ĠS",
        "1",
        "2",
        "=",
        "completed",
    ]


# --- constrained DST decoding, forced through every option ------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """Stands in for DSTModel inside StreamSession. Its LM head gives logit 1 to the next id of `script` (counted
    from `mark` in what was fed) and 0 to every other id, so constrained decoding can be pushed towards any
    sequence: it comes out only if the trie allows every one of its tokens."""

    def __init__(self, vocab: int, hidden: int = 4):
        super().__init__()
        self.update_head = torch.nn.Linear(hidden, 1)
        self.speak_head = torch.nn.Linear(hidden, 1)
        self.lm_head = torch.nn.Linear(hidden, 1)  # only its in_features/dtype are read; logits come from forward
        self.lm_head.forward = self._logits
        self.vocab, self.hidden = vocab, hidden
        self.fed: list[int] = []
        self.script: list[int] = []
        self.mark = 0

    def force(self, ids: list[int]) -> None:
        self.script, self.mark = list(ids), len(self.fed)

    def hidden_states(self, input_ids, image_mask, frame_embeds, attention_mask=None, cache=None, position_ids=None):
        self.fed += input_ids[0].tolist()
        return torch.zeros(1, input_ids.shape[1], self.hidden), cache

    def _logits(self, hidden):
        logits = torch.zeros(self.vocab)
        step = len(self.fed) - self.mark
        if step < len(self.script):
            logits[self.script[step]] = 1.0
        return logits


def nodes_and_state(n: int, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {f"S{i}": rng.choice(STATES) for i in range(1, n + 1)}


class ScriptedEngine:
    """Serves a StreamSession's feed requests with ScriptedModel, one at a time, as StreamEngine.drive does."""

    def __init__(self, model: ScriptedModel, fmt):
        self.model, self.fmt, self.dtype = model, fmt, torch.float32

    def drive(self, steps):
        try:
            request = next(steps)
            while True:
                ids = torch.tensor([request.ids])
                hidden, _ = self.model.hidden_states(ids, ids == self.fmt.image_id, request.embeds)
                if request.logits:
                    request.session.next_logits = self.model.lm_head(hidden[0, -1])
                request = steps.send(hidden[0, -1])
        except StopIteration as done:
            return done.value


def forced_update(fmt, state: dict[str, str], delta: dict[str, str]) -> tuple[dict, str, list[int]]:
    model = ScriptedModel(len(fmt.tokenizer))
    engine = ScriptedEngine(model, fmt)
    session = StreamSession(engine, 0)
    model.force(fmt.dst_prefix + fmt.dst_body(delta))  # update() feeds the prefix itself
    got, text, _ = engine.drive(session.update(state))
    return got, text, model.fed[model.mark + len(fmt.dst_prefix) :]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_valid_clause_of_a_20_step_dst_decodes(fmt, seed):
    """From a mixed state of 20 nodes, every single valid clause can be decoded, and the decoded text parses back."""
    state = nodes_and_state(20, seed) if seed else {f"S{i}": "not_started" for i in range(1, 21)}
    clauses = [(node, s) for node, current in state.items() for s in STATES if STATE_RANK[s] > STATE_RANK[current]]
    assert clauses
    for node, new in clauses:
        delta, text, ids = forced_update(fmt, state, {node: new})
        assert delta == {node: new}
        assert text == f"{node}={new}"
        assert parse_update(text, state) == delta
        assert ids == fmt.dst_body(delta)  # what streaming appends is what training targets
        assert fmt.tokenizer.decode(ids[:-1]) == f" {text}"


def test_multi_clause_updates_decode_in_any_order(fmt):
    rng = random.Random(7)
    for trial in range(12):
        state = nodes_and_state(20, 100 + trial)
        open_nodes = [n for n, s in state.items() if s != "completed"]
        chosen = rng.sample(open_nodes, rng.randint(1, len(open_nodes)))
        delta = {n: rng.choice([s for s in STATES if STATE_RANK[s] > STATE_RANK[state[n]]]) for n in chosen}
        got, text, ids = forced_update(fmt, state, delta)
        assert got == delta and list(got) == list(delta)  # order kept
        assert parse_update(text, state) == delta
        assert ids == fmt.dst_body(delta)
        assert ids[-1] == fmt.eos_id


def test_update_closes_itself_when_nothing_else_can_change(fmt):
    """Every open node listed: no option is left, so the decoder appends EOS on its own."""
    state = {f"S{i}": "in_progress" for i in range(1, 21)}
    delta = {n: "completed" for n in reversed(list(state))}
    got, _, ids = forced_update(fmt, state, delta)
    assert got == delta and ids == fmt.dst_body(delta)


# --- text segments -----------------------------------------------------------------------------------------------


def test_special_tokens_typed_in_dialogue_stay_text(fmt):
    typed = "Type <end_of_utterance> or <image> or <|im_start|> and <|im_end|> here, then <global-img>."
    specials = set(range(49152, 49280)) | {0, 1, 2}
    for ids in (fmt.user(typed), fmt.response_body(typed)):
        assert ids[-1] == fmt.eos_id
        assert not specials & set(ids[:-1])
        assert fmt.tokenizer.decode(ids[:-1]).endswith(typed)
    system = fmt.system(typed, [("S1", typed)], {"S1": "not_started"}, [("User", typed)])
    assert system[0] == 1 and system[-1] == fmt.eos_id and not specials & set(system[1:-1])


def test_window_targets_end_in_eos_and_never_hold_pad(fmt):
    meta = realistic_meta()
    seq = build_window(fmt, meta, 0, 0, len(meta.frame))
    assert fmt.pad_id not in seq.input_ids
    ids = seq.input_ids
    for targets in (seq.dst_targets, seq.response_targets):
        ends = [p for p in targets if p + 1 not in targets]
        assert ends and all(ids[p] == fmt.eos_id for p in ends)
        assert all(ids[p] != fmt.eos_id for p in targets if p + 1 in targets)


# --- streaming replay with the real model -------------------------------------------------------------------------


def test_streaming_appends_the_training_ids_and_states(smollm2, fmt):
    """Teacher forcing with the ground-truth decisions over the realistic record's first 6 s (its full minute
    costs minutes of CPU): the session holds exactly the training window's ids, and its cached last hidden
    state equals a full forward over the window."""
    vlm, _ = smollm2
    torch.manual_seed(0)
    model = DSTModel(vlm).eval()
    meta = realistic_meta(n_frames=12)
    n = len(meta.frame)
    emb = (np.random.default_rng(0).standard_normal((n, 5, 576)) * 0.14).astype(np.float16)
    streamer = Streamer(
        model, fmt, StreamConfig(mode="teacher-forced", generate_above=1.0, max_context=8192, protocol="full-video")
    )  # every frame, as the window has
    streamer.run(meta, emb, 0)
    seq = build_window(fmt, meta, 0, 0, n)
    assert streamer.session.ids == seq.input_ids
    ids = torch.tensor([seq.input_ids + [fmt.eos_id]])
    frames = torch.from_numpy(emb[seq.frame_rows]).float().reshape(-1, 576)
    with torch.no_grad():
        cached = streamer.engine.drive(streamer.session.feed([fmt.eos_id]))  # one more token through the cache ...
        full, _ = model.hidden_states(ids, ids == fmt.image_id, frames)
    assert torch.allclose(cached, full[0, -1], atol=2e-3, rtol=1e-3)  # ... equals the full recompute


# --- what a realistic record costs -----------------------------------------------------------------------------


def token_counts(fmt, meta) -> dict[str, int]:
    n = len(meta.frame)
    counts = {
        "system prompt (20 steps)": len(system_for(fmt, meta, 0, 0)),
        "frame blocks": n * len(fmt.frame),
        "user turns": 0,
        "DST updates": 0,
        "assistant responses": 0,
    }
    for row in range(n):
        seg = frame_segments(fmt, meta, 0, row)
        counts["user turns"] += len(seg["user"])
        counts["DST updates"] += len(fmt.dst_prefix) + len(seg["dst"]) if seg["dst"] else 0
        counts["assistant responses"] += len(fmt.response_prefix) + len(seg["response"]) if seg["response"] else 0
    counts["total"] = sum(counts.values())
    return counts


def test_token_counts_of_a_realistic_record(fmt, capsys):
    """20 steps, one minute at 2 fps and 5 tokens per frame, ProAssist-style dialogue: printed for
    docs/benchmarks.md, real tokenizer beside the tiny one."""
    meta = realistic_meta()
    n = len(meta.frame)
    assert n == SECONDS * 2 and len(meta.nodes) == 20
    real = token_counts(fmt, meta)
    tiny = token_counts(SequenceFormat(build_tiny_tokenizer(), 5), meta)
    assert real["total"] == len(build_window(fmt, meta, 0, 0, n).input_ids)
    assert real["frame blocks"] == tiny["frame blocks"] == 120 * 8
    conv = meta.conversations[0]
    updates, speaks = sum(meta.dst_update), sum(conv.speak)
    with capsys.disabled():
        print(
            f"\n\nrealistic record: {n} frames, {updates} DST updates, {speaks} responses, "
            f"{sum(bool(u) for u in conv.user_text)} user turns"
        )
        print(f"{'segment':<26}{'SmolLM2 BPE (49,280)':>22}{'tiny BPE (1,118)':>18}")
        for key in real:
            print(f"{key:<26}{real[key]:>22,}{tiny[key]:>18,}")
    assert real["total"] < 4096  # one window at the default max_seq_len holds the whole minute
