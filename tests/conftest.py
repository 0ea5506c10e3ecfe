"""Shared test helpers: fixture paths and small frames files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.frames_files import frames_file_candidates, write_frames_file

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLE_JSON = FIXTURES / "dst_record_example.json"
PROASSIST_JSONL = FIXTURES / "proassist_prepared_data.jsonl"


def write_dummy_frames(root: Path, dataset: str, video_uid: str, n_frames: int) -> Path:
    """A frames file of `n_frames` rows in ProAssist's layout. Label tests never decode pictures, so the rows hold
    a few placeholder bytes; tests that decode use `synthetic_jpegs`."""
    path = frames_file_candidates(root, dataset, video_uid)[0]
    write_frames_file(path, [b"frame%d" % k for k in range(n_frames)])
    return path


def write_records(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def example_record() -> dict:
    return json.loads(EXAMPLE_JSON.read_text())[0]
