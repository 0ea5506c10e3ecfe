"""`dst labels`: one row per (video, conversation, decision point) from the DST JSON and the frames files."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from core.errors import DataError
from core.files import temporary
from pipeline.config import LabelsConfig
from pipeline.frames_files import (
    FRAMES_LAYOUT,
    FramesFileError,
    count_frames,
    find_frames_file,
)
from pipeline.records import RecordError, VideoRecord, load_record_list, parse_record
from pipeline.timeline import VideoLabels, point_time, video_labels

LABEL_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("video_uid", pa.string()),
        ("conversation", pa.int64()),
        ("user_type", pa.string()),
        ("frame", pa.int64()),
        ("time", pa.float64()),
        ("user_text", pa.string()),
        ("dst_update", pa.bool_()),
        ("dst_delta", pa.string()),
        ("dst_state", pa.string()),
        ("speak", pa.bool_()),
        ("response", pa.string()),
        ("progress", pa.string()),
    ]
)


class NoUsableRecords(DataError):
    """Every record was skipped (or there were none): the run cannot do its job (exit 1); nothing is written."""


@dataclass
class LabelsReport:
    """What a run did, for the summary and for callers (prepare writes it into its manifest)."""

    records: int = 0
    written_videos: int = 0
    rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (video_uid or position, reason)
    clamped_turns: int = 0
    shifted_turns: int = 0
    dropped_turns: int = 0
    empty_turns: int = 0
    dropped_transitions: int = 0


def state_json(state: dict[str, str]) -> str:
    """The one serialisation of a DST state or delta used in every output (node order kept, compact)."""
    return json.dumps(state, separators=(",", ":"))


def label_columns(labels: VideoLabels) -> dict[str, list]:
    """The rows of one video as columns, in LABEL_SCHEMA order: conversation-major, then decision point."""
    rec, points = labels.record, labels.points
    # The DST is shared by all conversations: serialise each point's state and delta once.
    states, deltas = [], []
    for k, state in labels.dst.states(labels.k0, labels.n_frames):
        states.append(state_json(state))
        delta = labels.dst.updates.get(k)
        deltas.append(state_json(delta) if delta else "")
    times = [point_time(k, labels.fps) for k in points]
    n = len(points)
    cols: dict[str, list] = {name: [] for name in LABEL_SCHEMA.names}
    for conv in labels.conversations:
        cols["dataset"] += [rec.dataset] * n
        cols["video_uid"] += [rec.video_uid] * n
        cols["conversation"] += [conv.index] * n
        cols["user_type"] += [conv.user_type] * n
        cols["frame"] += list(points)
        cols["time"] += times
        cols["user_text"] += [conv.user_text.get(k, "") for k in points]
        cols["dst_update"] += [d != "" for d in deltas]
        cols["dst_delta"] += deltas
        cols["dst_state"] += states
        cols["speak"] += [k in conv.responses for k in points]
        cols["response"] += [conv.responses.get(k, "") for k in points]
        cols["progress"] += [conv.progress.get(k, "") for k in points]
    return cols


FrameCounter = Callable[[VideoRecord], int]  # frames available for a record; raises FramesFileError


def arrow_frame_counter(frames_root: Path) -> FrameCounter:
    """Counts rows of each record's frames file, once per file (assembly and disassembly videos share one)."""
    counts: dict[Path, int] = {}

    def count(record: VideoRecord) -> int:
        path = find_frames_file(frames_root, record.dataset, record.video_uid)
        if path not in counts:
            counts[path] = count_frames(path)
        return counts[path]

    return count


def iter_video_labels(
    raws: list, count_frames_of: FrameCounter, fps: float, report: LabelsReport, console: Console
) -> Iterator[VideoLabels]:
    """Labels of every usable record, in input order, with a progress bar; each unusable record is reported on one
    line (video_uid and reason) and recorded in `report`, never raised."""
    first_of: dict[tuple[str, str], int] = {}  # (dataset, video_uid) -> position of the record that is used
    with _progress(console) as progress:
        task = progress.add_task("labels", total=len(raws))
        for index, raw in enumerate(raws):
            progress.advance(task)
            try:
                record = parse_record(raw, index)
                key = (record.dataset, record.video_uid)
                if key in first_of:
                    copy = "an exact copy" if _same(raws[first_of[key]], raw) else "different content"
                    raise RecordError(
                        record.video_uid,
                        f"duplicate video_uid in dataset {record.dataset}: record "
                        f"#{first_of[key]} has it too and is used ({copy})",
                    )
                try:
                    n_frames = count_frames_of(record)
                except FramesFileError as exc:
                    raise RecordError(record.video_uid, str(exc)) from None
                labels = video_labels(record, n_frames, fps)
                first_of[key] = index
            except RecordError as exc:
                report.skipped.append((exc.video_uid, exc.reason))
                progress.console.print(
                    f"[yellow]skip[/] {escape(exc.video_uid)}: {escape(exc.reason)}", highlight=False, soft_wrap=True
                )
                continue
            report.written_videos += 1
            report.clamped_turns += labels.clamped_turns
            report.shifted_turns += labels.shifted_turns
            report.dropped_turns += labels.dropped_turns
            report.empty_turns += labels.empty_turns
            report.dropped_transitions += labels.dst.dropped
            yield labels


