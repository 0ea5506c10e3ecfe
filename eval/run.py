"""`dst eval` and `dst score`.

    OUT/predictions.jsonl   one line per dialogue (see eval/stream.py for the frame records)
    OUT/metrics.json        ProAssist speaking metrics, text metrics on matched pairs, DST metrics; per dataset
                            and the unweighted mean over datasets
    OUT/report.html         a self-contained report with a timeline per dialogue
    OUT/thresholds.json     with --sweep: per dataset and decision, F1 against the threshold and the best one

`--sweep` makes one teacher-forced pass (ground-truth context, so a decision's probability does not depend on the
threshold), reads F1 against each threshold from it, picks the maximum per dataset and decision, and then runs the
requested mode with those thresholds. `--thresholds-from` applies a saved thresholds.json (val -> test).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from eval.report import write_report
from eval.metrics_dst import DST_WINDOW_S
from eval.scoring import DEFAULT_STS_MODEL, check_scorable, load_embedder, read_predictions, score, write_metrics
from eval.stream import MODES, StreamConfig, Streamer
from eval.sweep import ThresholdsError, best_from_sweep, load_thresholds, sweep_thresholds, write_thresholds
from train.checkpoint import load_dst_model
from train.sequence import SequenceFormat
from train.shard_index import ShardIndex

class EvalError(ValueError):
    """A user-facing problem with the eval inputs (missing checkpoint, mismatched shards)."""


@dataclass(frozen=True)
class EvalConfig:
    shards: Path
    out: Path
    ckpt: Path | None = None
    stream: StreamConfig = StreamConfig()
    sweep: bool = False
    thresholds_from: Path | None = None
    sts_model: str = DEFAULT_STS_MODEL
    max_videos: int | None = None
    device: str = "auto"


def _dialogues(streamer, index: ShardIndex, video_ids, thresholds: dict, console, label: str) -> list[dict]:
    total = sum(len(index.meta(v)["conversations"]) for v in video_ids)
    out = []
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(label, total=total)
        for vid in video_ids:
            meta = index.meta(vid)
            emb = index.rows(vid, 0, index.num_rows(vid))
            theta = thresholds.get(meta["dataset"])
            for c, conv in enumerate(meta["labels"]["conversations"]):
                frames = streamer.run(meta, emb, c, theta)
                out.append({"dataset": meta["dataset"], "video_uid": meta["video_uid"], "conversation": c,
                            "user_type": conv["user_type"], "fps": meta["fps"], "frames": frames})
                progress.advance(task)
    return out


def _load_thresholds(path: Path, datasets=None) -> dict[str, tuple[float, float]]:
    try:
        return load_thresholds(path, datasets)
    except ThresholdsError as e:
        raise EvalError(str(e)) from None


def run(cfg: EvalConfig, console: Console | None = None) -> dict:
    console = console or Console()
    if cfg.stream.mode not in MODES:
        raise EvalError(f"--mode must be one of {MODES}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    index = ShardIndex.build(cfg.shards)
    video_ids = index.video_ids[: cfg.max_videos] if cfg.max_videos else index.video_ids
    model = fmt = None
    if cfg.stream.mode in ("model", "teacher-forced") or cfg.sweep:
        if cfg.ckpt is None:
            raise EvalError(f"--ckpt is required for mode {cfg.stream.mode}" + (" and --sweep" if cfg.sweep else ""))
        model, tokenizer, meta = load_dst_model(cfg.ckpt, device, torch.float16 if device.type == "cuda"
                                                else torch.float32)
        if meta["tokens_per_frame"] != index.tokens_per_frame:
            raise EvalError(f"the checkpoint was trained on {meta['tokens_per_frame']} tokens per frame, the shards "
                             f"hold {index.tokens_per_frame}")
        fmt = SequenceFormat(tokenizer, index.tokens_per_frame)
    cfg.out.mkdir(parents=True, exist_ok=True)
    embed = load_embedder(cfg.sts_model)
    thresholds = (_load_thresholds(cfg.thresholds_from, {index.meta(v)["dataset"] for v in video_ids})
                  if cfg.thresholds_from else {})
    sweep = None
    if cfg.sweep:
        tf = Streamer(model, fmt, replace(cfg.stream, mode="teacher-forced"), device)
        sweep = sweep_thresholds(_dialogues(tf, index, video_ids, {}, console, "sweep"), embed, console=console)
        write_thresholds(cfg.out / "thresholds.json", sweep)
        thresholds = best_from_sweep(sweep)
    streamer = Streamer(model, fmt, cfg.stream, device)
    dialogues = _dialogues(streamer, index, video_ids, thresholds, console, cfg.stream.mode)
    with open(cfg.out / "predictions.jsonl", "w") as f:
        for d in dialogues:
            f.write(json.dumps(d) + "\n")
    metrics = score(dialogues, embed, cfg.sts_model)
    write_metrics(cfg.out / "metrics.json", metrics)
    run_info = {"checkpoint": str(cfg.ckpt), "mode": cfg.stream.mode, "shards": str(cfg.shards),
                "thresholds": thresholds or {"all": [cfg.stream.theta_update, cfg.stream.theta_speak]},
                "context_strategy": cfg.stream.context_strategy,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    write_report(cfg.out / "report.html", dialogues, metrics, run_info, sweep=sweep)
    print_metrics(metrics, console, title=f"{cfg.stream.mode}: {cfg.out}")
    return metrics


def print_metrics(metrics: dict, console: Console, title: str) -> None:
    table = Table(title=title)
    columns = [("speak", "f1", "speak F1"), ("speak", "precision", "P"), ("speak", "recall", "R"),
               ("dst", "update_f1", "update F1"), ("dst", "joint_accuracy", "joint acc"),
               ("dst", "transition_f1", "trans F1"), ("text", "Bleu_4", "BLEU-4")]
    table.add_column("dataset")
    for _, _, name in columns:
        table.add_column(name, justify="right")
    rows = [*metrics["datasets"].items(), ("mean", metrics["mean"])]
    for name, m in rows:
        table.add_row(name, *(f"{m[group][key]:.3f}" if m[group][key] is not None else "-"
                              for group, key, _ in columns))
    console.print(table)


def score_file(predictions: Path, out: Path, sts_model: str = DEFAULT_STS_MODEL, console: Console | None = None, *,
               protocol: str = "proassist", dst_window_s: float = DST_WINDOW_S) -> dict:
    """`dst score`: metrics from saved predictions, no model. The predictions are read and validated before
    anything is loaded or written: a file that cannot be scored raises PredictionsError/ScoringError and leaves an
    existing metrics.json as it was (the new one is written atomically, only when complete)."""
    dialogues = read_predictions(predictions)
    check_scorable(dialogues, protocol)
    metrics = score(dialogues, load_embedder(sts_model), sts_model, protocol=protocol, dst_window_s=dst_window_s)
    write_metrics(out, metrics)
    print_metrics(metrics, console or Console(), title=str(out))
    return metrics
