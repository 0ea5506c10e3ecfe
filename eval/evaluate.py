"""`dst eval` and `dst score`.

    OUT/predictions.jsonl   one line per dialogue (see eval/stream.py for the frame records)
    OUT/metrics.json        ProAssist speaking metrics, text metrics on matched pairs, DST metrics; per dataset
                            and the unweighted mean over datasets
    OUT/report.html         a self-contained report with a timeline per dialogue
    OUT/thresholds.json     with --sweep: per dataset and decision, F1 against the threshold and the best one

`--sweep` makes one teacher-forced pass (ground-truth context, so a decision's probability does not depend on the
threshold), reads F1 against each threshold from it, picks the maximum per dataset and decision, and then runs the
requested mode with those thresholds. `--thresholds-from` applies a saved thresholds.json (val -> test).

`--batch-dialogues B` streams B conversations together (eval/batched.py); under `torchrun` each rank streams its
share of the conversations and rank 0 gathers, scores and writes (eval/distributed.py): the same files as one
process.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from eval.distributed import Ranks, balanced_shares, broadcast_from_main, gather_to_main, process_group
from eval.jsonio import PredictionsError, dumps
from eval.metrics_dst import DST_WINDOW_S
from eval.report import render_report
from eval.protocol import ScoringError
from eval.scoring import DEFAULT_STS_MODEL, check_scorable, load_embedder, read_predictions, score, write_metrics
from eval.stream import CONTEXT_STRATEGIES, MODES, PROTOCOLS, StreamConfig, Streamer, stream_rows
from eval.sweep import ThresholdsError, best_from_sweep, load_thresholds, sweep_thresholds
from train.checkpoint import DST_META, load_dst_model
from train.sequence import VARIANTS, SequenceFormat
from pipeline.shard_index import ShardIndex


class EvalError(ValueError):
    """A user-facing problem with the eval inputs (missing checkpoint, mismatched shards)."""


@dataclass(frozen=True)
class EvalConfig:
    shards: Path
    out: Path
    ckpt: Path | None = None
    stream: StreamConfig = StreamConfig()
    variant: str | None = None  # None: the checkpoint's; given: must agree with it
    max_context: int | None = None  # None: the checkpoint's training max_seq_len (4096 without a checkpoint)
    dst_window_s: float = DST_WINDOW_S
    sweep: bool = False
    thresholds_from: Path | None = None
    sts_model: str = DEFAULT_STS_MODEL
    max_videos: int | None = None
    device: str = "auto"
    batch_dialogues: int = 1  # conversations streamed together per process (--batch-dialogues)


def _dialogues(streamer, index: ShardIndex, video_ids, thresholds: dict, console, label: str,
               ranks: Ranks = Ranks()) -> list[dict] | None:
    """Stream every conversation of `video_ids` (this rank's share, `streamer`'s slots at a time); on rank 0 all
    records in the single-process order (video, then conversation), None on the other ranks."""
    cfg = streamer.cfg
    items = [(pos, vid, c) for pos, vid in enumerate(video_ids)
             for c in range(len(index.meta(vid)["labels"]["conversations"]))]
    lengths = [stream_rows(index.meta(vid), c, cfg.protocol) for _, vid, c in items]
    mine = [items[i] for i in balanced_shares(lengths, ranks.world)[ranks.rank]]

    def jobs():  # lazily, so only the videos in flight hold their embeddings
        loaded = (None, None)
        for pos, vid, c in mine:
            if loaded[0] != vid:
                loaded = (vid, index.rows(vid, 0, index.num_rows(vid)))
            meta = index.meta(vid)
            yield (pos, c), meta, loaded[1], c, thresholds.get(meta["dataset"])

    records = {}
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(label, total=len(mine))
        for (pos, c), streamed in streamer.run_many(jobs()):
            meta = index.meta(video_ids[pos])
            records[pos, c] = {"dataset": meta["dataset"], "video_uid": meta["video_uid"], "conversation": c,
                               "user_type": meta["labels"]["conversations"][c]["user_type"], "fps": meta["fps"],
                               "variant": cfg.variant, "protocol": cfg.protocol,
                               "initial_state": meta["initial_state"], "reseeds": streamed["reseeds"],
                               "frames": streamed["frames"]}
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


def check_config(cfg: EvalConfig) -> None:
    """Nonsense numbers and names fail here, with the option named, before anything is loaded or written."""
    st = cfg.stream
    if st.mode not in MODES:
        raise EvalError(f"--mode must be one of {MODES}, got {st.mode!r}")
    if st.context_strategy not in CONTEXT_STRATEGIES:
        raise EvalError(f"--context-strategy must be one of {CONTEXT_STRATEGIES}, got {st.context_strategy!r}")
    if st.protocol not in PROTOCOLS:
        raise EvalError(f"--protocol must be one of {PROTOCOLS}, got {st.protocol!r}")
    if cfg.variant is not None and cfg.variant not in VARIANTS:
        raise EvalError(f"--variant must be one of {VARIANTS}, got {cfg.variant!r}")
    for name, value in (("--theta-speak", st.theta_speak), ("--theta-update", st.theta_update)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise EvalError(f"{name} must be a probability in [0, 1], got {value}")
    for name, value in (("--every", st.every_s), ("--dst-window", cfg.dst_window_s)):
        if not (math.isfinite(value) and value > (0 if name == "--every" else -1e-12)):
            raise EvalError(f"{name} must be a finite number {'> 0' if name == '--every' else '>= 0'} (seconds), "
                            f"got {value}")
    for name, value in (("--max-new-tokens", st.max_new_tokens), ("--max-summary-tokens", st.max_summary_tokens),
                        ("--max-context", cfg.max_context), ("--max-videos", cfg.max_videos),
                        ("--batch-dialogues", cfg.batch_dialogues)):
        if value is not None and value < 1:
            raise EvalError(f"{name} must be >= 1, got {value}")


def load_checkpoint(cfg: EvalConfig, index: ShardIndex, device: torch.device):
    """(model, sequence format, the checkpoint's dst.json), after checking that it fits the shards and options."""
    ckpt = Path(cfg.ckpt)
    if not (ckpt / DST_META).is_file():
        if (ckpt / "checkpoints" / "last").exists():
            raise EvalError(f"--ckpt {ckpt} is a run folder; pass one of its checkpoints, e.g. "
                            f"{ckpt / 'checkpoints' / 'last'}")
        raise EvalError(f"--ckpt {ckpt}: not a checkpoint folder (no {DST_META}; expected RUN/checkpoints/last or "
                        "RUN/checkpoints/step-NNNNNN)")
    model, tokenizer, meta = load_dst_model(ckpt, device, torch.float16 if device.type == "cuda" else torch.float32)
    if meta["tokens_per_frame"] != index.tokens_per_frame:
        raise EvalError(f"the checkpoint was trained on {meta['tokens_per_frame']} tokens per frame, the shards "
                        f"at {cfg.shards} hold {index.tokens_per_frame}")
    if meta.get("hidden_size") not in (None, index.hidden_size):
        raise EvalError(f"the checkpoint was trained on embeddings of width {meta['hidden_size']}, the shards at "
                        f"{cfg.shards} hold width {index.hidden_size} (prepared with another --model?)")
    variant = meta.get("variant", "dst")  # checkpoints from before the variants were all dst
    if cfg.variant is not None and cfg.variant != variant:
        raise EvalError(f"--variant {cfg.variant} disagrees with the checkpoint, which was trained as {variant}")
    return model, SequenceFormat(tokenizer, index.tokens_per_frame, variant), meta


def resolve_stream(cfg: EvalConfig, meta: dict | None) -> StreamConfig:
    """The stream settings with the checkpoint's variant and a context no longer than it was trained on."""
    trained = meta.get("max_seq_len") if meta else None
    if cfg.max_context is not None and trained is not None and cfg.max_context > trained:
        raise EvalError(f"--max-context {cfg.max_context} exceeds the checkpoint's training max_seq_len {trained}: "
                        "positions past it were never trained; pass at most that (the default)")
    max_context = cfg.max_context or trained or cfg.stream.max_context
    variant = (meta.get("variant", "dst") if meta else None) or cfg.variant or cfg.stream.variant
    return replace(cfg.stream, variant=variant, max_context=max_context)


def run(cfg: EvalConfig, console: Console | None = None) -> dict:
    """One process, or one rank under torchrun: every rank streams its share, rank 0 scores and writes (the
    other ranks return an empty dict)."""
    console = console or Console()
    check_config(cfg)
    ranks = Ranks.from_env()
    with process_group(ranks):
        return _run(cfg, console if ranks.main else Console(quiet=True), ranks)


def _run(cfg: EvalConfig, console: Console, ranks: Ranks) -> dict:
    device = torch.device(f"cuda:{ranks.local_rank}" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
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
    thresholds = (_load_thresholds(cfg.thresholds_from, {index.dataset(v) for v in video_ids})
                  if cfg.thresholds_from else {})
    embed = load_embedder(cfg.sts_model) if ranks.main else None  # only rank 0 scores
    outputs: dict[str, str] = {}  # file name -> text; renamed into place together at the end
    sweep = None
    if cfg.sweep:
        tf = Streamer(model, fmt, replace(stream, mode="teacher-forced"), device, cfg.batch_dialogues)
        swept = _dialogues(tf, index, video_ids, {}, console, "sweep", ranks)
        if ranks.main:
            sweep = sweep_thresholds(swept, embed, protocol=stream.protocol, dst_window_s=cfg.dst_window_s,
                                     console=console)
            outputs["thresholds.json"] = dumps(sweep, indent=1)[0] + "\n"
            thresholds = best_from_sweep(sweep)
        thresholds = broadcast_from_main(thresholds, ranks)
    streamer = Streamer(model, fmt, stream, device, cfg.batch_dialogues)
    dialogues = _dialogues(streamer, index, video_ids, thresholds, console, stream.mode, ranks)
    if not ranks.main:
        return {}
    metrics = score(dialogues, embed, cfg.sts_model, protocol=stream.protocol, dst_window_s=cfg.dst_window_s)
    lines = [dumps(d) for d in dialogues]
    non_finite = sum(n for _, n in lines)  # e.g. NaN probabilities of a broken checkpoint, written as null
    if non_finite:
        console.print(f"[yellow]warning:[/] {non_finite} non-finite values in the predictions (written as null)")
    outputs["predictions.jsonl"] = "".join(text + "\n" for text, _ in lines)
    outputs["metrics.json"] = dumps(metrics, indent=2)[0] + "\n"
    run_info = {"checkpoint": str(cfg.ckpt), "mode": stream.mode, "variant": stream.variant,
                "protocol": stream.protocol, "shards": str(cfg.shards),
                "thresholds": thresholds or {"all": [stream.theta_update, stream.theta_speak]},
                "context_strategy": stream.context_strategy, "max_context": stream.max_context,
                "non_finite_predictions": non_finite,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    outputs["report.html"] = render_report(dialogues, metrics, run_info, sweep=sweep)
    write_outputs(cfg.out, outputs)
    print_metrics(metrics, console, title=f"{stream.mode} ({stream.variant}, {stream.protocol}): {cfg.out}")
    return metrics


def write_outputs(folder: Path, outputs: dict[str, str]) -> None:
    """Every file under a temporary name first, then the renames: an interrupted eval leaves the previous outputs
    as they were, never new predictions beside old metrics."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in outputs.items():
        (folder / f"{name}.tmp").write_text(text, encoding="utf-8")
    for name in outputs:
        os.replace(folder / f"{name}.tmp", folder / name)


def print_metrics(metrics: dict, console: Console, title: str) -> None:
    table = Table(title=title)
    columns = [("speak", "f1", "speak F1"), ("speak", "precision", "P"), ("speak", "recall", "R"),
               ("speak_proassist", "f1", "ProAssist F1"), ("dst", "update_f1", "update F1"),
               ("dst_never", "update_f1", "(never)"), ("dst", "joint_accuracy", "joint acc"),
               ("dst_never", "joint_accuracy", "(never)"), ("dst", "transition_f1", "trans F1"),
               ("text", "Bleu_4", "BLEU-4")]
    table.add_column("dataset")
    for _, _, name in columns:
        table.add_column(name, justify="right")
    rows = [*metrics["datasets"].items(), ("mean", metrics["mean"])]
    for name, m in rows:
        values = [(m.get(group) or {}).get(key) for group, key, _ in columns]  # null blocks: no DST, no baseline
        table.add_row(name, *("-" if v is None else f"{v:.3f}" for v in values))
    console.print(table)


def score_file(predictions: Path, out: Path, sts_model: str = DEFAULT_STS_MODEL, console: Console | None = None, *,
               protocol: str = "proassist", dst_window_s: float = DST_WINDOW_S, embed=None) -> dict:
    """`dst score`: metrics from saved predictions, no model. The predictions are read and validated before
    anything is loaded or written: a file that cannot be scored raises PredictionsError/ScoringError and leaves an
    existing metrics.json as it was (the new one is written atomically, only when complete)."""
    dialogues = read_predictions(predictions)
    check_scorable(dialogues, protocol)
    # `embed`: an embedder of `sts_model` already loaded (re-scoring many files loads it once)
    metrics = score(dialogues, embed or load_embedder(sts_model), sts_model, protocol=protocol,
                    dst_window_s=dst_window_s)
    write_metrics(out, metrics)
    print_metrics(metrics, console or Console(), title=str(out))
    return metrics
