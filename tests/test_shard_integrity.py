"""Corrupt and old shards: every reader names the shard file; a shard cut at a sample boundary is caught by the
per-shard sample counts in manifest.json; old folders (no counts, old keys) still load, with a warning; keys are
unique by construction."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from test_labels_cli import good
from typer.testing import CliRunner

from cli import app
from pipeline.records import parse_record
from pipeline.shard_index import ShardIndex
from pipeline.shards import (
    MANIFEST,
    SHARD_PATTERN,
    ShardFormatError,
    VideoMeta,
    encode_sample,
    read_shard,
    sample_key,
    write_shard,
)
from pipeline.timeline import video_labels

TOKENS, HIDDEN = 5, 8


def sample(uid: str, n_frames: int = 12, key: str | None = None, seed: int = 0) -> dict:
    labels = video_labels(parse_record(good(uid)), n_frames, 2.0)
    emb = np.random.default_rng(seed).standard_normal((len(labels.points), TOKENS, HIDDEN)).astype(np.float16)
    return encode_sample(
        key or sample_key("epickitchens", uid), emb, VideoMeta.from_labels(labels, "tiny-random", TOKENS)
    )


def write_folder(folder: Path, shards: list[list[dict]], manifest: bool = True) -> Path:
    """Shards as `dst prepare` lays them out, with the manifest's per-shard sample counts."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, samples in enumerate(shards):
        write_shard(folder / SHARD_PATTERN.format(i), samples)
    if manifest:
        counts = {SHARD_PATTERN.format(i): len(s) for i, s in enumerate(shards)}
        (folder / MANIFEST).write_text(json.dumps({"model": "tiny-random", "shard_samples": counts}))
    return folder


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "shards", [[sample("a"), sample("b", seed=1)], [sample("c", seed=2)]])


