"""The three variants (docs/design.md §5) in the one sequence builder, the ProAssist protocol's stream length, and the
variant carried from `dst train` to `dst eval`."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from cli import app
from eval.config import offline_sts_model
from eval.stream import stream_rows
from pipeline.shard_index import ShardIndex
from pipeline.shards import ShardFormatError
from pipeline.smolvlm import build_tiny_tokenizer
from train import run as train_run
from train.config import resolve
from train.sequence import SequenceFormat, build_window, progress_before, system_for
from train.windows import cut_windows

NODES = [("S1", "open"), ("S2", "screw")]
STATE = {"S1": "completed", "S2": "in_progress"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def index(tiny_shards):
    return ShardIndex.build(tiny_shards)


def decode(fmt, ids):
    return fmt.tokenizer.decode(ids)


def test_system_segment_per_variant(tokenizer):
    dst = decode(SequenceFormat(tokenizer, 5, "dst"), SequenceFormat(tokenizer, 5, "dst").system("g", NODES, STATE))
    assert "State: S1=completed; S2=in_progress" in dst and "track the state" in dst and "Progress" not in dst
    summary = SequenceFormat(tokenizer, 5, "summary")
    text = decode(summary, summary.system("g", NODES, None, [("User", "hi")], progress="two steps done"))
    assert "State:" not in text and "track the state" not in text
    assert "Progress: two steps done\nRecent dialogue:\nUser: hi" in text
    assert "Progress" not in decode(summary, summary.system("g", NODES))  # nothing summarised yet: no line
    none = SequenceFormat(tokenizer, 5, "none")
    assert "State:" not in decode(none, none.system("g", NODES)) and "S2: screw" in decode(
        none, none.system("g", NODES)
    )
    with pytest.raises(ValueError, match="summary variant"):
        none.system("g", NODES, progress="x")
    with pytest.raises(ValueError, match="DST state"):
        SequenceFormat(tokenizer, 5, "dst").system("g", NODES)
    with pytest.raises(ValueError, match="variant must be one of"):
        SequenceFormat(tokenizer, 5, "memory")


def test_progress_before_is_the_latest_summary_strictly_before(index):
    meta = index.meta(index.video_ids[0])
    progress = meta.conversations[0].progress
    rows = [r for r, p in enumerate(progress) if p]
    assert len(rows) >= 2
    assert progress_before(meta, 0, rows[0]) == ""  # not yet: the turn at rows[0] is not before it
    assert progress_before(meta, 0, rows[0] + 1) == progress[rows[0]]
    assert progress_before(meta, 0, rows[1]) == progress[rows[0]]
    assert progress_before(meta, 0, len(progress)) == progress[rows[-1]]


def test_summary_window_closes_with_the_request_and_the_progress(tokenizer, index):
    fmt = SequenceFormat(tokenizer, index.tokens_per_frame, "summary")
    vid = index.video_ids[0]
    meta = index.meta(vid)
    n = len(meta.frame)
    first_progress = next(r for r, p in enumerate(meta.conversations[0].progress) if p)
    start, end = first_progress + 1, n - 4
    assert progress_before(meta, 0, start) and start < end
    seq = build_window(fmt, meta, 0, start, end)
    # frame rows: every row of the window, then the last one again inside the closing block
    assert seq.frame_rows == list(range(start, end)) + [end - 1]
    assert len(seq.image_positions) == (end - start + 1) * fmt.tokens_per_frame
    expected_summary = fmt.response_body(progress_before(meta, 0, end))
    assert [seq.input_ids[p] for p in seq.summary_targets] == expected_summary
    assert seq.summary_targets[-1] == len(seq.input_ids) - 1  # the summary and its EOS end the window
    closing = fmt.summary_request + fmt.frame + fmt.summary_prefix + expected_summary
    assert seq.input_ids[-len(closing) :] == closing
    assert "Please summarize the progress." in decode(fmt, fmt.summary_request)
    # no DST anywhere, one speaking decision per frame, at the frame block's last token
    assert seq.update_positions == [] and seq.dst_targets == []
    assert [seq.input_ids[p] for p in seq.speak_positions] == [fmt.frame[-1]] * (end - start)
    # the window that reaches the video's end has no closing block; a window at 0 carries no progress
    last = build_window(fmt, meta, 0, start, n)
    assert last.summary_targets == [] and last.frame_rows == list(range(start, n))
    assert "Progress:" not in decode(fmt, system_for(fmt, meta, 0, 0))
    assert f"Progress: {progress_before(meta, 0, start)}" in decode(fmt, system_for(fmt, meta, 0, start))


@pytest.mark.parametrize("variant", ["dst", "summary", "none"])
def test_cut_windows_count_exactly_and_fit(tokenizer, index, variant):
    fmt = SequenceFormat(tokenizer, index.tokens_per_frame, variant)
    for vid in index.video_ids:
        meta = index.meta(vid)
        windows = cut_windows(fmt, meta, vid, max_seq_len=240)
        for c in range(len(meta.conversations)):
            mine = [w for w in windows if w.conversation == c]
            assert [w.start for w in mine[1:]] == [w.end for w in mine[:-1]]  # contiguous, covering every row
            assert mine[0].start == 0 and mine[-1].end == len(meta.frame)
        assert len(windows) > len(meta.conversations)  # 240 tokens cut every conversation
        for w in windows:
            seq = build_window(fmt, meta, w.conversation, w.start, w.end)
            assert len(seq.input_ids) == w.n_tokens <= 240
            assert bool(seq.summary_targets) == (variant == "summary" and w.end < len(meta.frame))
            assert w.n_update_pos == (sum(map(bool, meta.dst_update[w.start : w.end])) if variant == "dst" else 0)


def test_protocol_stream_length(index):
    meta = index.meta(index.video_ids[0])
    for c, conv in enumerate(meta.conversations):
        last_speak = max(r for r, s in enumerate(conv.speak) if s)
        assert stream_rows(meta, c, "proassist") == last_speak + 1
        assert stream_rows(meta, c, "full-video") == len(conv.speak)
    silent = replace(meta, conversations=[replace(meta.conversations[0], speak=[False] * len(conv.speak))])
    assert stream_rows(silent, 0, "proassist") == 0
    with pytest.raises(ValueError, match="protocol"):
        stream_rows(meta, 0, "whole")


def strip_progress(src, dst):
    """A copy of the shards without progress summaries and intents (what no `dst prepare` writes)."""
    dst.mkdir()
    for shard in sorted(src.glob("shard-*.tar")):
        with tarfile.open(shard) as tin, tarfile.open(dst / shard.name, "w") as tout:
            for member in tin:
                data = tin.extractfile(member).read()
                if member.name.endswith(".json"):
                    meta = json.loads(data)
                    for conv in meta["labels"]["conversations"]:
                        del conv["progress"], conv["response_labels"]
                    data = json.dumps(meta).encode()
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))


def test_shards_without_progress_summaries_are_refused(tiny_shards, tmp_path):
    old = tmp_path / "old-shards"
    strip_progress(tiny_shards, old)
    base = {
        "shards": old,
        "model": "tiny-random",
        "batch_size": "600",
        "max_seq_len": 300,
        "num_workers": 0,
        "max_steps": 1,
    }
    with pytest.raises(ShardFormatError, match=r"labels.conversations\[0\].progress is not a list"):
        train_run.run(resolve({**base, "out": tmp_path / "s", "variant": "summary"}))


def invoke(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_summary_variant_trains_and_streams_with_summaries(tiny_shards, tmp_path):
    run = tmp_path / "run"
    invoke(
        "train",
        "--shards",
        tiny_shards,
        "--model",
        "tiny-random",
        "--out",
        run,
        "--variant",
        "summary",
        "--max-steps",
        "4",
        "--batch-size",
        "500",
        "--max-seq-len",
        "250",
        "--num-workers",
        "0",
    )
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["summary"] > 0 and lines[-1]["update"] == 0 and lines[-1]["dst_text"] == 0
    ckpt = run / "checkpoints" / "last"
    assert json.loads((ckpt / "dst.json").read_text())["variant"] == "summary"
    sts = offline_sts_model()
    out = tmp_path / "eval"
    invoke(
        "eval",
        "--ckpt",
        ckpt,
        "--shards",
        tiny_shards,
        "--out",
        out,
        "--sts-model",
        sts,
        "--max-new-tokens",
        "4",
        "--max-summary-tokens",
        "6",
        "--protocol",
        "full-video",
        "--theta-speak",
        "0.99",
    )
    dialogues = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {d["variant"] for d in dialogues} == {"summary"} and {d["protocol"] for d in dialogues} == {"full-video"}
    reseeds = [r for d in dialogues for r in d["reseeds"]]
    assert reseeds and all(r["strategy"] == "reseed-summary" and "summary" in r for r in reseeds)
    assert all(f["p_update"] is None and not f["pred_dst_delta"] for d in dialogues for f in d["frames"])
    # an explicit variant must agree with the checkpoint; a run folder is not a checkpoint
    result = invoke(
        "eval",
        "--ckpt",
        ckpt,
        "--shards",
        tiny_shards,
        "--out",
        tmp_path / "x",
        "--variant",
        "dst",
        "--sts-model",
        sts,
        code=2,
    )
    assert "disagrees with the checkpoint, which was trained as summary" in result.output
    result = invoke("eval", "--ckpt", run, "--shards", tiny_shards, "--out", tmp_path / "x", "--sts-model", sts, code=2)
    assert "is a run folder" in result.output and "checkpoints/last" in result.output
    result = invoke(
        "eval",
        "--ckpt",
        ckpt,
        "--shards",
        tiny_shards,
        "--out",
        tmp_path / "x",
        "--sts-model",
        sts,
        "--max-context",
        "251",
        code=2,
    )
    assert "exceeds the checkpoint's training max_seq_len 250" in result.output
