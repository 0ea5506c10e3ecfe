"""The model-mode streaming code, fed the ground truth (decisions and texts forced through its own decoders),
rebuilds the training token ids window by window, across several re-seeds, for every variant; and its head logits
equal the batched (padded) training forward's within 1e-4.

This is the guarantee that training and inference see the same sequences: the streaming code is the real one (its
re-seeds, its constrained DST decoder, its greedy loop, the summary variant's closing block), not a re-implementation.
"""

from __future__ import annotations

import pytest
import torch

from eval.stream import StreamConfig, Streamer
from pipeline.shard_index import ShardIndex
from pipeline.smolvlm import build_tiny_random
from train.loader import collate
from train.model import DSTModel
from train.sequence import SequenceFormat, build_window
from train.variants import NAMES as VARIANTS
from train.windows import Window

# Small enough for several re-seeds on the tiny videos, large enough for a few frames after a prompt with recent turns.
MAX_CONTEXT = {"dst": 250, "summary": 235, "none": 170}


@pytest.fixture(scope="module")
def model_and_index(tiny_shards):
    vlm, tokenizer = build_tiny_random()
    torch.manual_seed(0)
    return DSTModel(vlm).eval(), tokenizer, ShardIndex.build(tiny_shards)


def replay(model, fmt, index, vid: str, conversation: int):
    """Stream one dialogue in model mode with forced ground truth; return the dialogue record, the ids of each
    context (between re-seeds) and the head logits the stream read, in order."""
    streamer = Streamer(
        model,
        fmt,
        StreamConfig(
            variant=fmt.variant.name,
            max_context=MAX_CONTEXT[fmt.variant.name],
            max_new_tokens=8,
            max_summary_tokens=8,
            protocol="full-video",
        ),
    )
    session = streamer.session
    contexts, logits = [], {"update": [], "speak": []}
    refeed, decisions = session.refeed, session.decisions

    def watched_refeed(chunks):
        contexts.append(list(session.ids))
        return (yield from refeed(chunks))

    def watched_decisions(hidden):
        update, speak = model.decision_logits(hidden)
        logits["update"].append(update)
        logits["speak"].append(speak)
        return decisions(hidden)

    session.refeed, session.decisions = watched_refeed, watched_decisions
    meta = index.meta(vid)
    out = streamer.run(meta, index.rows(vid, 0, index.num_rows(vid)), conversation, force=True)
    contexts.append(list(session.ids))
    return out, contexts, logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_mode_replay_rebuilds_training_windows(model_and_index, variant):
    model, tokenizer, index = model_and_index
    fmt = SequenceFormat(tokenizer, index.tokens_per_frame, variant)
    for vid in index.video_ids:
        meta = index.meta(vid)
        out, contexts, logits = replay(model, fmt, index, vid, 0)
        frames = out["frames"]
        # ground truth forced: the predictions are the references
        assert [f["pred_text"] for f in frames] == [f["ref_text"] for f in frames]
        if variant == "dst":
            assert [f["pred_state"] for f in frames] == [f["ref_state"] for f in frames]
        bounds = [0] + [r["row"] for r in out["reseeds"]] + [len(frames)]
        assert len(contexts) == len(bounds) - 1
        windows = []
        for (start, end), ids in zip(zip(bounds, bounds[1:]), contexts):
            expected = build_window(fmt, meta, 0, start, end)
            assert ids == expected.input_ids, (vid, start, end)
            windows.append(Window(vid, meta.dataset, 0, start, end, len(expected.input_ids), 0, 0))
        if variant == "summary":  # the generated (forced) summaries are the reference progress texts
            assert all(r["summary"] == r["ref_progress"] for r in out["reseeds"])
            assert any(r["summary"] for r in out["reseeds"])
        assert len(out["reseeds"]) >= 2, f"{vid}: the test means something only across several re-seeds"
        batch = collate(index, fmt, windows, epoch_seed=0)
        with torch.no_grad():
            trained = model(batch)
        streamed_speak = torch.stack(logits["speak"])
        if variant == "dst":
            # decision A is read once per frame, then B; the stream records both per frame in that order
            streamed_update = torch.stack(logits["update"][0::2])
            streamed_speak = torch.stack(logits["speak"][1::2])
            torch.testing.assert_close(streamed_update, trained["update"], atol=1e-4, rtol=1e-4)
        assert batch.update_index.shape[0] == (len(frames) if variant == "dst" else 0)
        torch.testing.assert_close(streamed_speak, trained["speak"], atol=1e-4, rtol=1e-4)
