"""Fuzzing the two readers of outside data: the record parser (and the label rules behind it) and the shard reader.

Every input gives a result or a one-line error of the expected type naming the culprit; any other exception fails.
Deterministic (derandomize) and a few seconds in all.
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_labels_cli import good
from test_shard_integrity import boundaries, sample, write_folder

from pipeline.frames_files import FramesFileError, frames_file_candidates
from pipeline.labels import label_columns
from pipeline.records import InputFileError, RecordError, load_record_list, parse_record
from pipeline.shard_index import ShardIndex
from pipeline.shards import ShardFormatError, VideoMeta, read_shard, sample_key
from pipeline.timeline import video_labels

FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

odd_numbers = st.sampled_from(
    [
        1e308,
        -1e308,
        float("inf"),
        float("-inf"),
        float("nan"),
        -0.0,
        5e-324,
        -1e-9,
        10**400,
        -(10**400),
        2**63,
        86400.0,
        86400.0001,
        0.49999999999,
        1e-300,
    ]
)
numbers = st.integers() | st.floats() | odd_numbers
# Text includes lone surrogates (valid JSON escapes) and control characters.
texts = (
    st.text(st.characters(exclude_categories=()), max_size=12)
    | st.text(st.characters(categories=["Cs", "Cc"]), min_size=1, max_size=3)
    | st.sampled_from(["..", "/", "../x", "a\x00b", "", "\ud800"])
)
leaves = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=10
)


def one_line(exc: Exception) -> str:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, repr(text)
    return text


def exercise(raw) -> None:
    """Everything a record goes through: parsing, names, labels and their serialisation."""
    try:
        record = parse_record(raw, 3)
    except RecordError as exc:
        one_line(exc)
        assert exc.video_uid == "record #3" or exc.video_uid.strip()
        return
    key = sample_key(record.dataset, record.video_uid)
    assert "." not in key and "/" not in key
    try:
        paths = frames_file_candidates("/root", record.dataset, record.video_uid)
        assert all(p.parts[:2] == ("/", "root") and ".." not in p.parts for p in paths)
    except FramesFileError as exc:
        one_line(exc)
    for n_frames in (1, 25):
        try:
            labels = video_labels(record, n_frames, 2.0)
        except RecordError as exc:
            one_line(exc)
            continue
        cols = label_columns(labels)
        json.dumps(VideoMeta.from_labels(labels, "m", 5).to_json(), ensure_ascii=False).encode("utf-8")
        assert len(cols["frame"]) == len(labels.points) * len(record.conversations)


def paths_of(value, prefix=()):
    """Every path into a JSON value (keys and list positions)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths_of(v, prefix + (i,))


GOOD = good("fuzz")
GOOD_PATHS = [p for p in paths_of(GOOD) if p]


def replaced(path: tuple, value):
    record = copy.deepcopy(GOOD)
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return record


@FUZZ
@given(json_values)
def test_any_json_value_as_a_record(value):
    exercise(value)


@FUZZ
@given(st.sampled_from(GOOD_PATHS), texts | leaves | json_values)
def test_any_field_replaced_by_random_json(path, value):
    exercise(replaced(path, value))


TIME_PATHS = [p for p in GOOD_PATHS if p[-1] in ("time", "start_ts", "end_ts", "video_start_time", "duration")]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TIME_PATHS), numbers), min_size=1, max_size=4))
def test_huge_and_odd_numbers_in_every_time_field(edits):
    record = copy.deepcopy(GOOD)
    for path, value in edits:
        record = replaced(path, value) if record is GOOD else _set(record, path, value)
    exercise(record)


