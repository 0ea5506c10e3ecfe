"""Batched streaming (`--batch-dialogues`): several dialogues share each forward and give what one at a time gives."""

from __future__ import annotations

import pytest
import torch

from eval.engine import StreamEngine
from eval.stream import StreamConfig, Streamer
from pipeline.shard_index import ShardIndex
from train.checkpoint import load_dst_model
from train.sequence import SequenceFormat

# Low thresholds: the barely trained model updates and speaks often, so generation, constrained decoding, rollback
# and re-seeds (small contexts) all happen while other dialogues feed frames in the same rounds.
OPTIONS = dict(
    theta_update=0.3,
    theta_speak=0.25,
    max_new_tokens=6,
    max_summary_tokens=6,
    generate_above=0.25,
    protocol="full-video",
)
MAX_CONTEXT = {"dst": 250, "summary": 235}


@pytest.fixture(scope="module")
def setup(tiny_run, tiny_shards):
    model, tokenizer, meta = load_dst_model(tiny_run)
    return model, tokenizer, meta["tokens_per_frame"], ShardIndex.build(tiny_shards)


def dialogues(index):
    for vid in index.video_ids:
        meta = index.meta(vid)
        emb = index.rows(vid, 0, index.num_rows(vid))
        for c in range(len(meta.conversations)):
            yield (vid, c), meta, emb, c


def with_ids(streamer, meta, emb, conversation):
    """A job that also returns the dialogue's final context ids."""

    def start(session):
        result = yield from streamer.dialogue(session, meta, emb, conversation)
        return result, list(session.ids)

    return start


@pytest.mark.parametrize(
    "mode,variant,attention",
    [
        ("model", "dst", "segments"),
        ("teacher-forced", "dst", "segments"),
        ("model", "summary", "segments"),
        ("teacher-forced", "summary", "segments"),
        ("model", "dst", "padded"),
        ("teacher-forced", "summary", "padded"),  # the GPU default, checked on the CPU
    ],
)
def test_batched_streaming_equals_one_at_a_time(setup, mode, variant, attention):
    model, tokenizer, tokens, index = setup
    fmt = SequenceFormat(tokenizer, tokens, variant)
    cfg = StreamConfig(mode=mode, variant=variant, max_context=MAX_CONTEXT[variant], **OPTIONS)
    single = Streamer(model, fmt, cfg)
    expected = {}
    for key, meta, emb, c in dialogues(index):
        expected[key] = (single.run(meta, emb, c), list(single.session.ids))
    batched = Streamer(model, fmt, cfg, slots=3)
    batched.engine.padded = attention == "padded"
    jobs = [(key, with_ids(batched, meta, emb, c)) for key, meta, emb, c in dialogues(index)]
    got = dict(batched.engine.run_many(jobs))
    assert set(got) == set(expected) and len(got) == 8
    generated = reseeded = 0
    for key, (want, want_ids) in expected.items():
        out, ids = got[key]
        assert ids == want_ids, key
        assert out["reseeds"] == want["reseeds"], key
        reseeded += len(out["reseeds"])
        generated += sum(bool(r.get("summary")) for r in out["reseeds"])
        assert len(out["frames"]) == len(want["frames"])
        for a, b in zip(out["frames"], want["frames"]):
            for name in ("p_update", "p_speak"):
                if b[name] is None:
                    assert a[name] is None
                else:
                    assert a[name] == pytest.approx(b[name], abs=1e-5), (key, a["frame"], name)
            assert {k: v for k, v in a.items() if not k.startswith("p_")} == {
                k: v for k, v in b.items() if not k.startswith("p_")
            }, (key, a["frame"])
            generated += bool(
                a.get("pred_text") or a.get("gen_text") or a.get("pred_dst_delta") or a.get("gen_dst_delta")
            )
    assert generated >= 20, "the comparison must cover generated text and updates"
    assert reseeded >= 8, "and re-seeds"


def test_run_many_yields_every_job_and_baselines_pass_through(setup):
    model, tokenizer, tokens, index = setup
    fmt = SequenceFormat(tokenizer, tokens)
    jobs = [(key, meta, emb, c, None) for key, meta, emb, c in dialogues(index)]
    never = Streamer(None, None, StreamConfig(mode="never"), slots=4)
    assert [key for key, _ in never.run_many(jobs)] == [job[0] for job in jobs]  # baselines: job order
    streamer = Streamer(model, fmt, StreamConfig(**OPTIONS, max_context=250), slots=16)  # more slots than jobs
    assert sorted(key for key, _ in streamer.run_many(jobs)) == sorted(job[0] for job in jobs)


def test_cache_grows_past_its_capacity(setup):
    """A context longer than the pre-allocated capacity: the buffers grow and nothing changes."""
    model, tokenizer, tokens, index = setup
    fmt = SequenceFormat(tokenizer, tokens)
    vid = index.video_ids[0]
    emb = torch.from_numpy(index.rows(vid, 0, index.num_rows(vid))).float()
    hidden = {}
    for capacity in (8, 4096):
        engine = StreamEngine(model, fmt, capacity=capacity)
        session = engine.sessions[0]
        out = [engine.drive(session.feed(fmt.system("goal", [("S1", "open")], {"S1": "not_started"})))]
        for row in range(20):
            out.append(engine.drive(session.feed(fmt.frame, emb[row])))
        hidden[capacity] = torch.stack(out)
        assert engine.cache.capacity >= session.length
    assert session.length > 8 * 4
    torch.testing.assert_close(hidden[8], hidden[4096], atol=1e-5, rtol=1e-5)


def test_eval_batch_dialogues_option(tiny_run, tiny_shards, tmp_path):
    """`dst eval --batch-dialogues 4` writes the dialogues in the order one at a time does, with the same
    predictions (probabilities within 1e-5)."""
    import json

    from typer.testing import CliRunner

    from cli import app
    from eval.config import offline_sts_model

    def lines(batch: int) -> list[dict]:
        out = tmp_path / str(batch)
        result = CliRunner().invoke(
            app,
            [
                "eval",
                "--ckpt",
                str(tiny_run),
                "--shards",
                str(tiny_shards),
                "--out",
                str(out),
                "--sts-model",
                offline_sts_model(),
                "--max-new-tokens",
                "6",
                "--max-context",
                "300",
                "--theta-speak",
                "0.3",
                "--theta-update",
                "0.3",
                "--batch-dialogues",
                str(batch),
            ],
        )
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    one, four = lines(1), lines(4)
    assert [(d["video_uid"], d["conversation"]) for d in four] == [(d["video_uid"], d["conversation"]) for d in one]
    for a, b in zip(four, one):
        assert a["reseeds"] == b["reseeds"]
        for fa, fb in zip(a["frames"], b["frames"]):
            assert fa["p_speak"] == pytest.approx(fb["p_speak"], abs=1e-5)
            assert (fa["pred_text"], fa["pred_dst_delta"]) == (fb["pred_text"], fb["pred_dst_delta"])
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--shards",
            str(tiny_shards),
            "--out",
            str(tmp_path / "bad"),
            "--mode",
            "never",
            "--batch-dialogues",
            "0",
        ],
    )
    assert result.exit_code == 2 and "batch_dialogues must be >= 1" in result.output
