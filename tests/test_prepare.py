"""`dst prepare` with the tiny model on synthetic frames files: stored rows, shapes, round trip, reruns, resume,
bad input, both frame sources, the config file, and two processes under torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import webdataset as wds
from conftest import write_records

from pipeline import prepare
from pipeline.config import ConfigError, resolve
from pipeline.embeddings import encode_frames
from pipeline.frame_sources import open_frames
from pipeline.frames_files import (
    frames_file_candidates,
    synthetic_jpegs,
    write_frames_file,
)
from pipeline.labels import LabelsConfig
from pipeline.labels import run as labels_run
from pipeline.models import load_model
from pipeline.preprocess import preprocess_frames
from pipeline.shards import read_shard, sample_key

FPS = 2.0


def record(uid: str, start: float, n_turns: int = 3, dataset: str = "wtag") -> dict:
    turns = [
        {"role": "assistant" if j % 2 else "user", "time": start + 1.0 + 2.5 * j, "content": f"{uid} turn {j}"}
        for j in range(n_turns)
    ]
    return {
        "video_uid": uid,
        "inferred_goal": "goal",
        "inferred_knowledge": "1. a\n2. b",
        "parsed_video_anns": {"dataset": dataset, "video_start_time": start, "duration": 10.0},
        "dst": [
            {"type": "step", "id": "S1", "start_ts": start + 1.0, "end_ts": start + 4.0, "name": "a"},
            {"type": "step", "id": "S2", "start_ts": start + 4.0, "end_ts": start + 30.0, "name": "b"},
        ],
        "conversations": [
            {"user_type": "talk_some", "conversation": turns},
            {"user_type": "no_talk", "conversation": turns[:1]},
        ],
    }


@pytest.fixture(autouse=True)
def away_from_repo_config(tmp_path, monkeypatch):
    """Run where no configs/data.toml exists, so only the options a test gives count."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def data(tmp_path: Path):
    """Three videos with frames files (the third shorter than its dialogue), one record with no frames file."""
    records = [
        record("vid-a", 1.0),
        record("vid-b", 0.0, n_turns=4),
        record("vid-c", 2.0, n_turns=5),
        record("vid-missing", 0.0),
    ]
    frames = tmp_path / "frames"
    for i, (uid, n) in enumerate((("vid-a", 22), ("vid-b", 20), ("vid-c", 12))):
        write_frames_file(frames_file_candidates(frames, "wtag", uid)[0], synthetic_jpegs(n, size=32, seed=i))
    return write_records(tmp_path / "val.json", records), frames


def run_prepare(dst_json, frames, out, **options):
    cfg = resolve(
        "val",
        {
            "dst_json": (dst_json,),
            "frames_root": frames,
            "model": "tiny-random",
            "out": out,
            "batch_size": 8,
            **options,
        },
    )
    return prepare.run(cfg)


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_stored_rows_equal_fresh_encodings(data, tmp_path):
    dst_json, frames = data
    manifest = run_prepare(dst_json, frames, tmp_path / "out")
    model, _ = load_model("tiny-random")
    samples = {key: (emb, meta) for key, emb, meta in read_shard(tmp_path / "out" / "shard-000000.tar")}
    emb, meta = samples[sample_key("wtag", "vid-a")]
    assert meta.first_frame == 2 and meta.num_frames == 22 and emb.shape == (20, 5, 64)
    assert emb.dtype == np.float16 and meta.frame == list(range(2, 22))
    with open_frames(frames_file_candidates(frames, "wtag", "vid-a")[0]) as src:
        for k in (2, 3, 13, 21):  # row k - k0 holds frame k, encoded alone
            fresh = encode_frames(model, preprocess_frames(src.read([k])[0], 64), 5)
            np.testing.assert_allclose(emb[k - 2].astype(np.float32), fresh[0].float().numpy(), atol=2e-3)
    assert manifest["counts"]["videos_written"] == 3 and manifest["skipped"][0]["video_uid"] == "vid-missing"


