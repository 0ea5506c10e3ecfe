"""`dst synth-frames`: write synthetic ProAssist-style frames files for the records of a DST JSON.

For trying the pipeline end to end where the real frames are not at hand (the demo, tests, a new machine). Each
file covers the record's video up to `video_start_time + duration` at `fps`, so the labels come out as they would
on real data of that length. Files are only ever written inside `out`: a record whose `video_uid` or dataset is not
a plain file name (`../x`, `/abs`, `a/b`, NUL) is refused with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from core.errors import DataError
from core.settings import check, setting
from pipeline.config import fps_setting
from pipeline.frames_files import (
    FramesFileError,
    frames_file_candidates,
    synthetic_jpegs,
    write_frames_file,
)
from pipeline.records import (
    MAX_SECONDS,
    RecordError,
    VideoRecord,
    load_record_list,
    parse_record,
)
from pipeline.timeline import frame_at

MAX_FRAMES = 100_000  # per file: about 14 hours at 2 fps, some 200 MB of 64-pixel pictures


class NothingWritten(DataError):
    """No record gave a frames file (exit 1)."""


@dataclass(frozen=True)
class SynthFramesConfig:
    dst_json: Path = setting(help="DST-augmented dialogues: a JSON list of video records.")
    out: Path = setting(help="Frames root to create ({dataset}/frames/{name}.arrow).")
    fps: float = fps_setting("Frame rate of the files.")
    size: int = setting(64, "Picture side in pixels (ProAssist's are 384).", minimum=8, maximum=1024)
    default_duration: float = setting(
        60.0,
        "Seconds of video after the start, for records without a duration.",
        minimum=0,
        maximum=MAX_SECONDS,
        above=True,
    )

    def __post_init__(self):
        check(self)


def _frames_path(cfg: SynthFramesConfig, record: VideoRecord) -> tuple[Path, int]:
    """Where the record's file goes and how many frames it needs; `RecordError` when it cannot be written."""
    duration = record.duration if record.duration is not None else cfg.default_duration
    n_frames = frame_at(record.video_start_time + duration, cfg.fps)
    if not 1 <= n_frames <= MAX_FRAMES:
        raise RecordError(
            record.video_uid,
            f"its video needs {n_frames} frames at {cfg.fps:g} fps (start "
            f"{record.video_start_time:g} s + {duration:g} s); at most {MAX_FRAMES}",
        )
    try:
        path = frames_file_candidates(cfg.out, record.dataset, record.video_uid)[0]
    except FramesFileError as exc:
        raise RecordError(record.video_uid, str(exc)) from None
    return path, n_frames


def run(cfg: SynthFramesConfig, console: Console | None = None) -> list[Path]:
    console = console or Console()
    written: list[Path] = []
    raws = load_record_list(cfg.dst_json)
    for index, raw in enumerate(raws):
        try:
            record = parse_record(raw, index)
            path, n_frames = _frames_path(cfg, record)
            if path in written:  # assembly_X and disassembly_X share a file
                continue
            try:
                write_frames_file(path, synthetic_jpegs(n_frames, size=cfg.size, seed=index))
            except OSError as exc:
                raise RecordError(record.video_uid, f"cannot write {path}: {exc.strerror or exc}") from None
        except RecordError as exc:
            console.print(
                f"[yellow]skip[/] {escape(exc.video_uid)}: {escape(exc.reason)}", highlight=False, soft_wrap=True
            )
            continue
        written.append(path)
        console.print(f"wrote {path} ({n_frames} frames)", highlight=False, soft_wrap=True)
    if not written:
        raise NothingWritten(
            f"no frames file written: {cfg.dst_json} has "
            f"{'no usable record (see the skip lines above)' if raws else 'no records'}"
        )
    return written
