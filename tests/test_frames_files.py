"""Frames file naming per dataset, lookup, and frame counting without decoding."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from conftest import write_dummy_frames

from pipeline.frames_files import (
    FramesFileError,
    count_frames,
    find_frames_file,
    frames_file_name,
    open_frames_stream,
    write_frames_file,
)


@pytest.mark.parametrize(
    "dataset, uid, name",
    [
        (
            "assembly101",
            "assembly_nusar-2021_action_both_9011-c03f_9011_user_id_2021",
            "nusar-2021_action_both_9011-c03f_9011_user_id_2021",
        ),
        (
            "assembly101",
            "disassembly_nusar-2021_action_both_9011-c03f_9011_user_id_2021",
            "nusar-2021_action_both_9011-c03f_9011_user_id_2021",
        ),
        ("ego4d", "grp-0a1b2c3d-aaaa", "0a1b2c3d-aaaa"),
        ("ego4d", "0a1b2c3d-grp-", "0a1b2c3d-grp-"),
        ("epickitchens", "P01_11", "P01_11"),
        ("holoassist", "R007-7July-DSLR", "R007-7July-DSLR"),
    ],
)
def test_frames_file_name(dataset, uid, name):
    assert frames_file_name(dataset, uid) == name


def test_assembly_and_disassembly_share_one_file(tmp_path):
    path = write_dummy_frames(tmp_path, "assembly101", "assembly_X_1", 5)
    assert path == tmp_path / "assembly101" / "frames" / "X_1.arrow"
    assert find_frames_file(tmp_path, "assembly101", "disassembly_X_1") == path


def test_assembly_uid_without_underscore():
    with pytest.raises(FramesFileError, match="has no '_'"):
        frames_file_name("assembly101", "nounderscore")


def test_count_and_read_back(tmp_path):
    path = tmp_path / "a.arrow"
    frames = [bytes([k % 256]) * (k % 7 + 1) for k in range(600)]
    write_frames_file(path, frames, batch_rows=256)  # three record batches
    assert count_frames(path) == 600
    strings = open_frames_stream(path).read_all().column("frame").to_pylist()
    assert len(strings) == 600 and strings[3] == "AwMDAw=="  # base64 of b"\x03" * 4


def test_wrong_column_and_type(tmp_path):
    for name, column in (("col.arrow", pa.array(["x"])), ("type.arrow", pa.array([1]))):
        schema = pa.schema([("image" if name == "col.arrow" else "frame", column.type)])
        with pa.OSFile(str(tmp_path / name), "wb") as sink, ipc.new_stream(sink, schema) as writer:
            writer.write_batch(pa.record_batch([column], schema=schema))
    with pytest.raises(FramesFileError, match="no 'frame' column"):
        count_frames(tmp_path / "col.arrow")
    with pytest.raises(FramesFileError, match="'frame' is int64, not string"):
        count_frames(tmp_path / "type.arrow")


def test_truncated_stream(tmp_path):
    path = tmp_path / "t.arrow"
    write_frames_file(path, [b"x" * 1000] * 50, batch_rows=10)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FramesFileError, match="truncated or corrupt"):
        count_frames(path)