@pytest.mark.parametrize("option, tokens", [("1", 1), ("5", 5), ("17", 17), ("all", 16)])
def test_shapes_for_every_tokens_per_frame(data, tmp_path, option, tokens):
    dst_json, frames = data
    run_prepare(dst_json, frames, tmp_path / "out", tokens_per_frame=option, max_videos=1)
    ((key, emb, meta),) = read_shard(tmp_path / "out" / "shard-000000.tar")
    assert emb.shape == (20, tokens, 64) and meta.tokens_per_frame == (option if option == "all" else tokens)


def test_shard_round_trip_through_webdataset(data, tmp_path):
    dst_json, frames = data
    run_prepare(dst_json, frames, tmp_path / "out")
    via_wds = list(
        wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)
        .decode()
        .to_tuple("__key__", "emb.npy", "json")
    )
    via_tar = list(read_shard(tmp_path / "out" / "shard-000000.tar"))
    assert (
        [k for k, _, _ in via_wds]
        == [k for k, _, _ in via_tar]
        == [sample_key("wtag", u) for u in ("vid-a", "vid-b", "vid-c")]
    )
    for (_, e1, m1), (_, e2, m2) in zip(via_wds, via_tar):
        assert np.array_equal(e1, e2) and m1 == m2.to_json()
    meta = via_tar[1][2]
    assert set(meta.to_json()) == {
        "video_uid",
        "dataset",
        "fps",
        "first_frame",
        "num_frames",
        "tokens_per_frame",
        "model",
        "goal",
        "knowledge",
        "nodes",
        "initial_state",
        "conversations",
        "labels",
    }
    # The per-point labels are the rows `dst labels` writes for that video.
    rows = pl.read_parquet(tmp_path / "out" / "labels.parquet").filter(pl.col("video_uid") == "vid-b")
    conv0 = rows.filter(pl.col("conversation") == 0)
    assert meta.dst_state == conv0["dst_state"].to_list()
    assert meta.conversations[0].response == conv0["response"].to_list()
    assert meta.conversations[1].speak == rows.filter(pl.col("conversation") == 1)["speak"].to_list()


def test_labels_parquet_identical_to_dst_labels(data, tmp_path):
    dst_json, frames = data
    run_prepare(dst_json, frames, tmp_path / "out")
    labels_run(LabelsConfig(dst_json, frames, tmp_path / "labels.parquet"))
    assert (tmp_path / "labels.parquet").read_bytes() == (tmp_path / "out" / "labels.parquet").read_bytes()


def test_rerun_is_idempotent_and_encodes_nothing(data, tmp_path, monkeypatch):
    dst_json, frames = data
    run_prepare(dst_json, frames, tmp_path / "out", shard_size_mb=0.004)  # ~one video per shard
    before = digests(tmp_path / "out")
    manifest_before = (tmp_path / "out" / "manifest.json").read_text()
    assert len(before) == 3

    def no_encoding(*args, **kwargs):
        raise AssertionError("a rerun must not encode")

    monkeypatch.setattr(prepare, "encode_video", no_encoding)
    run_prepare(dst_json, frames, tmp_path / "out", shard_size_mb=0.004)
    assert digests(tmp_path / "out") == before
    assert (tmp_path / "out" / "manifest.json").read_text() == manifest_before


class Interrupted(BaseException):
    """Not an Exception, like KeyboardInterrupt (which pytest itself would act on)."""


