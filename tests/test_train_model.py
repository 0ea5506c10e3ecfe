"""The model and the sequence format: decision positions, EOS targets, the LM shift, where each loss term sends
gradient, the streaming replay of a training window, and save/load."""

from __future__ import annotations

import json

import pytest
import torch

from eval.engine import StreamEngine
from pipeline.shard_index import ShardIndex
from pipeline.smolvlm import build_tiny_random
from train.checkpoint import load_dst_model
from train.loader import collate
from train.losses import decision_loss, lm_loss
from train.model import DSTModel, freeze_vision, wrap_lora
from train.sequence import (
    SequenceFormat,
    build_window,
    format_state,
    frame_segments,
    parse_update,
)
from train.windows import cut_windows


@pytest.fixture(scope="module")
def index(tiny_shards) -> ShardIndex:
    return ShardIndex.build(tiny_shards)


@pytest.fixture(scope="module")
def parts():
    vlm, tokenizer = build_tiny_random()
    torch.manual_seed(0)
    model = DSTModel(vlm).eval()
    return model, tokenizer, SequenceFormat(tokenizer, 5)


def windows_of(index, fmt, max_seq_len=10_000):
    return [w for vid in index.video_ids for w in cut_windows(fmt, index.meta(vid), vid, max_seq_len)]


def runs(positions: list[int]) -> list[list[int]]:
    """Contiguous runs of positions (one per DST or response text)."""
    out: list[list[int]] = []
    for p in positions:
        if out and p == out[-1][-1] + 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def test_grammar_has_one_writer_and_one_parser():
    state = {"S1": "completed", "S2": "in_progress", "S4": "not_started"}
    assert format_state(state) == "S1=completed; S2=in_progress; S4=not_started"
    assert parse_update("S2=completed; S4=in_progress", state) == {"S2": "completed", "S4": "in_progress"}
    for bad in (
        "S3=completed",
        "S1=in_progress",
        "S2=in_progress",
        "S2=done",
        "S2=completed; S2=completed",
        "",
        "S2 completed",
    ):
        assert parse_update(bad, state) is None, bad


def test_decision_positions_and_targets(parts, index):
    model, tokenizer, fmt = parts
    fake = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    seen_update = seen_speak = 0
    for w in windows_of(index, fmt):
        meta = index.meta(w.video_id)
        seq = build_window(fmt, meta, w.conversation, w.start, w.end)
        ids = seq.input_ids
        conv = meta.conversations[w.conversation]
        assert seq.update_labels == [int(x) for x in meta.dst_update[w.start : w.end]]
        assert seq.speak_labels == [int(x) for x in conv.speak[w.start : w.end]]
        dst_runs, response_runs = iter(runs(seq.dst_targets)), iter(runs(seq.response_targets))
        for row, a, b, upd, spk in zip(
            range(w.start, w.end), seq.update_positions, seq.speak_positions, seq.update_labels, seq.speak_labels
        ):
            segments = frame_segments(fmt, meta, w.conversation, row)
            assert ids[a] == fake and ids[a - 1] == fmt.image_id  # the frame block's closing token
            if upd:
                text = next(dst_runs)
                # decision A reads before the DST text; the target is exactly the body, ending in EOS
                assert a < text[0] and [ids[p] for p in text] == segments["dst"] and ids[text[-1]] == fmt.eos_id
                assert b == text[-1]  # decision B reads at the update's EOS
                seen_update += 1
            else:
                assert b == a
            if spk:
                text = next(response_runs)
                assert b < text[0] and [ids[p] for p in text] == segments["response"] and ids[text[-1]] == fmt.eos_id
                assert ids[text[0] - 1] == fmt.response_prefix[-1]
                seen_speak += 1
        assert next(dst_runs, None) is None and next(response_runs, None) is None
    assert seen_update > 5 and seen_speak > 5


def test_lm_logits_are_shifted(parts, index):
    model, _, fmt = parts
    batch = collate(index, fmt, windows_of(index, fmt)[:3], epoch_seed=0)
    with torch.no_grad():
        out = model(batch)
        hidden, _ = model.hidden_states(
            batch.input_ids, batch.image_mask, batch.frame_embeds, attention_mask=batch.attention_mask
        )
        full = model.lm_head(hidden)
    rows, pos = batch.response_index[:, 0], batch.response_index[:, 1]
    torch.testing.assert_close(out["response"], full[rows, pos - 1])
    assert torch.equal(out["response_targets"], batch.input_ids[rows, pos])


