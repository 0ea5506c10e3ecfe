"""ProAssist frames files: where a video's file lives and how many frames it holds.

Layout (docs/design.md §2): `{frames_root}/{dataset}/frames/{name}.arrow`, an Arrow IPC *stream* with one string
column `frame` (a base64 JPEG per row, one row per frame at the dataset fps). `{name}` is the video_uid, except that
assembly101 drops everything up to and including the first `_` (assembly_X and disassembly_X share `X.arrow`) and
ego4d drops a leading `grp-`.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from core.errors import InputError
from core.files import atomic_path
from core.safe_names import name_problem, quoted

FRAME_COLUMN = "frame"
FRAMES_LAYOUT = "{dataset}/frames/{name}.arrow"
VIDEOS_LAYOUT = "{dataset}/{name}.mp4"


class FramesFileError(InputError):
    """A frames file that is missing or cannot be read; the message names the file and the reason."""


def frames_file_name(dataset: str, video_uid: str) -> str:
    """The `{name}` part of `frames/{name}.arrow` for a video of `dataset`."""
    if dataset == "assembly101":
        _, sep, rest = video_uid.partition("_")
        if not sep or not rest:
            raise FramesFileError(f"assembly101 video_uid {video_uid!r} has no '_' to strip")
        return rest
    if dataset == "ego4d" and video_uid.startswith("grp-"):
        return video_uid[len("grp-") :]
    return video_uid


def _check_names(*values: str) -> None:
    """Values from the data become path components: refuse any that could lead outside the root folder."""
    for value in values:
        problem = name_problem(value)
        if problem:
            raise FramesFileError(f"{quoted(value)} {problem}: not usable as a file name")


def frames_file_candidates(frames_root: str | Path, dataset: str, video_uid: str) -> list[Path]:
    """Where the file may be: under `{root}/{dataset}/frames/` (ProAssist's processed_data layout), or under
    `{root}/frames/` when the root already is one dataset's folder. Always inside `frames_root`."""
    root = Path(frames_root)
    name = frames_file_name(dataset, video_uid)
    _check_names(dataset, name)
    return [root / dataset / "frames" / f"{name}.arrow", root / "frames" / f"{name}.arrow"]


def _first_file(candidates: list[Path]) -> Path | None:
    for path in candidates:
        try:
            if path.is_file():
                return path
        except OSError:  # e.g. a name too long for this file system: no such file
            continue
    return None


def find_frames_file(frames_root: str | Path, dataset: str, video_uid: str) -> Path:
    candidates = frames_file_candidates(frames_root, dataset, video_uid)
    path = _first_file(candidates)
    if path is None:
        raise FramesFileError("no frames file (looked for " + ", ".join(str(p) for p in candidates) + ")")
    return path


def open_frames_stream(path: Path) -> ipc.RecordBatchStreamReader:
    try:
        reader = ipc.open_stream(pa.memory_map(str(path), "r"))
    except (pa.ArrowInvalid, OSError) as exc:
        raise FramesFileError(f"{path}: not a readable Arrow IPC stream ({exc})") from None
    field = reader.schema.get_field_index(FRAME_COLUMN)
    if field < 0:
        raise FramesFileError(f"{path}: no '{FRAME_COLUMN}' column (columns: {reader.schema.names})")
    if not pa.types.is_string(reader.schema.field(field).type) and not pa.types.is_large_string(
        reader.schema.field(field).type
    ):
        raise FramesFileError(f"{path}: column '{FRAME_COLUMN}' is {reader.schema.field(field).type}, not string")
    return reader


def count_frames(path: str | Path) -> int:
    """Number of rows (frames) in a frames file, without decoding any image. The file is memory-mapped, so
    counting touches only batch headers."""
    path = Path(path)
    reader = open_frames_stream(path)
    try:
        return sum(batch.num_rows for batch in reader)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FramesFileError(f"{path}: truncated or corrupt Arrow stream ({exc})") from None


def write_frames_file(path: str | Path, jpeg_frames: list[bytes], batch_rows: int = 256) -> None:
    """Write JPEG bytes as a ProAssist-style frames file (base64 strings, Arrow IPC stream), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(FRAME_COLUMN, pa.string())])
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, ipc.new_stream(sink, schema) as writer:
        for i in range(0, len(jpeg_frames), batch_rows):
            chunk = [base64.b64encode(b).decode("ascii") for b in jpeg_frames[i : i + batch_rows]]
            writer.write_batch(pa.record_batch([pa.array(chunk, pa.string())], schema=schema))


def synthetic_jpegs(n_frames: int, size: int = 64, seed: int = 0) -> list[bytes]:
    """`n_frames` distinct, deterministic JPEG pictures (a moving gradient with the frame index drawn in), for
    demos and tests where no real frames exist."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(3,), dtype=np.int64)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for k in range(n_frames):
        pixels = np.stack(
            [(xx * 4 + k * 7 + base[0]) % 256, (yy * 4 + k * 3 + base[1]) % 256, (xx + yy + k * 11 + base[2]) % 256],
            axis=-1,
        ).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        ImageDraw.Draw(image).text((2, 2), str(k), fill=(255, 255, 255))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def find_video_file(videos_root: str | Path, dataset: str, video_uid: str) -> Path:
    """A raw video for the record: `{root}/{dataset}/{name}{ext}` or `{root}/{name}{ext}`, where `name` is the
    video_uid or its frames-file name (so assembly_X and disassembly_X may share `X.mp4`)."""
    root = Path(videos_root)
    names = dict.fromkeys([video_uid, frames_file_name(dataset, video_uid)])
    _check_names(dataset, *names)
    candidates = [
        folder / (name + ext) for folder in (root / dataset, root) for name in names for ext in VIDEO_SUFFIXES
    ]
    path = _first_file(candidates)
    if path is not None:
        return path
    raise FramesFileError(
        f"no video file (looked for {root / dataset / video_uid}.* and {root / video_uid}.*, "
        f"extensions {', '.join(VIDEO_SUFFIXES)})"
    )
