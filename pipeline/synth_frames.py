"""`dst synth-frames`: write synthetic ProAssist-style frames files for the records of a DST JSON.

For trying the pipeline end to end where the real frames are not at hand (the demo, tests, a new machine). Each
file covers the record's video up to `video_start_time + duration` at `fps`, so the labels come out as they would
on real data of that length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from pipeline.frames_files import frames_file_candidates, synthetic_jpegs, write_frames_file
from pipeline.records import RecordError, load_record_list, parse_record
from pipeline.timeline import DEFAULT_FPS, frame_at


@dataclass(frozen=True)
class SynthFramesConfig:
    dst_json: Path
    out: Path  # a frames root: files land in {out}/{dataset}/frames/{name}.arrow
    fps: float = DEFAULT_FPS
    size: int = 64
    default_duration: float = 60.0  # seconds after the start, for records without `duration`


def run(cfg: SynthFramesConfig, console: Console | None = None) -> list[Path]:
    console = console or Console()
    written = []
    for index, raw in enumerate(load_record_list(cfg.dst_json)):
        try:
            record = parse_record(raw, index)
        except RecordError as exc:
            console.print(f"[yellow]skip[/] {escape(exc.video_uid)}: {escape(exc.reason)}", highlight=False,
                          soft_wrap=True)
            continue
        duration = record.duration if record.duration is not None else cfg.default_duration
        n_frames = frame_at(record.video_start_time + duration, cfg.fps)
        path = frames_file_candidates(cfg.out, record.dataset, record.video_uid)[0]
        if path in written:  # assembly_X and disassembly_X share a file
            continue
        write_frames_file(path, synthetic_jpegs(n_frames, size=cfg.size, seed=index))
        written.append(path)
        console.print(f"wrote {path} ({n_frames} frames)", highlight=False, soft_wrap=True)
    return written