def test_each_term_sends_gradient_only_where_it_should(index):
    vlm, tokenizer = build_tiny_random()
    model = DSTModel(vlm)
    fmt = SequenceFormat(tokenizer, 5)
    batch = collate(index, fmt, windows_of(index, fmt)[:2], epoch_seed=0)
    embeds = model.embed(batch.input_ids, batch.image_mask, batch.frame_embeds).detach().requires_grad_(True)
    model.embed = lambda *args: embeds  # watch the gradient reaching every input position

    def grads(term: str):
        model.zero_grad()
        embeds.grad = None
        out = model(batch)
        if term in ("update", "speak"):
            loss = decision_loss("focal", out[term], getattr(batch, f"{term}_labels"))
        else:
            loss = lm_loss(out[term], out[f"{term}_targets"])
        loss.backward()
        heads = {
            "update_head": model.update_head.weight.grad,
            "speak_head": model.speak_head.weight.grad,
            "lm_head": model.lm_head.weight.grad,
        }
        return embeds.grad.abs().sum(-1), heads

    for term, index_, own_head, other_head in (
        ("update", batch.update_index, "update_head", "speak_head"),
        ("speak", batch.speak_index, "speak_head", "update_head"),
        ("dst_text", batch.dst_index, None, None),
        ("response", batch.response_index, None, None),
    ):
        per_position, params = grads(term)
        shift = 1 if own_head is None else 0
        for row in range(batch.input_ids.shape[0]):
            reads = index_[index_[:, 0] == row, 1] - shift
            last = int(reads.max()) if len(reads) else -1
            # causal: nothing after the last position the term reads receives gradient; padding never does
            assert per_position[row, last + 1 :].abs().sum() == 0
            assert per_position[row][batch.attention_mask[row] == 0].abs().sum() == 0
        if own_head:
            assert params[own_head].abs().sum() > 0 and params[other_head] is None and params["lm_head"] is None
        else:
            assert params["update_head"] is None and params["speak_head"] is None
            assert params["lm_head"].abs().sum() > 0


def test_streaming_replay_reproduces_training_sequence(parts, index):
    """Token by token through the inference path with ground-truth decisions: same ids, same head logits as the
    batched (padded) training forward."""
    model, _, fmt = parts
    windows = windows_of(index, fmt, max_seq_len=300)[:4]  # windows starting mid-video carry recent turns
    batch = collate(index, fmt, windows, epoch_seed=0)
    with torch.no_grad():
        out = model(batch)
    engine = StreamEngine(model, fmt)
    session = engine.sessions[0]

    def feed(ids, embeds=None):
        return engine.drive(session.feed(ids, embeds))

    for row_in_batch, w in enumerate(windows):
        meta = index.meta(w.video_id)
        expected = build_window(fmt, meta, w.conversation, w.start, w.end)
        conv = meta.conversations[w.conversation]
        session.reset()
        from train.sequence import system_for

        feed(system_for(fmt, meta, w.conversation, w.start))
        logits_a, logits_b = [], []
        for row in range(w.start, w.end):
            segments = frame_segments(fmt, meta, w.conversation, row)
            if segments["user"]:
                feed(segments["user"])
            frame = torch.from_numpy(index.rows(w.video_id, row, row + 1)[0]).float()
            hidden = feed(fmt.frame, frame)
            logits_a.append(model.decision_logits(hidden)[0])
            if meta.dst_update[row]:
                feed(fmt.dst_prefix)
                for token in segments["dst"]:  # as generation feeds them
                    hidden = feed([token])
            logits_b.append(model.decision_logits(hidden)[1])
            if conv.speak[row]:
                feed(fmt.response_prefix)
                for token in segments["response"]:
                    feed([token])
        assert session.ids == expected.input_ids
        mine = batch.update_index[:, 0] == row_in_batch
        torch.testing.assert_close(torch.stack(logits_a), out["update"][mine], atol=1e-4, rtol=1e-4)
        mine = batch.speak_index[:, 0] == row_in_batch
        torch.testing.assert_close(torch.stack(logits_b), out["speak"][mine], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lora", [True, False])
def test_save_then_load_gives_equal_logits(index, tmp_path, lora):
    vlm, tokenizer = build_tiny_random()
    freeze_vision(vlm)
    if lora:
        vlm = wrap_lora(vlm, rank=4, alpha=8)
    torch.manual_seed(1)
    model = DSTModel(vlm)
    with torch.no_grad():  # move away from the initialisation so a missed tensor would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    model.save(tmp_path, tokenizer)
    (tmp_path / "dst.json").write_text(json.dumps({"base_model": "tiny-random", "lora": lora, "frame_adapter": True}))
    loaded, loaded_tokenizer, _ = load_dst_model(tmp_path)
    fmt = SequenceFormat(tokenizer, 5)
    batch = collate(index, fmt, windows_of(index, fmt)[:2], epoch_seed=0)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    tolerance = 1e-5 if lora else 0  # eval merges the adapters: the same function, rounded in another order
    for key in ("update", "speak", "dst_text", "response"):
        torch.testing.assert_close(a[key], b[key], atol=tolerance, rtol=0)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