def _set(record, path, value):
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return record


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
    | st.integers(1, 120_000).map(lambda n: "[" * n + "]" * n)
    | json_values.map(lambda v: json.dumps(v, allow_nan=True))
)
def test_any_file_text(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "in.json"
        path.write_text(text, encoding="utf-8")
        try:
            records = load_record_list(path)
        except InputFileError as exc:
            assert one_line(exc).startswith(str(path))
            return
        for raw in records[:5]:
            exercise(raw)


# ---------------------------------------------------------------------------------------------- shard reader

SHARDS = tempfile.mkdtemp(prefix="fuzz-shards-")
GOOD_FOLDER = write_folder(Path(SHARDS) / "good", [[sample("a"), sample("b", seed=1)]])
GOOD_BYTES = (GOOD_FOLDER / "shard-000000.tar").read_bytes()
DATA_END = boundaries(GOOD_FOLDER / "shard-000000.tar")[-1]  # after it: only the tar's zero padding


def check_folder(folder: Path, shard: Path) -> None:
    """Build the index and read everything, or fail with ShardFormatError naming the shard file."""
    try:
        index = ShardIndex.build(folder)
        for key in index.video_ids:
            index.meta(key)
            index.rows(key, 0, index.num_rows(key))
    except ShardFormatError as exc:
        assert one_line(exc).startswith(str(shard)) or one_line(exc).startswith("samples "), str(exc)
    try:
        list(read_shard(shard))
    except ShardFormatError as exc:
        assert one_line(exc).startswith(str(shard)), str(exc)


def write_case(data: bytes, name: str) -> tuple[Path, Path]:
    folder = Path(SHARDS) / name
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_bytes((GOOD_FOLDER / "manifest.json").read_bytes())
    shard = folder / "shard-000000.tar"
    shard.write_bytes(data)
    return folder, shard


@FUZZ
@given(st.integers(0, len(GOOD_BYTES)))
def test_random_truncation(length):
    folder, shard = write_case(GOOD_BYTES[:length], "truncated")
    check_folder(folder, shard)
    if length < DATA_END:  # a cut that loses data is always caught
        try:
            ShardIndex.build(folder)
            raise AssertionError(f"a shard cut at {length} of {len(GOOD_BYTES)} bytes was accepted")
        except ShardFormatError:
            pass


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD_BYTES) - 1), st.integers(0, 7)), min_size=1, max_size=6))
def test_bit_flips(flips):
    data = bytearray(GOOD_BYTES)
    for position, bit in flips:
        data[position] ^= 1 << bit
    check_folder(*write_case(bytes(data), "flipped"))


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


npy_like = st.binary(max_size=200) | st.binary(max_size=120).map(lambda b: b"\x93NUMPY\x01\x00" + b)
json_like = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["k1", "k2", "k.x"]), st.sampled_from(["emb.npy", "json", "txt"]), npy_like | json_like
        ),
        min_size=1,
        max_size=4,
    )
)
def test_random_bytes_in_a_valid_tar(members):
    data = tar_of([(f"{key}.{suffix}", payload) for key, suffix, payload in members])
    folder, shard = write_case(data, "random")
    (folder / "manifest.json").unlink()
    check_folder(folder, shard)


GOOD_SAMPLE = sample("m")
GOOD_META = json.loads(GOOD_SAMPLE["json"])
META_PATHS = [p for p in paths_of(GOOD_META) if p]


@settings(FUZZ, max_examples=80)
@given(st.sampled_from(META_PATHS), texts | leaves | json_values)
def test_any_meta_field_replaced_by_random_json(path, value):
    """A valid tar and array with metadata that is wrong in one field: refused when the index is built, or usable
    by everything training reads (windows and sequences)."""
    from pipeline.smolvlm import build_tiny_tokenizer
    from train.sequence import SequenceFormat, build_window
    from train.windows import cut_windows

    meta = copy.deepcopy(GOOD_META)
    _set(meta, path, value)
    data = tar_of(
        [
            (f"{GOOD_SAMPLE['__key__']}.emb.npy", GOOD_SAMPLE["emb.npy"]),
            (f"{GOOD_SAMPLE['__key__']}.json", json.dumps(meta, allow_nan=True).encode()),
        ]
    )
    folder, shard = write_case(data, "meta")
    try:
        index = ShardIndex.build(folder)
    except ShardFormatError as exc:
        assert one_line(exc).startswith(str(shard)), str(exc)
        return
    global FORMAT
    FORMAT = FORMAT or SequenceFormat(build_tiny_tokenizer(), index.tokens_per_frame)
    for key in index.video_ids:
        for w in cut_windows(FORMAT, index.meta(key), key, 400):
            build_window(FORMAT, index.meta(key), w.conversation, w.start, w.end)


FORMAT = None