def test_resume_after_interruption(data, tmp_path, monkeypatch):
    dst_json, frames = data
    run_prepare(dst_json, frames, tmp_path / "straight", shard_size_mb=0.004)
    real_encode, calls, armed = prepare.encode_video, [], [True]

    def interrupted(*args, **kwargs):
        calls.append(args[1].record.video_uid)
        if armed[0] and len(calls) == 2:
            raise Interrupted  # like Ctrl-C or a preempted job in the middle of the second video
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(prepare, "encode_video", interrupted)
    with pytest.raises(Interrupted):
        run_prepare(dst_json, frames, tmp_path / "out", shard_size_mb=0.004)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000000.tar"]
    assert not list((tmp_path / "out").rglob("*.tmp")) and not (tmp_path / "out" / "manifest.json").exists()
    calls.clear()
    armed[0] = False
    run_prepare(dst_json, frames, tmp_path / "out", shard_size_mb=0.004)
    assert calls == ["vid-b", "vid-c"]  # vid-a's shard was finished: not encoded again
    assert digests(tmp_path / "out") == digests(tmp_path / "straight")


def test_settings_change_is_refused(data, tmp_path):
    dst_json, frames = data
    run_prepare(dst_json, frames, tmp_path / "out")
    with pytest.raises(prepare.PlanMismatch, match="tokens_per_frame"):
        run_prepare(dst_json, frames, tmp_path / "out", tokens_per_frame="1")


def test_bad_input_reported_rest_written(data, tmp_path):
    dst_json, frames = data
    path = frames_file_candidates(frames, "wtag", "vid-b")[0]
    jpegs = synthetic_jpegs(20, size=32, seed=1)
    jpegs[5] = jpegs[5][:40]  # truncated JPEG
    jpegs[6] = b"not a jpeg at all"
    write_frames_file(path, jpegs)
    manifest = run_prepare(dst_json, frames, tmp_path / "out")
    videos = manifest["videos"]
    assert videos["vid-b"]["bad_frames"] == [5, 6] and videos["vid-b"]["status"] == "written"
    # vid-c: 12 frames, its dialogue runs to 2 + 1 + 2.5 * 4 = 13 s (frame 26): clamped and dropped, reported.
    assert videos["vid-c"]["clamped_turns"] + videos["vid-c"]["dropped_turns"] > 0
    assert manifest["counts"]["bad_frames"] == 2
    assert manifest["skipped"] == [{"video_uid": "vid-missing", "reason": manifest["skipped"][0]["reason"]}]
    assert "no frames file" in manifest["skipped"][0]["reason"]
    (_, _, _), (_, emb_b, _), (_, _, _) = read_shard(tmp_path / "out" / "shard-000000.tar")
    assert np.array_equal(emb_b[5 - 0], emb_b[4]) and np.array_equal(emb_b[6], emb_b[4])  # replaced by frame 4


def test_strict_refuses_unusable_records(data, tmp_path):
    dst_json, frames = data
    with pytest.raises(SystemExit) as exc:
        run_prepare(dst_json, frames, tmp_path / "out", strict=True)
    assert exc.value.code == 1 and not list((tmp_path / "out").glob("*.tar"))


def _write_mp4(path: Path, jpegs: list[bytes], fps: int) -> None:
    import io

    import av
    from PIL import Image

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.pix_fmt, stream.options = "yuv444p", {"crf": "0"}  # lossless: only the JPEG decode differs
        first = Image.open(io.BytesIO(jpegs[0]))
        stream.width, stream.height = first.size
        for jpeg in jpegs:
            frame = av.VideoFrame.from_image(Image.open(io.BytesIO(jpeg)).convert("RGB"))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_arrow_and_video_sources_agree(tmp_path):
    jpegs = synthetic_jpegs(16, size=32, seed=3)
    write_frames_file(frames_file_candidates(tmp_path / "frames", "wtag", "vid-v")[0], jpegs)
    (tmp_path / "videos" / "wtag").mkdir(parents=True)
    _write_mp4(tmp_path / "videos" / "wtag" / "vid-v.mp4", jpegs, fps=2)
    dst_json = write_records(tmp_path / "v.json", [record("vid-v", 1.0)])
    run_prepare(dst_json, tmp_path / "frames", tmp_path / "a")
    cfg = resolve(
        "val",
        {"dst_json": (dst_json,), "videos_root": tmp_path / "videos", "model": "tiny-random", "out": tmp_path / "v"},
    )
    manifest = prepare.run(cfg)
    assert manifest["source"] == "video" and manifest["videos"]["vid-v"]["frames"] == 14
    ((_, from_arrow, m1),) = read_shard(tmp_path / "a" / "shard-000000.tar")
    ((_, from_video, m2),) = read_shard(tmp_path / "v" / "shard-000000.tar")
    assert from_arrow.shape == from_video.shape and m1 == m2
    a, v = from_arrow.astype(np.float32), from_video.astype(np.float32)
    cos = (a * v).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(v, axis=-1))
    assert cos.min() > 0.99, cos.min()


