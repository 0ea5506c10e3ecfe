"""`dst prepare` on hostile input: a refused rerun changes nothing, non-finite or undecodable videos are skipped
with their reason, sample keys never collide, nothing usable is exit 1 with the expected layout, nonsense options
are exit 2, and the manifest counts every shard's samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_records
from test_prepare import record, run_prepare
from typer.testing import CliRunner

from cli import app
from pipeline import prepare
from pipeline.frames_files import (
    frames_file_candidates,
    synthetic_jpegs,
    write_frames_file,
)
from pipeline.labels import NoUsableRecords
from pipeline.shards import read_shard, sample_key

runner = CliRunner()


@pytest.fixture(autouse=True)
def away_from_repo_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def frames_for(root: Path, uids_frames: dict[str, int], dataset: str = "wtag") -> Path:
    for i, (uid, n) in enumerate(uids_frames.items()):
        write_frames_file(frames_file_candidates(root, dataset, uid)[0], synthetic_jpegs(n, size=32, seed=i))
    return root


def text_of(result) -> str:
    return " ".join(result.output.split())


def test_a_refused_rerun_writes_nothing(tmp_path):
    frames = frames_for(tmp_path / "frames", {"vid-a": 16, "vid-b": 14})
    dst_json = write_records(tmp_path / "v.json", [record("vid-a", 1.0), record("vid-b", 0.0)])
    run_prepare(dst_json, frames, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    write_records(dst_json, [record("vid-a", 1.0)])  # other videos and other settings: refused
    with pytest.raises(prepare.PlanMismatch, match="different tokens_per_frame, tokens, shards; use another --out"):
        run_prepare(dst_json, frames, tmp_path / "out", tokens_per_frame="1")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


def test_non_finite_and_undecodable_videos_are_skipped_with_the_reason(tmp_path, monkeypatch):
    frames = frames_for(tmp_path / "frames", {"vid-a": 16, "vid-nan": 14})
    write_frames_file(frames_file_candidates(frames, "wtag", "vid-black")[0], [b"not a jpeg"] * 12)
    dst_json = write_records(tmp_path / "v.json", [record(u, 0.0) for u in ("vid-a", "vid-nan", "vid-black")])
    real = prepare.encode_video

    def overflowing(model, labels, *args, **kwargs):
        emb, bad = real(model, labels, *args, **kwargs)
        if labels.record.video_uid == "vid-nan":
            emb[4, 0, 0] = np.inf
        return emb, bad

    monkeypatch.setattr(prepare, "encode_video", overflowing)
    manifest = run_prepare(dst_json, frames, tmp_path / "out")
    reasons = {s["video_uid"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        "vid-nan": "non-finite embeddings at 1 of 14 frames (first: frame 4); the encoder "
        "overflowed or the model is broken",
        "vid-black": f"{frames_file_candidates(frames, 'wtag', 'vid-black')[0]}: none of its "
        "12 frames (0 to 11) could be decoded",
    }
    assert manifest["counts"]["videos_written"] == 1 and manifest["shard_samples"] == {"shard-000000.tar": 1}
    assert [meta.video_uid for _, _, meta in read_shard(tmp_path / "out" / "shard-000000.tar")] == ["vid-a"]
    assert not list((tmp_path / "out" / ".prepare" / "cache").iterdir())  # nothing non-finite cached either


def test_uids_that_sanitise_alike_get_their_own_samples(tmp_path):
    uids = ["vid.x", "vid_x", "vidé", "vidè"]
    frames = frames_for(tmp_path / "frames", {u: 12 + i for i, u in enumerate(uids)})
    dst_json = write_records(tmp_path / "v.json", [record(u, 0.0) for u in uids] + [record("vid.x", 0.0)])
    manifest = run_prepare(dst_json, frames, tmp_path / "out")
    assert manifest["counts"]["videos_written"] == 4
    assert manifest["skipped"] == [
        {
            "video_uid": "vid.x",
            "reason": "duplicate video_uid in dataset wtag: record #0 has it too and is used (an exact copy)",
        }
    ]
    samples = {meta.video_uid: (key, len(emb)) for key, emb, meta in read_shard(tmp_path / "out" / "shard-000000.tar")}
    assert samples == {u: (sample_key("wtag", u), 12 + i) for i, u in enumerate(uids)}
    assert len({key for key, _ in samples.values()}) == 4


def test_nothing_usable_is_exit_1_with_the_layout_and_writes_nothing(tmp_path):
    frames_for(tmp_path / "frames", {"vid-a": 16})
    dst_json = write_records(tmp_path / "v.json", [record("vid-a", 1.0)])
    result = runner.invoke(
        app,
        [
            "prepare",
            "--split",
            "val",
            "--dst-json",
            str(dst_json),
            "--frames-root",
            str(tmp_path / "frames" / "wtag" / "frames"),
            "--model",
            "tiny-random",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1
    assert (
        f"frames files are expected at {tmp_path}/frames/wtag/frames/{{dataset}}/frames/{{name}}.arrow "
        "(--frames-root is ProAssist's processed_data folder, or one dataset's folder); nothing written"
        in text_of(result)
    )
    assert not (tmp_path / "out").exists()


def test_every_video_failing_to_encode_is_exit_1(tmp_path):
    frames = tmp_path / "frames"
    write_frames_file(frames_file_candidates(frames, "wtag", "vid-black")[0], [b"not a jpeg"] * 12)
    dst_json = write_records(tmp_path / "v.json", [record("vid-black", 0.0)])
    with pytest.raises(
        NoUsableRecords,
        match=r"^no video could be encoded \(the first, vid-black: \S+vid-black.arrow: none "
        r"of its 12 frames \(0 to 11\) could be decoded\); see .*manifest.json$",
    ):
        run_prepare(dst_json, frames, tmp_path / "out")


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--fps", "0", "fps must be > 0, got 0.0"),
        ("--fps", "nan", "fps must be a finite number, got nan"),
        ("--max-videos", "-1", "max_videos must be >= 1, got -1"),
        ("--batch-size", "0", "batch_size must be >= 1, got 0"),
        ("--shard-size-mb", "0", "shard_size_mb must be > 0, got 0.0"),
        ("--shard-size-mb", "inf", "shard_size_mb must be a finite number, got inf"),
    ],
)
def test_nonsense_numbers_are_exit_2(tmp_path, option, value, message):
    dst_json = write_records(tmp_path / "v.json", [record("vid-a", 1.0)])
    result = runner.invoke(
        app,
        [
            "prepare",
            "--split",
            "val",
            "--dst-json",
            str(dst_json),
            "--frames-root",
            str(tmp_path),
            "--model",
            "tiny-random",
            "--out",
            str(tmp_path / "out"),
            option,
            value,
        ],
    )
    assert result.exit_code == 2 and text_of(result) == f"error: {message}"


def test_manifest_counts_the_samples_of_every_shard(tmp_path):
    frames = frames_for(tmp_path / "frames", {"vid-a": 16, "vid-b": 14, "vid-c": 12})
    dst_json = write_records(tmp_path / "v.json", [record(u, 0.0) for u in ("vid-a", "vid-b", "vid-c")])
    manifest = run_prepare(dst_json, frames, tmp_path / "out", shard_size_mb=0.004)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())["shard_samples"]
    assert manifest["shard_samples"] == on_disk == {f"shard-00000{i}.tar": 1 for i in range(3)}
