"""RGB frames of one video as uint8 arrays, from a ProAssist frames file (`.arrow`) or a raw video
(docs/design.md §2-3).

    with open_frames(path, fps=2.0) as src:        # src.backend: "arrow", "decord" or "pyav"
        frames, bad = src.read(range(src.num_frames))   # uint8 [n, H, W, 3], indices that could not be decoded

Frame `k` shows time `[k/fps, (k+1)/fps)`. An arrow file already holds one row per frame (at the dataset fps, 2), so
row `k` is frame `k` and `fps` is only recorded. A raw video is sampled by timestamp: frame `k` is the source frame
on screen at time `k/fps` (the last one whose start time is <= k/fps, times counted from the first frame), and
`num_frames = floor(duration * fps)`, duration = end of the last source frame.

A picture that cannot be decoded never aborts the video. `decode` returns None for it; `read` replaces it by the
nearest earlier decodable frame among those requested, or, for frames before the first decodable one, by that first
decodable frame (`replacement_rows`), and reports its index in `bad`; when none decodes, it raises
NoDecodableFrame. `dst prepare` applies the same rule to a video's whole stream (see pipeline/frame_feeder.py).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.frames_files import FRAME_COLUMN, FramesFileError, open_frames_stream

log = logging.getLogger(__name__)

DEFAULT_SIZE = (384, 384)  # ProAssist frame size; the shape of an empty arrow read
_TS_EPS = 1e-6  # float slack when comparing timestamps (k/fps vs pts * time_base)


class FrameSourceError(ValueError):
    """A whole file that cannot be opened (missing, not a video, not an Arrow stream); names the file and reason."""


class NoDecodableFrame(FrameSourceError):
    """None of the frames asked for (a read, or a video's whole stream) could be decoded."""


class FrameIndexError(IndexError):
    """A frame index outside [0, num_frames); callers clamp first."""


def replacement_rows(decodable: Sequence[bool]) -> list[int]:
    """For rows in time order, the row whose picture each one shows: itself when decodable, else the nearest earlier
    decodable row, else (rows before the first decodable one) the first decodable row: a stream never starts on an
    invented picture, and looks ahead only as far as its first good frame. ValueError when no row is decodable."""
    decodable = [bool(ok) for ok in decodable]
    if not any(decodable):
        raise ValueError("no decodable row to take a picture from")
    last = decodable.index(True)
    out = []
    for i, ok in enumerate(decodable):
        if ok:
            last = i
        out.append(last)
    return out


class FrameSource(ABC):
    """Base class. Attributes: `path`, `fps`, `num_frames`, `backend`. Subclasses implement `_decode`."""

    backend = ""

    def __init__(self, path: Path, fps: float, num_frames: int):
        self.path, self.fps, self.num_frames = path, fps, num_frames

    def decode(self, indices: Iterable[int]) -> list[np.ndarray | None]:
        """The pictures at `indices` (in that order, repeats allowed) as uint8 [H, W, 3]; None where one cannot be
        decoded. Each distinct frame is decoded once."""
        idx = self._checked(indices)
        uniq = sorted(set(idx))
        pics = dict(zip(uniq, self._decode(uniq)))
        return [pics[i] for i in idx]

    def read(self, indices: Iterable[int]) -> tuple[np.ndarray, list[int]]:
        """Frames at `indices` (any order, repeats allowed) as uint8 [n, H, W, 3], plus the sorted distinct indices
        whose picture could not be decoded (replaced, see module doc). Frames of different sizes (possible only in
        odd arrow files) are resized (PIL bilinear) to the size of the first requested frame."""
        idx = self._checked(indices)
        if not idx:
            return np.zeros((0, *self._fallback_size(), 3), np.uint8), []
        uniq = sorted(set(idx))
        pics = self._decode(uniq)
        bad = [i for i, p in zip(uniq, pics) if p is None]
        if len(bad) == len(uniq):
            raise NoDecodableFrame(
                f"{self.path}: none of the {len(uniq)} frames asked for ({uniq[0]} to {uniq[-1]}) could be decoded"
            )
        source = replacement_rows([p is not None for p in pics])
        by_index = {i: pics[source[j]] for j, i in enumerate(uniq)}
        out = [by_index[i] for i in idx]
        h, w = out[0].shape[:2]
        out = [
            p if p.shape[:2] == (h, w) else np.asarray(Image.fromarray(p).resize((w, h), Image.BILINEAR)) for p in out
        ]
        return np.stack(out), bad

    def _checked(self, indices: Iterable[int]) -> list[int]:
        idx = [int(i) for i in indices]
        for i in idx:
            if not 0 <= i < self.num_frames:
                raise FrameIndexError(f"{self.path}: frame {i} out of range (file has {self.num_frames} frames)")
        return idx

    @abstractmethod
    def _decode(self, indices: list[int]) -> list[np.ndarray | None]:
        """RGB uint8 [H, W, 3] per index, None where the picture cannot be decoded."""

    def _fallback_size(self) -> tuple[int, int]:
        return DEFAULT_SIZE

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release; those that do override it
        pass

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArrowFrames(FrameSource):
    """ProAssist frames file. The Arrow table stays memory-mapped; only requested rows are base64/JPEG-decoded."""

    backend = "arrow"

    def __init__(self, path: Path, fps: float):
        try:
            self._column = open_frames_stream(path).read_all().column(FRAME_COLUMN)
        except FramesFileError as exc:
            raise FrameSourceError(str(exc)) from None
        except (pa.ArrowInvalid, OSError) as exc:
            raise FrameSourceError(f"{path}: truncated or corrupt Arrow stream ({exc})") from None
        super().__init__(path, fps, len(self._column))

    def _decode(self, indices: list[int]) -> list[np.ndarray | None]:
        return [_decode_jpeg(s) for s in self._column.take(pa.array(indices, pa.int64())).to_pylist()]


def _decode_jpeg(text: str | None) -> np.ndarray | None:
    if text is None:
        return None
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as image:
            return np.asarray(image.convert("RGB"))  # convert() loads: a truncated JPEG raises OSError here
    except (binascii.Error, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


class _VideoFrames(FrameSource):
    """Timestamp sampling shared by the video backends: `_src[k]` is the source frame shown as frame `k`."""

    def _setup(self, path: Path, fps: float, starts: np.ndarray, end: float, size: tuple[int, int]) -> None:
        if not fps > 0:
            raise FrameSourceError(f"{path}: fps must be positive, got {fps}")
        if len(starts) == 0:
            raise FrameSourceError(f"{path}: video stream has no frames")
        if not np.all(np.diff(starts) > 0):
            raise FrameSourceError(f"{path}: source frame timestamps are not increasing")
        base = starts[0]
        n = math.floor((end - base) * fps + _TS_EPS)
        times = np.arange(n) / fps + base + _TS_EPS
        self._src = np.maximum(np.searchsorted(starts, times, side="right") - 1, 0)
        self._size = size
        super().__init__(path, fps, n)

    def _fallback_size(self) -> tuple[int, int]:
        return self._size

    def _decode(self, indices: list[int]) -> list[np.ndarray | None]:
        got = self._decode_src(sorted({int(self._src[k]) for k in indices}))
        return [got.get(int(self._src[k])) for k in indices]

    @abstractmethod
    def _decode_src(self, srcs: list[int]) -> dict[int, np.ndarray]:
        """Pictures of the source frames `srcs` (indices into the video), by index; missing where undecodable."""


class _DecordFailed(Exception):
    """decord could not open or decode the file (open_frames then falls back to PyAV)."""


class DecordFrames(_VideoFrames):
    backend = "decord"

    def __init__(self, path: Path, fps: float):
        import decord

        self._errors = (decord.DECORDError, RuntimeError)
        try:  # decord reports a file it cannot open as RuntimeError, a frame it cannot decode as DECORDError
            self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
            ts = self._vr.get_frame_timestamp(np.arange(len(self._vr)))  # [n, 2]: start, end seconds
            probe = self._vr[0].asnumpy()  # decord opens some files it cannot decode: fail here, not mid-run
        except (RuntimeError, IndexError, decord.DECORDError) as exc:
            first_line = str(exc).strip().split("\n", 1)[0][:200]  # decord appends a long C++ backtrace
            raise _DecordFailed(f"decord failed ({type(exc).__name__}: {first_line})") from exc
        self._setup(path, fps, ts[:, 0], float(ts[-1, 1]), probe.shape[:2])

    def _decode_src(self, srcs: list[int]) -> dict[int, np.ndarray]:
        try:
            return dict(zip(srcs, self._vr.get_batch(srcs).asnumpy()))
        except self._errors:
            got = {}  # one bad frame fails the whole batch: retry one by one, missing ones are reported as bad
            for s in srcs:
                try:
                    got[s] = self._vr[s].asnumpy()
                except self._errors as exc:
                    log.warning("%s: decord cannot decode source frame %d (%s)", self.path, s, exc)
            return got


class PyAVFrames(_VideoFrames):
    backend = "pyav"

    def __init__(self, path: Path, fps: float):
        import av

        self._av = av
        try:
            self._container = av.open(str(path))
        except av.FFmpegError as exc:
            raise FrameSourceError(f"{path}: not a decodable video ({exc})") from None
        try:
            self._probe(path, fps)
        except av.FFmpegError as exc:
            self._container.close()
            raise FrameSourceError(f"{path}: cannot read video packets ({exc})") from None
        except FrameSourceError:
            self._container.close()
            raise

    def _probe(self, path: Path, fps: float) -> None:
        if not self._container.streams.video:
            raise FrameSourceError(f"{path}: no video stream")
        self._stream = stream = self._container.streams.video[0]
        # Packet scan (no decoding) gives every frame's pts; presentation order = sorted pts.
        packets = sorted((p.pts, p.duration) for p in self._container.demux(stream) if p.pts is not None)
        if not packets:
            raise FrameSourceError(f"{path}: video stream has no timestamped frames")
        self._pts = [p for p, _ in packets]
        tb = float(stream.time_base)
        last_pts, last_dur = packets[-1]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        last_len = last_dur * tb if last_dur else (1.0 / rate if rate else 0.0)
        starts = np.array(self._pts, dtype=np.float64) * tb
        self._setup(path, fps, starts, last_pts * tb + last_len, (stream.height, stream.width))

    def _decode_src(self, srcs: list[int]) -> dict[int, np.ndarray]:
        wanted = {self._pts[s]: s for s in srcs}
        last = max(wanted)
        got: dict[int, np.ndarray] = {}
        # Seek to the keyframe at or before the first wanted frame, then decode forward (output is in pts order).
        self._container.seek(self._pts[srcs[0]], stream=self._stream, backward=True, any_frame=False)
        for packet in self._container.demux(self._stream):
            try:
                frames = packet.decode()
            except self._av.FFmpegError as exc:
                log.warning("%s: pyav cannot decode a packet at pts %s (%s)", self.path, packet.pts, exc)
                continue  # the frames of this packet stay missing and are reported as bad
            for frame in frames:
                if frame.pts in wanted:
                    got[wanted[frame.pts]] = frame.to_ndarray(format="rgb24")
                if frame.pts is not None and frame.pts >= last:
                    return got
        return got

    def close(self) -> None:
        self._container.close()


def open_frames(path: str | Path, fps: float = 2.0, backend: str | None = None) -> FrameSource:
    """A frame source for `path`: `.arrow` -> ProAssist frames file, anything else -> raw video. For videos,
    `backend` None tries decord and falls back to PyAV (logging why) when decord is missing or cannot open and
    decode the file; "decord" or "pyav" forces one. Raises FrameSourceError when the file cannot be used at all."""
    path = Path(path)
    if not path.is_file():
        raise FrameSourceError(f"{path}: no such file")
    if path.suffix == ".arrow":
        return ArrowFrames(path, fps)
    if backend not in (None, "decord", "pyav"):
        raise ValueError(f"unknown video backend {backend!r} (use None, 'decord' or 'pyav')")
    if backend in (None, "decord"):
        try:
            return DecordFrames(path, fps)
        except ImportError as exc:
            reason = f"decord not importable ({exc})"
        except _DecordFailed as exc:
            reason = str(exc)
        if backend == "decord":
            raise FrameSourceError(f"{path}: {reason}")
        log.info("%s: %s; using PyAV", path, reason)
    return PyAVFrames(path, fps)