def test_undecodable_and_missing_videos_are_skipped(tmp_path):
    (tmp_path / "videos" / "wtag").mkdir(parents=True)
    _write_mp4(tmp_path / "videos" / "wtag" / "good.mp4", synthetic_jpegs(12, size=32), fps=2)
    (tmp_path / "videos" / "wtag" / "broken.mp4").write_bytes(os.urandom(4096))
    records = [record("good", 0.0), record("broken", 0.0), record("absent", 0.0)]
    cfg = resolve(
        "val",
        {
            "dst_json": (write_records(tmp_path / "v.json", records),),
            "videos_root": tmp_path / "videos",
            "model": "tiny-random",
            "out": tmp_path / "out",
        },
    )
    manifest = prepare.run(cfg)
    assert manifest["counts"]["videos_written"] == 1 and manifest["videos"]["good"]["frames"] == 12
    reasons = {s["video_uid"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"broken", "absent"}
    assert "broken.mp4" in reasons["broken"] and reasons["absent"].startswith("no video file")


def test_config_file_names_the_split(data, tmp_path, monkeypatch):
    dst_json, frames = data
    config = tmp_path / "configs" / "data.toml"
    config.parent.mkdir()
    config.write_text(
        f'[prepare]\nmodel = "tiny-random"\ntokens_per_frame = 1\n\n'
        f'[splits.val]\ndst_json = ["{dst_json}"]\nframes_root = "{frames}"\nout = "../shards/val"\n'
    )
    monkeypatch.chdir(tmp_path)
    cfg = resolve("val", {}, None)  # the default configs/data.toml in the working folder
    assert (cfg.model, cfg.tokens_per_frame, cfg.frames_root) == ("tiny-random", 1, frames)
    assert cfg.out.resolve() == (tmp_path / "shards" / "val").resolve()
    assert resolve("val", {"tokens_per_frame": "17"}, None).tokens_per_frame == 17
    with pytest.raises(ConfigError, match=r"no \[splits.train\]"):
        resolve("train", {}, None)
    # A source given on the command line replaces the file's.
    assert resolve("val", {"videos_root": tmp_path}, None).frames_root is None


def test_torchrun_two_processes_match_one(data, tmp_path):
    dst_json, frames = data
    run_prepare(dst_json, frames, tmp_path / "one", shard_size_mb=0.004)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "--no-python",
        str(Path(sys.executable).with_name("dst")),
        "prepare",
        "--split",
        "val",
        "--dst-json",
        str(dst_json),
        "--frames-root",
        str(frames),
        "--model",
        "tiny-random",
        "--out",
        str(tmp_path / "two"),
        "--shard-size-mb",
        "0.004",
        "--batch-size",
        "8",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digests(tmp_path / "two") == digests(tmp_path / "one")
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert {k: v for k, v in two.items() if k != "config"} == {k: v for k, v in one.items() if k != "config"}
    assert not list((tmp_path / "two").glob("manifest*.json.tmp"))


def test_shipped_config_file_resolves_every_split():
    config = Path(__file__).parent.parent / "configs" / "data.toml"
    for split in ("train", "val", "test", "demo"):
        cfg = resolve(split, {}, config)
        assert cfg.frames_root is not None and cfg.dst_json and cfg.out.name in (split, "prepared")
    assert len(resolve("train", {}, config).dst_json) == 6
