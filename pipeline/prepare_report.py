"""`manifest.json` and the final summary table of `dst prepare`."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from core.files import write_atomic
from pipeline.labels import LabelsReport
from pipeline.shards import SHARD_PATTERN
from pipeline.timeline import VideoLabels

STATE_DIR = ".prepare"


def write_manifest(out: Path, config: dict, plan: dict, report: LabelsReport, videos: list[VideoLabels]) -> dict:
    """Merge every shard's per-video status (written by whichever rank made it) into `out/manifest.json`.
    Deterministic: the same run gives the same manifest."""
    statuses: dict[str, dict] = {}
    shard_samples: dict[str, int] = {}  # what each shard holds, so that readers detect a shard cut short
    for i in range(len(plan["shards"])):
        shard = out / SHARD_PATTERN.format(i)
        status = out / STATE_DIR / f"{shard.stem}.json"
        if not shard.exists() or not status.exists():
            raise RuntimeError(f"{shard} or its status is missing after prepare (did a rank fail?); rerun to resume")
        here = json.loads(status.read_text())
        shard_samples[shard.name] = sum(s["status"] == "written" for s in here.values())
        statuses.update(here)
    per_video = {v.record.video_uid: statuses[v.record.video_uid] for v in videos}
    skipped = [{"video_uid": uid, "reason": reason} for uid, reason in report.skipped]
    skipped += [{"video_uid": uid, "reason": s["reason"]} for uid, s in per_video.items() if s["status"] != "written"]
    written = [s for s in per_video.values() if s["status"] == "written"]
    manifest = {
        "model": plan["model"],
        "tokens_per_frame": plan["tokens_per_frame"],
        "tokens": plan["tokens"],
        "hidden_size": plan["hidden_size"],
        "fps": plan["fps"],
        "source": plan["source"],
        "config": config,
        "counts": {
            "records": report.records,
            "videos_written": len(written),
            "videos_skipped": len(skipped),
            "frames": sum(s["frames"] for s in written),
            "bad_frames": sum(len(s["bad_frames"]) for s in written),
            "shards": len(plan["shards"]),
            "clamped_turns": sum(s["clamped_turns"] for s in written),
            "dropped_turns": sum(s["dropped_turns"] for s in written),
            "empty_turns": sum(s.get("empty_turns", 0) for s in written),
            "dropped_transitions": sum(s["dropped_transitions"] for s in written),
        },
        "shards": [SHARD_PATTERN.format(i) for i in range(len(plan["shards"]))],
        "shard_samples": shard_samples,
        "videos": per_video,
        "skipped": skipped,
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def print_summary(manifest: dict, console: Console, elapsed: float) -> None:
    rows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in manifest["videos"].values():
        if s["status"] == "written":
            row = rows[s["dataset"]]
            row["videos"] += 1
            row["frames"] += s["frames"]
            row["bad frames"] += len(s["bad_frames"])
            row["clamped turns"] += s["clamped_turns"]
            row["dropped turns"] += s["dropped_turns"]
    columns = ("videos", "frames", "bad frames", "clamped turns", "dropped turns")
    table = Table(title=f"prepare: {manifest['model']}, {manifest['tokens']} tokens/frame x {manifest['hidden_size']}")
    table.add_column("dataset")
    for name in columns:
        table.add_column(name.replace(" ", "\n"), justify="right", no_wrap=True)
    for dataset in sorted(rows):
        table.add_row(dataset, *(str(rows[dataset][c]) for c in columns))
    console.print(table)
    counts = manifest["counts"]
    console.print(
        f"records {counts['records']}, videos written {counts['videos_written']}, skipped {counts['videos_skipped']}, "
        f"shards {counts['shards']}, DST transitions dropped {counts['dropped_transitions']}; "
        f"{elapsed:.1f} s this run",
        highlight=False,
        soft_wrap=True,
    )
