"""Records built to break `dst labels`: numbers out of range, pathological JSON, names that are paths, duplicated
uids, and inputs where nothing is usable. Each gives one line naming the record and a clear exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import write_dummy_frames, write_records
from test_labels_cli import good
from typer.testing import CliRunner

from cli import app
from pipeline.records import InputFileError, RecordError, load_record_list, parse_record

runner = CliRunner()
DST = str(Path(sys.executable).with_name("dst"))


def text_of(result) -> str:
    return " ".join(result.output.split())  # rich may wrap long lines


def edited(path: tuple, value) -> dict:
    record = good("v")
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return record


TURN = ("conversations", 0, "conversation", 1, "time")
OUT_OF_RANGE = [
    (TURN, 1e308, "conversations[0] turn 1 time is 1e+308, outside [0, 86400] seconds"),
    (TURN, float("inf"), "conversations[0] turn 1 time is not finite (inf)"),
    (TURN, float("nan"), "conversations[0] turn 1 time is not finite (nan)"),
    (TURN, -0.5, "conversations[0] turn 1 time is -0.5, outside [0, 86400] seconds"),
    (
        TURN,
        10**400,
        "conversations[0] turn 1 time is not finite (1000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000...)",
    ),
    (TURN, True, "conversations[0] turn 1 time is not a number (True)"),
    (
        ("parsed_video_anns", "video_start_time"),
        -1.0,
        "parsed_video_anns.video_start_time is -1.0, outside [0, 86400] seconds",
    ),
    (
        ("parsed_video_anns", "video_start_time"),
        1e308,
        "parsed_video_anns.video_start_time is 1e+308, outside [0, 86400] seconds",
    ),
    (("parsed_video_anns", "duration"), -3.0, "parsed_video_anns.duration is -3.0, outside [0, 86400] seconds"),
    (
        ("parsed_video_anns", "duration"),
        1e12,
        "parsed_video_anns.duration is 1000000000000.0, outside [0, 86400] seconds",
    ),
    (("parsed_video_anns", "duration"), 0, "parsed_video_anns.duration is 0"),
    (("dst", 0, "start_ts"), float("-inf"), "node S1 start_ts is not finite (-inf)"),
    (("dst", 1, "end_ts"), 86400.5, "node S2 end_ts is 86400.5, outside [0, 86400] seconds"),
    (("dst", 1, "end_ts"), [1.0], "node S2 end_ts is not a number (a list of 1 items)"),
]


@pytest.mark.parametrize("path, value, reason", OUT_OF_RANGE, ids=[r[:40] for _, _, r in OUT_OF_RANGE])
def test_numbers_out_of_range_are_reasons(path, value, reason):
    with pytest.raises(RecordError) as exc:
        parse_record(edited(path, value))
    assert exc.value.reason == reason and exc.value.video_uid == "v"


def test_the_bounds_themselves_are_accepted():
    record = edited(("parsed_video_anns", "video_start_time"), 0)
    record["parsed_video_anns"]["duration"] = 86400
    record["dst"][1]["end_ts"] = 86400.0
    parsed = parse_record(record)
    assert (parsed.video_start_time, parsed.duration, parsed.nodes[1].end_ts) == (0.0, 86400.0, 86400.0)


UNSAFE_NAMES = [
    ("video_uid", "../../x", "video_uid '../../x' contains '/' (a path separator); it is used as a file name"),
    ("video_uid", "/etc/passwd", "video_uid '/etc/passwd' contains '/' (a path separator); it is used as a file name"),
    ("video_uid", "..", "video_uid '..' is '..', not a file name; it is used as a file name"),
    ("video_uid", "a\\b", "video_uid 'a\\\\b' contains '\\\\' (a path separator); it is used as a file name"),
    (
        "video_uid",
        "a\x00b",
        "video_uid 'a\\x00b' contains control characters or invalid Unicode; it is used as a file name",
    ),
    ("video_uid", "x" * 201, "video_uid '" + "x" * 76 + "... is longer than 200 bytes; it is used as a file name"),
    (
        "dataset",
        "../up",
        "parsed_video_anns.dataset '../up' contains '/' (a path separator); it is used as a file name",
    ),
]


@pytest.mark.parametrize("field, value, reason", UNSAFE_NAMES)
def test_names_that_are_paths_are_refused(field, value, reason):
    record = good("v")
    if field == "dataset":
        record["parsed_video_anns"]["dataset"] = value
    else:
        record["video_uid"] = value
    with pytest.raises(RecordError) as exc:
        parse_record(record)
    assert exc.value.reason == reason
    assert "\n" not in str(exc.value) and "\x00" not in str(exc.value)


def test_lone_surrogate_text_is_a_reason_not_a_crash():
    record = json.loads('{"x": "\\ud800"}')["x"]
    with pytest.raises(RecordError, match=r"conversations\[0\] turn 0 content is not valid Unicode"):
        parse_record(edited(("conversations", 0, "conversation", 0, "content"), record))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply to parse"),
        (
            '[{"time": ' + "9" * 5000 + "}]",
            "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion",
        ),
        ("[1, 2", "invalid JSON at line 1 column 6 (char 5): Expecting ',' delimiter"),
    ],
)
def test_pathological_json_is_one_message(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputFileError) as exc:
        load_record_list(path)
    assert str(exc.value).startswith(f"{path}: {message}") and "\n" not in str(exc.value)


def test_deeply_nested_json_through_the_command(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    proc = subprocess.run(
        [DST, "labels", "--dst-json", str(path), "--frames-root", str(tmp_path), "--out", str(tmp_path / "l.parquet")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert " ".join(proc.stderr.split()) == f"error: {path}: invalid JSON: nested too deeply to parse"


def test_records_out_of_range_are_skipped_and_the_rest_written(tmp_path):
    records = [good("ok"), edited(TURN, 1e308), edited(("parsed_video_anns", "video_start_time"), -1.0)]
    records[1]["video_uid"], records[2]["video_uid"] = "huge-time", "negative-start"
    for uid in ("ok", "huge-time", "negative-start"):
        write_dummy_frames(tmp_path / "f", "epickitchens", uid, 20)
    result = runner.invoke(
        app,
        [
            "labels",
            "--dst-json",
            str(write_records(tmp_path / "v.json", records)),
            "--frames-root",
            str(tmp_path / "f"),
            "--out",
            str(tmp_path / "l.parquet"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "skip huge-time: conversations[0] turn 1 time is 1e+308, outside [0, 86400] seconds" in text_of(result)
    assert "skip negative-start: parsed_video_anns.video_start_time is -1.0" in text_of(result)
    assert pl.read_parquet(tmp_path / "l.parquet")["video_uid"].unique().to_list() == ["ok"]


def test_duplicate_video_uid_keeps_the_first_and_names_it(tmp_path):
    first, copy, other = good("dup"), good("dup"), good("dup")
    other["inferred_goal"] = "something else"
    same_uid_other_dataset = good("dup", dataset="wtag")
    records = [first, copy, other, same_uid_other_dataset]
    write_dummy_frames(tmp_path / "f", "epickitchens", "dup", 20)
    write_dummy_frames(tmp_path / "f", "wtag", "dup", 16)
    result = runner.invoke(
        app,
        [
            "labels",
            "--dst-json",
            str(write_records(tmp_path / "v.json", records)),
            "--frames-root",
            str(tmp_path / "f"),
            "--out",
            str(tmp_path / "l.parquet"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "skip dup: duplicate video_uid in dataset epickitchens: record #0 has it too and is used (an exact copy)"
        in text_of(result)
    )
    assert "record #0 has it too and is used (different content)" in text_of(result)
    rows = pl.read_parquet(tmp_path / "l.parquet")
    assert rows.group_by("dataset").len().sort("dataset").rows() == [("epickitchens", 18), ("wtag", 14)]
    assert set(rows["conversation"]) == {0}


def test_every_record_skipped_exits_1_with_the_layout(tmp_path):
    """The classic mistake: --frames-root points at the wrong folder. Nothing is written, an old output survives."""
    (tmp_path / "f" / "epickitchens").mkdir(parents=True)
    out = tmp_path / "l.parquet"
    out.write_bytes(b"an earlier good output")
    dst_json = write_records(tmp_path / "v.json", [good("a"), good("b")])
    result = runner.invoke(
        app, ["labels", "--dst-json", str(dst_json), "--frames-root", str(tmp_path / "wrong"), "--out", str(out)]
    )
    assert result.exit_code == 1
    assert (
        f"error: no usable record: all 2 were skipped (the first, a: no frames file (looked for "
        f"{tmp_path}/wrong/epickitchens/frames/a.arrow, {tmp_path}/wrong/frames/a.arrow)); frames files are "
        f"expected at {tmp_path}/wrong/{{dataset}}/frames/{{name}}.arrow (--frames-root is ProAssist's "
        "processed_data folder, or one dataset's folder); nothing written"
    ) in text_of(result)
    assert out.read_bytes() == b"an earlier good output" and not list(tmp_path.glob("*.tmp"))


def test_no_records_exits_1(tmp_path):
    result = runner.invoke(
        app,
        [
            "labels",
            "--dst-json",
            str(write_records(tmp_path / "v.json", [])),
            "--frames-root",
            str(tmp_path),
            "--out",
            str(tmp_path / "l.parquet"),
        ],
    )
    assert result.exit_code == 1 and "error: the input holds no records; nothing written" in text_of(result)


@pytest.mark.parametrize(
    "fps, message",
    [
        ("0", "fps must be > 0, got 0.0"),
        ("-2", "fps must be > 0, got -2.0"),
        ("nan", "fps must be a finite number, got nan"),
        ("1e308", "fps must be <= 1000, got 1e+308"),
    ],
)
def test_nonsense_fps_on_labels_is_exit_2(tmp_path, fps, message):
    result = runner.invoke(
        app,
        [
            "labels",
            "--dst-json",
            str(write_records(tmp_path / "v.json", [good("a")])),
            "--frames-root",
            str(tmp_path),
            "--out",
            str(tmp_path / "l.parquet"),
            "--fps",
            fps,
        ],
    )
    assert result.exit_code == 2 and text_of(result) == f"error: {message}"
