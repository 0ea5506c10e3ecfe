"""`dst synth-frames` only ever writes inside --out, whatever the records say; nonsense options are exit 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import write_records
from test_labels_cli import good
from typer.testing import CliRunner

from cli import app
from pipeline.frames_files import (
    FramesFileError,
    count_frames,
    find_frames_file,
    find_video_file,
)

runner = CliRunner()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_values_that_are_paths_never_leave_the_output_folder(tmp_path):
    work = tmp_path / "work"
    out = work / "out"
    records = [good("ok")]
    for uid in ("../../escaped", "/tmp/absolute", "a/b", "..", "nul\x00byte"):
        records.append(good(uid))
    bad_dataset = good("fine-uid")
    bad_dataset["parsed_video_anns"]["dataset"] = "../../escaped-dataset"
    records.append(bad_dataset)
    dst_json = write_records(tmp_path / "v.json", records)
    result = runner.invoke(app, ["synth-frames", "--dst-json", str(dst_json), "--out", str(out), "--size", "16"])
    assert result.exit_code == 0, result.output
    assert files_under(tmp_path) == ["v.json", "work/out/epickitchens/frames/ok.arrow"]
    text = " ".join(result.output.split())
    assert (
        "skip ../../escaped: video_uid '../../escaped' contains '/' (a path separator); it is used as a file name"
        in text
    )
    assert "skip /tmp/absolute: video_uid '/tmp/absolute' contains '/'" in text
    assert "skip 'nul\\x00byte': video_uid 'nul\\x00byte' contains control characters" in text
    assert "skip fine-uid: parsed_video_anns.dataset '../../escaped-dataset' contains '/'" in text
    assert count_frames(out / "epickitchens" / "frames" / "ok.arrow") == 20  # (1.0 + 9.0) s at 2 fps


def test_lookups_never_read_outside_the_root(tmp_path):
    """Readers build the same paths: a value with a separator is refused before any file system access."""
    (tmp_path / "secret" / "frames").mkdir(parents=True)
    (tmp_path / "secret" / "frames" / "x.arrow").write_bytes(b"not yours")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(FramesFileError, match=r"'\.\./secret' contains '/' \(a path separator\)"):
        find_frames_file(root, "../secret", "x")
    with pytest.raises(FramesFileError, match="is '..', not a file name"):
        find_frames_file(root, "wtag", "..")
    with pytest.raises(FramesFileError, match="contains '/'"):
        find_video_file(root, "wtag", "../../etc/passwd")


def test_a_record_too_long_to_synthesise_is_skipped(tmp_path):
    long = good("long")
    long["parsed_video_anns"]["duration"] = 86_000.0
    dst_json = write_records(tmp_path / "v.json", [long, good("ok")])
    result = runner.invoke(
        app, ["synth-frames", "--dst-json", str(dst_json), "--out", str(tmp_path / "o"), "--size", "16"]
    )
    assert result.exit_code == 0
    assert "skip long: its video needs 172002 frames at 2 fps (start 1 s + 86000 s); at most 100000" in " ".join(
        result.output.split()
    )
    assert files_under(tmp_path / "o") == ["epickitchens/frames/ok.arrow"]


def test_nothing_written_is_exit_1(tmp_path):
    dst_json = write_records(tmp_path / "v.json", [good("../x")])
    result = runner.invoke(app, ["synth-frames", "--dst-json", str(dst_json), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert f"error: no frames file written: {dst_json} has no usable record (see the skip lines above)" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--fps", "0", "fps must be > 0, got 0.0"),
        ("--fps", "nan", "fps must be a finite number, got nan"),
        ("--fps", "-1", "fps must be > 0, got -1.0"),
        ("--size", "0", "size must be >= 8, got 0"),
        ("--size", "100000", "size must be <= 1024, got 100000"),
    ],
)
def test_nonsense_options_are_exit_2(tmp_path, option, value, message):
    dst_json = write_records(tmp_path / "v.json", [good("ok")])
    result = runner.invoke(
        app, ["synth-frames", "--dst-json", str(dst_json), "--out", str(tmp_path / "o"), option, value]
    )
    assert result.exit_code == 2 and " ".join(result.output.split()) == f"error: {message}"
    assert not os.path.exists(tmp_path / "o")
