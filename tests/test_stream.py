"""Streaming inference: the KV cache changes nothing, context strategies, constrained DST decoding, modes."""

from __future__ import annotations

import pytest

from eval.stream import StreamConfig, Streamer, apply_thresholds
from pipeline.shard_index import ShardIndex
from pipeline.timeline import STATE_RANK
from train.checkpoint import load_dst_model
from train.sequence import SequenceFormat, format_state, parse_update


@pytest.fixture(scope="module")
def setup(tiny_run, tiny_shards):
    model, tokenizer, meta = load_dst_model(tiny_run)
    index = ShardIndex.build(tiny_shards)
    return model, SequenceFormat(tokenizer, meta["tokens_per_frame"]), index


def stream(setup, video: int = 0, conversation: int = 0, **options):
    model, fmt, index = setup
    vid = index.video_ids[video]
    streamer = Streamer(model, fmt, StreamConfig(**{"protocol": "full-video", **options}))
    return streamer, streamer.run(index.meta(vid), index.rows(vid, 0, index.num_rows(vid)), conversation)["frames"]


def test_cache_matches_full_recompute(setup):
    """Low thresholds so the model speaks and updates often: generated text feeds back into the context."""
    options = dict(theta_update=0.3, theta_speak=0.3, max_new_tokens=6)
    _, cached = stream(setup, **options)
    _, full = stream(setup, use_cache=False, **options)
    assert any(f["pred_text"] for f in cached) and any(f["pred_dst_delta"] for f in cached)
    for a, b in zip(cached, full):
        assert a["p_update"] == pytest.approx(b["p_update"], abs=1e-5)
        assert a["p_speak"] == pytest.approx(b["p_speak"], abs=1e-5)
        assert (a["pred_text"], a["pred_dst_delta"]) == (b["pred_text"], b["pred_dst_delta"])


def test_constrained_updates_are_always_valid(setup):
    """theta_update 0: an update at every frame, from a barely trained model; every one must be valid."""
    for video in range(3):
        _, frames = stream(setup, video=video, theta_update=0.0, theta_speak=1.0)
        model, fmt, index = setup
        state = dict(index.meta(index.video_ids[video]).initial_state)
        updates = 0
        for f in frames:
            if f["pred_dst_text"]:
                updates += 1
                assert parse_update(f["pred_dst_text"], state) == f["pred_dst_delta"]
            assert all(STATE_RANK[f["pred_state"][n]] >= STATE_RANK[state[n]] for n in state)
            state = f["pred_state"]
        assert updates > 0


@pytest.mark.parametrize("strategy", ["reseed", "drop-all", "drop-middle"])
def test_context_strategies(setup, strategy, monkeypatch):
    model, fmt, index = setup
    limit = 260
    streamer = Streamer(
        model,
        fmt,
        StreamConfig(
            theta_update=0.0,
            theta_speak=1.0,
            max_context=limit,
            context_strategy=strategy,
            max_new_tokens=4,
            protocol="full-video",
        ),
    )
    session, prefixes, longest = streamer.session, [], [0]
    refeed, feed = session.refeed, session.feed

    def watched_refeed(chunks):
        prefixes.append(chunks)
        return (yield from refeed(chunks))

    def watched_feed(ids, embeds=None, logits=False):
        hidden = yield from feed(ids, embeds, logits)
        longest[0] = max(longest[0], session.length)
        return hidden

    monkeypatch.setattr(session, "refeed", watched_refeed)
    monkeypatch.setattr(session, "feed", watched_feed)
    vid = index.video_ids[0]
    meta = index.meta(vid)
    frames = streamer.run(meta, index.rows(vid, 0, index.num_rows(vid)), 0)["frames"]
    assert prefixes, f"max_context {limit} must trigger the strategy"
    assert longest[0] <= limit
    nodes = [(n.id, n.name) for n in meta.nodes]
    if strategy == "reseed":
        # each new prefix is the system prompt holding the DST tracked at that moment (the model changed it:
        # theta_update 0), plus recent turns
        tracked = {format_state(f["pred_state"]) for f in frames}
        states = []
        for chunks in prefixes:
            assert len(chunks) == 1
            text = fmt.tokenizer.decode(chunks[0][0])
            states.append(text.split("State: ")[1].split("\n")[0].split("<")[0].strip())
        assert all(state in tracked for state in states)
        assert any(state != format_state(meta.initial_state) for state in states)
    elif strategy == "drop-all":
        assert all([c[0] for c in chunks] == [fmt.system(meta.goal, nodes, meta.initial_state)] for chunks in prefixes)
    else:
        for chunks in prefixes:
            assert chunks[0][0] == fmt.system(meta.goal, nodes, meta.initial_state) and len(chunks) > 1
            assert sum(len(c[0]) for c in chunks) <= limit


