"""`dst eval` and `dst score`.

    OUT/predictions.jsonl   one line per dialogue (see eval/stream.py for the frame records)
    OUT/metrics.json        ProAssist speaking metrics, text metrics on matched pairs, DST metrics; per dataset
                            and the unweighted mean over datasets
    OUT/report.html         a self-contained report with a timeline per dialogue
    OUT/thresholds.json     with --sweep: per dataset and decision, F1 against the threshold and the best one

`--sweep` makes one teacher-forced pass (ground-truth context, so a decision's probability does not depend on the
threshold), reads F1 against each threshold from it, picks the maximum per dataset and decision, and then runs the
requested mode with those thresholds. `--thresholds-from` applies a saved thresholds.json (val -> test).

`--batch-dialogues B` streams B conversations together (eval/engine.py); under `torchrun` each rank streams its
share of the conversations and rank 0 gathers, scores and writes (eval/distributed.py): the same files as one
process.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from core.errors import InputError
from core.files import replace_together
from core.runtime import Ranks, choose_device, process_group
from eval.columns import console_columns, value
from eval.config import EvalConfig, ScoreConfig, StreamConfig
from eval.distributed import balanced_shares, broadcast_from_main, gather_to_main
from eval.jsonio import dumps
from eval.report import render_report
from eval.scoring import (
    check_scorable,
    load_embedder,
    read_predictions,
    score,
    write_metrics,
)
from eval.stream import Streamer, stream_rows
from eval.sweep import (
    ThresholdsError,
    best_from_sweep,
    load_thresholds,
    sweep_thresholds,
)
from pipeline.shard_index import ShardIndex
from train.checkpoint import DST_META, load_dst_model
from train.sequence import SequenceFormat


class EvalError(InputError):
    """A user-facing problem with the eval inputs (missing checkpoint, mismatched shards)."""


def _dialogues(
    streamer, index: ShardIndex, video_ids, thresholds: dict, console, label: str, ranks: Ranks | None = None
) -> list[dict] | None:
    """Stream every conversation of `video_ids` (this rank's share, `streamer`'s slots at a time); on rank 0 all
    records in the single-process order (video, then conversation), None on the other ranks."""
    ranks = ranks or Ranks()
    cfg = streamer.cfg
    items = [(pos, vid, c) for pos, vid in enumerate(video_ids) for c in range(len(index.meta(vid).conversations))]
    lengths = [stream_rows(index.meta(vid), c, cfg.protocol) for _, vid, c in items]
    mine = [items[i] for i in balanced_shares(lengths, ranks.world)[ranks.rank]]

    def jobs():  # lazily, so only the videos in flight hold their embeddings
        loaded = (None, None)
        for pos, vid, c in mine:
            if loaded[0] != vid:
                loaded = (vid, index.rows(vid, 0, index.num_rows(vid)))
            meta = index.meta(vid)
            yield (pos, c), meta, loaded[1], c, thresholds.get(meta.dataset)

    records = {}
    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True
    ) as progress:
        task = progress.add_task(label, total=len(mine))
        for (pos, c), streamed in streamer.run_many(jobs()):
            meta = index.meta(video_ids[pos])
            records[pos, c] = {
                "dataset": meta.dataset,
                "video_uid": meta.video_uid,
                "conversation": c,
                "user_type": meta.conversations[c].user_type,
                "fps": meta.fps,
                "variant": cfg.variant,
                "protocol": cfg.protocol,
                "initial_state": meta.initial_state,
                "reseeds": streamed["reseeds"],
                "frames": streamed["frames"],
            }
            progress.advance(task)
    gathered = gather_to_main(records, ranks)
    if gathered is None:
        return None
    merged = {key: record for part in gathered for key, record in part.items()}
    return [merged[key] for key in sorted(merged)]


def _load_thresholds(path: Path, datasets=None) -> dict[str, tuple[float, float]]:
    try:
        return load_thresholds(path, datasets)
    except ThresholdsError as e:
        raise EvalError(str(e)) from None


def load_checkpoint(cfg: EvalConfig, index: ShardIndex, device: torch.device):
    """(model, sequence format, the checkpoint's dst.json), after checking that it fits the shards and options."""
    ckpt = Path(cfg.ckpt)
    if not (ckpt / DST_META).is_file():
        if (ckpt / "checkpoints" / "last").exists():
            raise EvalError(
                f"--ckpt {ckpt} is a run folder; pass one of its checkpoints, e.g. {ckpt / 'checkpoints' / 'last'}"
            )
        raise EvalError(
            f"--ckpt {ckpt}: not a checkpoint folder (no {DST_META}; expected RUN/checkpoints/last or "
            "RUN/checkpoints/step-NNNNNN)"
        )
    model, tokenizer, meta = load_dst_model(ckpt, device, torch.float16 if device.type == "cuda" else torch.float32)
    if meta["tokens_per_frame"] != index.tokens_per_frame:
        raise EvalError(
            f"the checkpoint was trained on {meta['tokens_per_frame']} tokens per frame, the shards "
            f"at {cfg.shards} hold {index.tokens_per_frame}"
        )
    if meta["hidden_size"] != index.hidden_size:
        raise EvalError(
            f"the checkpoint was trained on embeddings of width {meta['hidden_size']}, the shards at "
            f"{cfg.shards} hold width {index.hidden_size} (prepared with another --model?)"
        )
    variant = meta["variant"]
    if cfg.variant is not None and cfg.variant != variant:
        raise EvalError(f"--variant {cfg.variant} disagrees with the checkpoint, which was trained as {variant}")
    return model, SequenceFormat(tokenizer, index.tokens_per_frame, variant), meta


def resolve_stream(cfg: EvalConfig, meta: dict | None) -> StreamConfig:
    """The stream settings with the checkpoint's variant and a context no longer than it was trained on."""
    trained = meta.get("max_seq_len") if meta else None
    if cfg.max_context is not None and trained is not None and cfg.max_context > trained:
        raise EvalError(
            f"--max-context {cfg.max_context} exceeds the checkpoint's training max_seq_len {trained}: "
            "positions past it were never trained; pass at most that (the default)"
        )
    max_context = cfg.max_context or trained or cfg.stream.max_context
    variant = (meta["variant"] if meta else None) or cfg.variant or cfg.stream.variant
    return replace(cfg.stream, variant=variant, max_context=max_context)


def run(cfg: EvalConfig, console: Console | None = None) -> dict:
    """One process, or one rank under torchrun: every rank streams its share, rank 0 scores and writes (the
    other ranks return an empty dict)."""
    console = console or Console()
    ranks = Ranks.from_env()
    device = choose_device(cfg.device, ranks)
    with process_group(ranks, device):  # gloo: ranks exchange Python objects once per pass
        return _run(cfg, console if ranks.main else Console(quiet=True), ranks, device)


def _run(cfg: EvalConfig, console: Console, ranks: Ranks, device: torch.device) -> dict:
    index = ShardIndex.build(cfg.shards)
    for warning in index.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    video_ids = index.video_ids[: cfg.max_videos] if cfg.max_videos else index.video_ids
    model = fmt = meta = None
    if cfg.stream.mode in ("model", "teacher-forced") or cfg.sweep:
        if cfg.ckpt is None:
            raise EvalError(f"--ckpt is required for mode {cfg.stream.mode}" + (" and --sweep" if cfg.sweep else ""))
        model, fmt, meta = load_checkpoint(cfg, index, device)
    stream = resolve_stream(cfg, meta)
    thresholds = (
        _load_thresholds(cfg.thresholds_from, {index.dataset(v) for v in video_ids}) if cfg.thresholds_from else {}
    )
    embed = load_embedder(cfg.sts_model) if ranks.main else None  # only rank 0 scores
    outputs: dict[str, str] = {}  # file name -> text; renamed into place together at the end
    sweep = None
    if cfg.sweep:
        tf = Streamer(model, fmt, replace(stream, mode="teacher-forced"), device, cfg.batch_dialogues)
        swept = _dialogues(tf, index, video_ids, {}, console, "sweep", ranks)
        if ranks.main:
            sweep = sweep_thresholds(
                swept, embed, protocol=stream.protocol, dst_window_s=cfg.dst_window, console=console
            )
            outputs["thresholds.json"] = dumps(sweep, indent=1)[0] + "\n"
            thresholds = best_from_sweep(sweep)
        thresholds = broadcast_from_main(thresholds, ranks)
    streamer = Streamer(model, fmt, stream, device, cfg.batch_dialogues)
    dialogues = _dialogues(streamer, index, video_ids, thresholds, console, stream.mode, ranks)
    if not ranks.main:
        return {}
    metrics = score(dialogues, embed, cfg.sts_model, protocol=stream.protocol, dst_window_s=cfg.dst_window)
    lines = [dumps(d) for d in dialogues]
    non_finite = sum(n for _, n in lines)  # e.g. NaN probabilities of a broken checkpoint, written as null
    if non_finite:
        console.print(f"[yellow]warning:[/] {non_finite} non-finite values in the predictions (written as null)")
    outputs["predictions.jsonl"] = "".join(text + "\n" for text, _ in lines)
    outputs["metrics.json"] = dumps(metrics, indent=2)[0] + "\n"
    run_info = {
        "checkpoint": str(cfg.ckpt),
        "mode": stream.mode,
        "variant": stream.variant,
        "protocol": stream.protocol,
        "shards": str(cfg.shards),
        "thresholds": thresholds or {"all": [stream.theta_update, stream.theta_speak]},
        "context_strategy": stream.context_strategy,
        "max_context": stream.max_context,
        "non_finite_predictions": non_finite,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    outputs["report.html"] = render_report(dialogues, metrics, run_info, sweep=sweep)
    replace_together(cfg.out, outputs)  # never new predictions beside old metrics
    print_metrics(metrics, console, title=f"{stream.mode} ({stream.variant}, {stream.protocol}): {cfg.out}")
    return metrics


def print_metrics(metrics: dict, console: Console, title: str) -> None:
    table = Table(title=title)
    columns = console_columns()
    table.add_column("dataset")
    for column in columns:
        table.add_column(column.console, justify="right")
    rows = [*metrics["datasets"].items(), ("mean", metrics["mean"])]
    for name, m in rows:
        values = [value(m, column) for column in columns]
        table.add_row(name, *("-" if v is None else f"{v:.3f}" for v in values))
    console.print(table)


def score_file(cfg: ScoreConfig, console: Console | None = None, embed=None) -> dict:
    """`dst score`: metrics from saved predictions, no model. The predictions are read and validated before
    anything is loaded or written: a file that cannot be scored raises PredictionsError/ScoringError and leaves an
    existing metrics.json as it was (the new one is written atomically, only when complete)."""
    dialogues = read_predictions(cfg.predictions)
    check_scorable(dialogues, cfg.protocol)
    # `embed`: an embedder of `sts_model` already loaded (re-scoring many files loads it once)
    metrics = score(
        dialogues,
        embed or load_embedder(cfg.sts_model),
        cfg.sts_model,
        protocol=cfg.protocol,
        dst_window_s=cfg.dst_window,
    )
    write_metrics(cfg.out, metrics)
    print_metrics(metrics, console or Console(), title=str(cfg.out))
    return metrics
