"""`dst labels` on bad input: unusable records are skipped and named, nothing else is lost; --strict fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import write_dummy_frames, write_records
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def good(uid: str, dataset: str = "epickitchens") -> dict:
    return {
        "video_uid": uid,
        "inferred_goal": "make tea",
        "inferred_knowledge": "1. boil\n2. pour",
        "parsed_video_anns": {"dataset": dataset, "video_start_time": 1.0, "duration": 9.0},
        "dst": [
            {"type": "step", "id": "S1", "start_ts": 2.0, "end_ts": 4.0, "name": "boil"},
            {"type": "step", "id": "S2", "start_ts": 4.0, "end_ts": 6.0, "name": "pour"},
        ],
        "conversations": [
            {
                "user_type": "talk_some",
                "conversation": [
                    {"role": "user", "time": 1.5, "content": "hi"},
                    {"role": "assistant", "time": 2.0, "content": "boil water"},
                ],
            }
        ],
    }


def broken(uid: str, edit) -> dict:
    record = good(uid)
    edit(record)
    return record


BAD = {
    "no-dst": (lambda r: r.pop("dst"), "no 'dst' key"),
    "empty-dst": (lambda r: r.update(dst=[]), "'dst' is empty"),
    "text-time": (
        lambda r: r["conversations"][0]["conversation"][0].update(time="1.5s"),
        "conversations[0] turn 0 time is not a number ('1.5s')",
    ),
    "no-time": (
        lambda r: r["conversations"][0]["conversation"][1].pop("time"),
        "conversations[0] turn 1 time is missing",
    ),
    "text-start": (lambda r: r["dst"][1].update(start_ts=None), "node S2 start_ts is missing"),
    "dup-ids": (lambda r: r["dst"][1].update(id="S1"), "duplicate node id 'S1'"),
    "no-convs": (lambda r: r.pop("conversations"), "'conversations' is missing or not a list"),
    "no-dataset": (lambda r: r["parsed_video_anns"].pop("dataset"), "parsed_video_anns.dataset is missing"),
    "late-start": (
        lambda r: r["parsed_video_anns"].update(video_start_time=30.0),
        "stream start k0=60 (video_start_time 30.0s) is past the last frame (20 frames)",
    ),
}


@pytest.fixture
def inputs(tmp_path: Path):
    frames = tmp_path / "frames"
    records = [good("ok-1")]
    for uid, (edit, _) in BAD.items():
        records.append(broken(uid, edit))
        write_dummy_frames(frames, "epickitchens", uid, 20)
    records += [good("no-frames"), good("corrupt-frames"), "not an object", {"dst": []}, good("ok-2")]
    write_dummy_frames(frames, "epickitchens", "ok-1", 20)
    write_dummy_frames(frames, "epickitchens", "ok-2", 24)
    (frames / "epickitchens" / "frames" / "corrupt-frames.arrow").write_bytes(b"this is not arrow")
    return write_records(tmp_path / "val.json", records), frames, tmp_path / "out" / "labels.parquet"


def invoke(*args):
    return runner.invoke(app, ["labels", *map(str, args)], catch_exceptions=False)


def test_bad_records_are_skipped_and_named(inputs):
    dst_json, frames, out = inputs
    result = invoke("--dst-json", dst_json, "--frames-root", frames, "--out", out)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich may wrap long lines
    for uid, (_, reason) in BAD.items():
        assert f"skip {uid}: {reason}" in text
    assert "skip no-frames: no frames file (looked for" in text
    assert "skip corrupt-frames:" in text and "not a readable Arrow IPC stream" in text
    assert "skip record #12: not a JSON object (str)" in text
    assert "skip record #13: video_uid is missing" in text
    assert "records 15, written 2, skipped 13" in text
    rows = pl.read_parquet(out)
    assert rows.group_by("video_uid").len().sort("video_uid").rows() == [("ok-1", 18), ("ok-2", 22)]
    assert not out.with_name(out.name + ".tmp").exists()


def test_strict_fails_and_writes_nothing(inputs):
    dst_json, frames, out = inputs
    result = invoke("--dst-json", dst_json, "--frames-root", frames, "--out", out, "--strict")
    assert result.exit_code == 1
    assert "--strict: 13 of 15 records unusable; nothing written" in " ".join(result.output.split())
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_strict_passes_on_clean_input(tmp_path):
    write_dummy_frames(tmp_path / "f", "epickitchens", "ok-1", 20)
    dst_json = write_records(tmp_path / "v.json", [good("ok-1")])
    result = invoke(
        "--dst-json", dst_json, "--frames-root", tmp_path / "f", "--out", tmp_path / "l.parquet", "--strict"
    )
    assert result.exit_code == 0 and pl.read_parquet(tmp_path / "l.parquet").height == 18


def test_frames_root_may_be_one_dataset_folder(tmp_path):
    write_dummy_frames(tmp_path / "f", "epickitchens", "ok-1", 20)
    dst_json = write_records(tmp_path / "v.json", [good("ok-1")])
    result = invoke(
        "--dst-json", dst_json, "--frames-root", tmp_path / "f" / "epickitchens", "--out", tmp_path / "l.parquet"
    )
    assert result.exit_code == 0 and pl.read_parquet(tmp_path / "l.parquet").height == 18


def test_clamped_and_dropped_are_counted(tmp_path):
    record = good("long")
    record["conversations"][0]["conversation"] += [
        {"role": "assistant", "time": 30.0, "content": "late"},
        {"role": "assistant", "time": 31.0, "content": "later"},
    ]
    write_dummy_frames(tmp_path / "f", "epickitchens", "long", 12)
    dst_json = write_records(tmp_path / "v.json", [record])
    result = invoke("--dst-json", dst_json, "--frames-root", tmp_path / "f", "--out", tmp_path / "l.parquet")
    text = " ".join(result.output.split())
    # S2 ends at 6.0 -> point 11 = last frame: kept. "late" clamps to frame 11; "later" has no room: dropped.
    assert "turns clamped to the last frame 1" in text and "dropped past the end 1" in text
    assert "DST transitions dropped past the end 0" in text


def test_malformed_json_is_one_clear_message(tmp_path):
    bad = tmp_path / "val.json"
    bad.write_text('[{"video_uid": "a",\n  "dst": [1, 2,]}]')
    cmd = [
        str(Path(sys.executable).with_name("dst")),
        "labels",
        "--dst-json",
        str(bad),
        "--frames-root",
        str(tmp_path),
        "--out",
        str(tmp_path / "l.parquet"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"{bad}: invalid JSON at line 2 column 16 (char 35): Expecting value" in " ".join(proc.stderr.split())


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"video_uid": "a"}', "expected a JSON list of video records, found a JSON dict"),
        (None, "file not found"),
    ],
)
def test_unusable_input_file(tmp_path, content, message):
    path = tmp_path / "val.json"
    if content is not None:
        path.write_text(content)
    result = runner.invoke(
        app, ["labels", "--dst-json", str(path), "--frames-root", str(tmp_path), "--out", str(tmp_path / "l.parquet")]
    )
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_summary_per_dataset_and_all(tmp_path):
    records = [good("a1"), good("a2"), good("b1", dataset="wtag")]
    records[1]["conversations"].append({"user_type": "no_talk", "conversation": []})
    for r in records:
        write_dummy_frames(tmp_path / "f", r["parsed_video_anns"]["dataset"], r["video_uid"], 20)
    dst_json = write_records(tmp_path / "v.json", records)
    result = invoke("--dst-json", dst_json, "--frames-root", tmp_path / "f", "--out", tmp_path / "l.parquet")
    assert result.exit_code == 0
    from pipeline.labels import summary_frame

    # 18 points per conversation; one speak per talking conversation; S1 and S2 give 3 update points, not 4:
    # S2 starts where S1 ends (4.0 s -> point 7), and that point is one update listing both nodes.
    assert summary_frame(tmp_path / "l.parquet").rows() == [
        ("epickitchens", 2, 3, 54, 2 / 54, 9 / 54),
        ("wtag", 1, 1, 18, 1 / 18, 3 / 18),
        ("all", 3, 4, 72, 3 / 72, 12 / 72),
    ]


def test_messages_with_brackets_are_printed_verbatim(tmp_path):
    record = good("[odd]-uid")
    record["dst"][0]["id"] = "S[1]"
    dst_json = write_records(tmp_path / "v.json", [record])
    result = invoke("--dst-json", dst_json, "--frames-root", tmp_path, "--out", tmp_path / "l.parquet")
    assert "skip [odd]-uid: dst[0].id 'S[1]' is not a plain identifier" in result.output