def test_baselines_and_oracle(setup):
    _, oracle = stream(setup, mode="oracle")
    assert all(f["pred_text"] == f["ref_text"] and f["pred_state"] == f["ref_state"] for f in oracle)
    _, never = stream(setup, mode="never")
    assert not any(f["pred_text"] or f["pred_dst_delta"] for f in never)
    _, periodic = stream(setup, mode="periodic", every=2.0)
    spoken = [i for i, f in enumerate(periodic) if f["pred_text"]]
    assert spoken and all((i + 1) % 4 == 0 for i in spoken)


def test_teacher_forced_thresholds_are_post_hoc(setup):
    _, frames = stream(setup, mode="teacher-forced", theta_speak=0.5, theta_update=0.5, max_new_tokens=4)
    for f in frames:
        assert f["pred_state"] == {**f["state_before"], **f["pred_dst_delta"]}
    low = apply_thresholds([dict(f) for f in frames], 0.05, 0.05)
    assert sum(bool(f["pred_text"]) for f in low) >= sum(bool(f["pred_text"]) for f in frames)


def test_teacher_forced_rollback_leaves_the_context_unchanged(setup):
    """Generating (then cropping the cache) at every frame must not move any later probability."""
    _, rolled = stream(setup, mode="teacher-forced", generate_above=0.0, max_new_tokens=3)
    _, plain = stream(setup, mode="teacher-forced", generate_above=1.0)
    assert any(f["gen_text"] for f in rolled) and not any(f["gen_text"] for f in plain)
    for a, b in zip(rolled, plain):
        assert a["p_update"] == pytest.approx(b["p_update"], abs=1e-6)
        assert a["p_speak"] == pytest.approx(b["p_speak"], abs=1e-6)


def test_reseed_oracle_reseeds_with_the_reference_state(setup):
    """dst under reseed-oracle, never updating on its own (theta_update 1): right after each re-seed the tracked
    state is the reference state before that frame, and the re-seed record says so."""
    model, fmt, index = setup
    vid = index.video_ids[0]
    meta = index.meta(vid)
    streamer = Streamer(
        model,
        fmt,
        StreamConfig(
            theta_update=1.0,
            theta_speak=1.0,
            max_context=260,
            context_strategy="reseed-oracle",
            max_new_tokens=4,
            protocol="full-video",
        ),
    )
    out = streamer.run(meta, index.rows(vid, 0, index.num_rows(vid)), 0)
    frames, reseeds = out["frames"], out["reseeds"]
    assert reseeds and all(r["strategy"] == "reseed-oracle-dst" for r in reseeds)
    assert any(frames[r["row"]]["ref_state"] != meta.initial_state for r in reseeds)
    for r in reseeds:
        before = frames[r["row"] - 1]["ref_state"]
        assert frames[r["row"]]["pred_state"] == before  # no update of its own at theta 1: the seeded state


def test_reseed_oracle_under_ground_truth_decisions_equals_the_oracle(setup):
    """The model's stream with every decision and text forced to the references (`force`), re-seeded from the
    reference state under a small context, gives exactly the oracle baseline's states and texts."""
    model, fmt, index = setup
    vid = index.video_ids[0]
    meta, rows = index.meta(vid), index.rows(vid, 0, index.num_rows(vid))
    _, oracle = stream(setup, mode="oracle")
    streamer = Streamer(
        model,
        fmt,
        StreamConfig(max_context=260, context_strategy="reseed-oracle", protocol="full-video", max_new_tokens=40),
    )
    out = streamer.run(meta, rows, 0, force=True)
    assert out["reseeds"], "max_context 260 must re-seed"
    keys = ("pred_text", "pred_state", "pred_dst_delta")
    assert [tuple(f[k] for k in keys) for f in out["frames"]] == [tuple(f[k] for k in keys) for f in oracle]