def _same(a, b) -> bool:
    try:
        return a == b
    except RecursionError:  # deeply nested values in fields the records do not use
        return False


def write_labels(videos: Iterable[VideoLabels], out: Path, report: LabelsReport) -> Path:
    """Write the rows of `videos` to `out.tmp` and return that path; the caller renames it when the run is good.
    Nothing half-written is left behind if the run is interrupted."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(out)
    try:
        with pq.ParquetWriter(str(tmp), LABEL_SCHEMA) as writer:
            for labels in videos:
                cols = label_columns(labels)
                writer.write_table(pa.table(cols, schema=LABEL_SCHEMA))
                report.rows += len(cols["frame"])
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def fail_if_strict(strict: bool, report: LabelsReport, console: Console, *leftovers: Path) -> None:
    """With --strict, any unusable record fails the run (exit 1) and removes what it wrote."""
    if strict and report.skipped:
        for path in leftovers:
            path.unlink(missing_ok=True)
        console.print(
            f"[red]--strict: {len(report.skipped)} of {report.records} records unusable; nothing written[/]",
            soft_wrap=True,
        )
        raise SystemExit(1)


def fail_if_nothing_usable(report: LabelsReport, layout_hint: str, *leftovers: Path) -> None:
    """No record could be used: raise `NoUsableRecords` with the first skip reason and where the frames (or videos)
    are looked for, since a wrong root folder is the usual cause; remove what was written."""
    if report.written_videos:
        return
    for path in leftovers:
        path.unlink(missing_ok=True)
    if not report.skipped:
        raise NoUsableRecords("the input holds no records; nothing written")
    uid, reason = report.skipped[0]
    missing = any(r.startswith(("no frames file", "no video file")) for _, r in report.skipped)
    raise NoUsableRecords(
        f"no usable record: all {len(report.skipped)} were skipped (the first, {uid}: {reason}); "
        f"{layout_hint if missing else 'see the skip lines above'}; nothing written"
    )


def frames_layout_hint(frames_root: Path) -> str:
    return (
        f"frames files are expected at {frames_root}/{FRAMES_LAYOUT} (--frames-root is ProAssist's "
        "processed_data folder, or one dataset's folder)"
    )


def run(cfg: LabelsConfig, console: Console | None = None) -> LabelsReport:
    """Write `cfg.out`; print one line per skipped record and a summary. With `strict`, any skipped record makes
    the run fail (raises `SystemExit(1)`) and nothing is written; so does a run where no record is usable
    (`NoUsableRecords`)."""
    console = console or Console()
    raws = load_record_list(cfg.dst_json)
    report = LabelsReport(records=len(raws))
    videos = iter_video_labels(raws, arrow_frame_counter(cfg.frames_root), cfg.fps, report, console)
    tmp = write_labels(videos, cfg.out, report)
    fail_if_strict(cfg.strict, report, console, tmp)
    fail_if_nothing_usable(report, frames_layout_hint(cfg.frames_root), tmp)
    tmp.replace(cfg.out)
    print_summary(cfg.out, report, console)
    return report


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


_SUMMARY = (
    pl.col("video_uid").n_unique().alias("videos"),
    pl.struct("video_uid", "conversation").n_unique().alias("conversations"),
    pl.len().alias("decision_points"),
    pl.col("speak").mean().alias("speak_rate"),
    pl.col("dst_update").mean().alias("update_rate"),
)


def summary_frame(labels_path: Path) -> pl.DataFrame:
    """Per-dataset counts from a labels file, plus an `all` row when there are several datasets (lazy scans, so
    it scales to the full datasets)."""
    rows = pl.scan_parquet(labels_path)
    per_dataset = rows.group_by("dataset").agg(*_SUMMARY).sort("dataset").collect()
    if per_dataset.height < 2:
        return per_dataset
    total = rows.select(pl.lit("all").alias("dataset"), *_SUMMARY).collect()
    return pl.concat([per_dataset, total])


def print_summary(labels_path: Path, report: LabelsReport, console: Console) -> None:
    table = Table(title=f"labels: {labels_path}")
    # Two-line headers keep the table inside an 80-column terminal.
    for name in ("dataset", "videos", "conversations", "decision\npoints", "speak\nrate", "update\nrate"):
        table.add_column(name, justify="left" if name == "dataset" else "right", no_wrap=True)
    for row in summary_frame(labels_path).iter_rows(named=True):
        table.add_row(
            row["dataset"],
            str(row["videos"]),
            str(row["conversations"]),
            str(row["decision_points"]),
            f"{row['speak_rate']:.4f}",
            f"{row['update_rate']:.4f}",
        )
    console.print(table)
    console.print(
        f"records {report.records}, written {report.written_videos}, skipped {len(report.skipped)}; "
        f"turns clamped to the last frame {report.clamped_turns}, moved later by the cursor rule "
        f"{report.shifted_turns}, dropped past the end {report.dropped_turns}, assistant turns without text (not "
        f"speaking labels) {report.empty_turns}; "
        f"DST transitions dropped past the end {report.dropped_transitions}",
        highlight=False,
        soft_wrap=True,
    )