def boundaries(path: Path) -> list[int]:
    """Byte offsets where each sample (two members) ends in the tar."""
    with tarfile.open(path) as tar:
        ends = [m.offset_data + -(-m.size // 512) * 512 for m in tar]
    return ends[1::2]


def build_error(folder: Path) -> str:
    with pytest.raises(ShardFormatError) as exc:
        ShardIndex.build(folder)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_good_folder_loads_without_warnings(folder):
    index = ShardIndex.build(folder)
    assert len(index) == 3 and index.warnings == () and index.model == "tiny-random"
    assert index.shard_path(sample_key("epickitchens", "c")) == folder / "shard-000001.tar"


def test_zero_byte_shard(folder):
    (folder / "shard-000001.tar").write_bytes(b"")
    assert build_error(folder) == f"{folder / 'shard-000001.tar'}: empty file (0 bytes)"


def test_truncated_inside_a_sample(folder):
    path = folder / "shard-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: boundaries(path)[0] - 700])  # inside the first sample's json
    message = build_error(folder)
    assert message.startswith(f"{path}: ") and "truncated" in message


def test_truncated_exactly_at_a_sample_boundary_is_caught_by_the_counts(folder):
    path = folder / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[: boundaries(path)[0]])  # a valid tar holding only sample "a"
    assert [k for k, _, _ in read_shard(path)] == [sample_key("epickitchens", "a")]  # nothing else can tell
    assert build_error(folder) == (
        f"{path}: holds 1 samples, manifest.json says 2 (truncated or replaced shard: prepare it again)"
    )


def test_a_shard_not_in_the_manifest_is_used_with_a_warning(folder):
    write_shard(folder / "shard-000002.tar", [sample("d", seed=3)])
    index = ShardIndex.build(folder)
    assert len(index) == 4
    assert index.warnings == (
        f"{folder / 'shard-000002.tar'} is not in manifest.json (1 such shard(s)): its "
        "samples are used but cannot be checked",
    )


def test_a_shard_listed_in_the_manifest_but_missing(folder):
    (folder / "shard-000001.tar").unlink()
    assert build_error(folder) == (
        f"{folder / 'shard-000001.tar'} is listed in manifest.json but missing (1 missing shard(s))"
    )


def test_bad_tar_header(folder):
    path = folder / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[1024 + 148] ^= 0x01  # the checksum field of the second member's header
    path.write_bytes(bytes(data))
    message = build_error(folder)
    assert message.startswith(f"{path}: not a readable tar (")


def test_bad_npy_header(folder):
    path = folder / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        emb = next(m for m in tar if m.name.endswith("emb.npy"))
    data[emb.offset_data : emb.offset_data + 6] = b"NOTNPY"
    path.write_bytes(bytes(data))
    key = sample_key("epickitchens", "c")
    assert build_error(folder).startswith(f"{path}: sample {key}: unreadable emb.npy header: ")
    with pytest.raises(ShardFormatError, match=f"^{path}: sample {key}: unreadable emb.npy: "):
        list(read_shard(path))


def test_metadata_that_training_could_not_use(tmp_path):
    broken = sample("a")
    meta = json.loads(broken["json"])
    conv = meta["labels"]["conversations"][0]
    conv["speak"] = conv["speak"][:-1]
    broken["json"] = json.dumps(meta).encode()
    folder = write_folder(tmp_path / "s", [[broken]])
    assert build_error(folder) == (
        f"{folder / 'shard-000000.tar'}: sample {broken['__key__']}: json "
        "labels.conversations[0].speak has 9 entries for 10 points"
    )
    conv["speak"] += [False]
    meta["labels"]["dst_state"][3] = '{"S9": "done"}'
    broken["json"] = json.dumps(meta).encode()
    write_folder(folder, [[broken]])
    assert build_error(folder).endswith("json labels.dst_state entry is not an object of known node ids and states")


def test_a_folder_without_its_manifest_loads_with_a_warning(tmp_path):
    """Shards copied without manifest.json: keys are opaque strings; the counts cannot be checked."""
    folder = write_folder(tmp_path / "copy", [[sample("a"), sample("b.c", key="epickitchens__b_c")]], manifest=False)
    index = ShardIndex.build(folder)
    assert index.video_ids == [sample_key("epickitchens", "a"), "epickitchens__b_c"]
    assert index.warnings == (f"{folder} has no manifest.json: cannot check that every shard holds all its samples",)
    (folder / MANIFEST).write_text(json.dumps({"model": "tiny-random", "shards": ["shard-000000.tar"]}))
    with pytest.raises(ShardFormatError, match="'shard_samples' is missing or not an object of counts"):
        ShardIndex.build(folder)


def test_sample_keys_are_unique_by_construction():
    uids = ["a.b", "a_b", "a b", "café", "cafè", "caf_", "x" * 300, "x" * 300 + "y"]
    keys = [sample_key("wtag", u) for u in uids]
    assert len(set(keys)) == len(uids)
    assert all("." not in k and len(k) <= 93 for k in keys)
    assert sample_key("wtag", "a.b") == "wtag__a_b-" + sample_key("wtag", "a.b")[-12:]
    assert sample_key("wtag", "a.b") == sample_key("wtag", "a.b")  # stable: no per-process salt
    assert sample_key("wtag", "a") != sample_key("ego4d", "a")


def test_train_names_the_corrupt_shard_and_exits_2(folder, tmp_path):
    path = folder / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[: boundaries(path)[0]])
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--shards",
            str(folder),
            "--model",
            "tiny-random",
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
        ],
    )
    assert result.exit_code == 2
    assert " ".join(result.output.split()) == (
        f"error: {path}: holds 1 samples, manifest.json says 2 (truncated or replaced shard: prepare it again)"
    )
    assert not (tmp_path / "run").exists()


def test_a_shard_shrunk_after_indexing_is_named_on_read(folder):
    index = ShardIndex.build(folder)
    key = sample_key("epickitchens", "c")
    path = folder / "shard-000001.tar"
    shutil.copy(path, path.with_suffix(".bak"))
    path.write_bytes(path.read_bytes()[:1024])
    index._maps.clear()
    with pytest.raises(ShardFormatError, match=f"^{path}: sample {key}: emb.npy cut short"):
        index.rows(key, 0, index.num_rows(key))
