"""Frame sources: ProAssist arrow files (lazy decode, corrupt rows) and raw videos sampled by timestamp."""

from __future__ import annotations

import base64
import importlib.util
import io
import sys

import av
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from PIL import Image

import pipeline.frame_sources as fs
from pipeline.frame_sources import FrameIndexError, FrameSourceError, open_frames
from pipeline.frames_files import count_frames, synthetic_jpegs, write_frames_file


def _pil(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def _write_strings(path, strings):
    schema = pa.schema([("frame", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(strings, pa.string())], schema=schema))
    return path


def test_arrow_round_trip_decodes_only_requested_rows(tmp_path, monkeypatch):
    jpegs = synthetic_jpegs(12, size=32, seed=1)
    path = tmp_path / "v.arrow"
    write_frames_file(path, jpegs, batch_rows=5)  # several record batches
    calls = []
    decode = fs._decode_jpeg
    monkeypatch.setattr(fs, "_decode_jpeg", lambda s: calls.append(s) or decode(s))
    with open_frames(path) as src:
        assert (src.backend, src.num_frames, src.fps) == ("arrow", count_frames(path), 2.0)
        frames, bad = src.read([5, 0, 11, 5])
    assert frames.dtype == np.uint8 and frames.shape == (4, 32, 32, 3) and bad == []
    for got, k in zip(frames, [5, 0, 11, 5]):
        assert np.array_equal(got, _pil(jpegs[k]))
    assert len(calls) == 3  # distinct rows only, never the whole file


def test_arrow_corrupt_rows_are_reported_and_replaced(tmp_path):
    jpegs = synthetic_jpegs(7, size=32, seed=2)
    strings = [base64.b64encode(b).decode() for b in jpegs]
    strings[0] = "@@ not base64 @@"
    strings[3] = base64.b64encode(jpegs[3][: len(jpegs[3]) // 2]).decode()  # truncated JPEG
    strings[5] = base64.b64encode(b"not a jpeg").decode()
    src = open_frames(_write_strings(tmp_path / "c.arrow", strings))
    assert [p is None for p in src.decode([5, 1, 0])] == [True, False, True]  # decode replaces nothing
    frames, bad = src.read(range(7))
    assert bad == [0, 3, 5]
    for k in (1, 2, 4, 6):
        assert np.array_equal(frames[k], _pil(jpegs[k]))
    assert np.array_equal(frames[0], frames[1])  # nothing earlier: the first decodable frame
    assert np.array_equal(frames[3], frames[2]) and np.array_equal(frames[5], frames[4])
    # Replacements come from the frames asked for only.
    frames, bad = src.read([5, 3, 6])
    assert bad == [3, 5]
    assert np.array_equal(frames[0], _pil(jpegs[6])) and np.array_equal(frames[1], _pil(jpegs[6]))
    with pytest.raises(fs.NoDecodableFrame, match=r"c.arrow: none of the 2 frames asked for \(3 to 5\)"):
        src.read([5, 3])


@pytest.mark.parametrize(
    "decodable, rows",
    [
        ([True, False, False, True, False], [0, 0, 0, 3, 3]),  # the nearest earlier decodable row
        ([False, False, True, False, True], [2, 2, 2, 2, 4]),  # before the first decodable row: that row
        ([True], [0]),
    ],
)
def test_replacement_rows(decodable, rows):
    assert fs.replacement_rows(decodable) == rows


def test_replacement_rows_needs_a_decodable_row():
    with pytest.raises(ValueError, match="no decodable row"):
        fs.replacement_rows([False, False])


def test_arrow_frames_of_different_sizes_take_the_first_size(tmp_path):
    path = tmp_path / "m.arrow"
    write_frames_file(path, synthetic_jpegs(1, size=48) + synthetic_jpegs(1, size=32))
    frames, bad = open_frames(path).read([1, 0])
    assert frames.shape == (2, 32, 32, 3) and bad == []


def test_unusable_files_raise(tmp_path):
    with pytest.raises(FrameSourceError, match="missing.arrow: no such file"):
        open_frames(tmp_path / "missing.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"this is not an arrow stream")
    with pytest.raises(FrameSourceError, match="junk.arrow"):
        open_frames(tmp_path / "junk.arrow")
    write_frames_file(tmp_path / "ok.arrow", synthetic_jpegs(3, size=16))
    with pytest.raises(FrameIndexError, match=r"frame 3 out of range \(file has 3 frames\)"):
        open_frames(tmp_path / "ok.arrow").read([0, 3])
    assert issubclass(FrameIndexError, IndexError) and issubclass(FrameSourceError, ValueError)


# --- raw video: 64x64, 10 fps, 4 s; every source frame its own flat colour, so a wrong pick is visible.
SRC_FPS, SRC_FRAMES = 10, 40


def _colour(i: int) -> tuple[int, int, int]:
    return 16 + 32 * (i % 8), 16 + 48 * (i // 8), 128


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=SRC_FPS)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12"} if codec == "libx264" else {"qscale": "2"}
        for i in range(SRC_FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), _colour(i), np.uint8), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


DECORD = pytest.param(
    "decord", marks=pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord not installed")
)
BACKENDS = [DECORD, "pyav"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fps, n", [(2.0, 8), (3.0, 12)])
def test_video_frames_are_the_pictures_on_screen_at_k_over_fps(mp4, backend, fps, n):
    with open_frames(mp4, fps=fps, backend=backend) as src:
        assert src.backend == backend and src.num_frames == n  # floor(4 s * fps)
        frames, bad = src.read(range(n))
    assert frames.shape == (n, 64, 64, 3) and bad == []
    palette = np.array([_colour(i) for i in range(SRC_FRAMES)], np.float64)
    for k, frame in enumerate(frames):
        want = int(np.floor(k * SRC_FPS / fps + 1e-9))  # last source frame starting at or before k/fps
        err = np.abs(frame.astype(np.float64) - palette[:, None, None, :]).mean(axis=(1, 2, 3))
        assert err[want] < 6 and int(err.argmin()) == want, (k, want, int(err.argmin()), err[want])


def test_backends_agree_and_random_access_matches(mp4):
    pytest.importorskip("decord")
    a, _ = open_frames(mp4, backend="decord").read(range(8))
    src = open_frames(mp4, backend="pyav")
    b, _ = src.read(range(8))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
    c, _ = src.read([7, 0, 3, 3])  # seeks backwards after a full read
    assert np.array_equal(c, b[[7, 0, 3, 3]])
    assert open_frames(mp4).backend == "decord"  # the default prefers decord


def test_pyav_fallback_when_decord_is_missing(mp4, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    src = open_frames(mp4)
    assert src.backend == "pyav" and src.num_frames == 8


@pytest.mark.parametrize("backend", [None, "pyav", DECORD])
def test_undecodable_video_raises(tmp_path, backend):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FrameSourceError, match="noise.mp4"):
        open_frames(path, backend=backend)
