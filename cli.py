"""The `dst` command line. Each command parses its options into a frozen config and calls one `run(cfg)`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from pipeline.records import InputFileError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate SmolVLM2 as a proactive assistant with dialogue state tracking.")
console = Console()  # progress, skip lines and summaries
err_console = Console(stderr=True)  # fatal errors


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr and the exit code: 2 for bad options or unreadable inputs, 1 when the inputs were read
    but the run could not do its job (nothing usable, non-finite values)."""
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def labels(
    dst_json: Path = typer.Option(..., help="DST-augmented dialogues: a JSON list of video records."),
    frames_root: Path = typer.Option(..., help="ProAssist processed_data folder ({dataset}/frames/{name}.arrow)."),
    out: Path = typer.Option(..., help="Output parquet file, one row per (video, conversation, decision point)."),
    fps: float = typer.Option(2.0, help="Frame rate of the frames files."),
    strict: bool = typer.Option(False, help="Fail (exit 1, write nothing) if any record is unusable."),
) -> None:
    """Per-frame labels: DST update, DST state, speak and response at every decision point."""
    from pipeline import labels as labels_cmd
    from pipeline.checks import ConfigError

    try:
        labels_cmd.run(labels_cmd.LabelsConfig(dst_json, frames_root, out, fps, strict), console)
    except (ConfigError, InputFileError) as exc:
        _fail(str(exc))
    except labels_cmd.NoUsableRecords as exc:
        _fail(str(exc), 1)


@app.command()
def prepare(
    split: str = typer.Option(..., help="Split name; picks [splits.<split>] in the config file."),
    config: Path = typer.Option(None, help="Data config file (TOML). Default: configs/data.toml if it exists."),
    dst_json: list[Path] = typer.Option(None, help="DST-augmented dialogues (repeatable). Default: config file."),
    frames_root: Path = typer.Option(None, help="ProAssist processed_data folder ({dataset}/frames/{name}.arrow)."),
    videos_root: Path = typer.Option(None, help="Raw videos folder ({dataset}/{video_uid}.mp4), instead of frames."),
    model: str = typer.Option(None, help="SmolVLM2 hub id, local folder, or tiny-random."),
    out: Path = typer.Option(None, help="Output folder. Default: shards/<split>."),
    tokens_per_frame: str = typer.Option(None, help="1, 5 (default: mean + 2x2), 17 (mean + 4x4) or all."),
    fps: float = typer.Option(None, help="Frame rate of the stream (default 2)."),
    batch_size: int = typer.Option(None, help="Frames per encoder batch (default 32)."),
    device: str = typer.Option(None, help="auto (default), cpu, cuda, cuda:1 ..."),
    shard_size_mb: float = typer.Option(None, help="Target shard size in MiB (default 1024)."),
    strict: bool = typer.Option(None, "--strict/--no-strict", help="Fail if any record is unusable."),
    max_videos: int = typer.Option(None, help="Only the first N usable videos (for trials)."),
    workers: int = typer.Option(None, help="Processes that decode and resize frames ahead of the encoder "
                                           "(default min(4, CPUs - 1); 0: in the main process)."),
) -> None:
    """Frames -> SmolVLM2 vision embeddings -> WebDataset shards, with labels.parquet and manifest.json."""
    from pipeline import prepare as prepare_cmd
    from pipeline.config import ConfigError, resolve

    options = dict(dst_json=tuple(dst_json or ()), frames_root=frames_root, videos_root=videos_root, model=model,
                   out=out, tokens_per_frame=tokens_per_frame, fps=fps, batch_size=batch_size, device=device,
                   shard_size_mb=shard_size_mb, strict=strict, max_videos=max_videos, workers=workers)
    try:
        prepare_cmd.run(resolve(split, options, config), console)
    except (ConfigError, InputFileError, prepare_cmd.PlanMismatch, prepare_cmd.FrameFeedError) as exc:
        _fail(str(exc))
    except prepare_cmd.NoUsableRecords as exc:
        _fail(str(exc), 1)


@app.command()
def train(
    shards: Path = typer.Option(None, help="Training shards (dst prepare output)."),
    val_shards: Path = typer.Option(None, help="Validation shards: losses and decision P/R/F1 every eval_every."),
    model: str = typer.Option(None, help="SmolVLM2 hub id, local folder, or tiny-random (as in prepare)."),
    out: Path = typer.Option(None, help="Run folder."),
    config: Path = typer.Option(None, help="TOML file with a [train] table (every option below, and more)."),
    max_steps: int = typer.Option(None, help="Optimizer steps (default 1000)."),
    seed: int = typer.Option(None, help="Seed for data order, sampling and head initialisation."),
    variant: str = typer.Option(None, help="dst (default: the DST is the memory), summary (ProAssist's progress "
                                           "summary) or none; saved with the checkpoint."),
    resume: bool = typer.Option(None, "--resume/--no-resume", help="Continue exactly from RUN/checkpoints/last; "
                                                                   "start from step 0 when there is none yet."),
    lora: bool = typer.Option(None, "--lora/--full", help="LoRA on the text model (default) or full fine-tuning."),
    load_in_4bit: bool = typer.Option(None, "--load-in-4bit", help="4-bit base weights (bitsandbytes, CUDA only)."),
    precision: str = typer.Option(None, help="auto (bf16 on sm_80+, fp16 on older GPUs, fp32 on CPU), fp16, bf16, "
                                             "fp32."),
    batch_size: str = typer.Option(None, help="Tokens per micro-batch, or auto: the largest under "
                                              "--memory-fraction of the GPU."),
    memory_fraction: float = typer.Option(None, help="GPU memory share for --batch-size auto (default 0.9)."),
    max_seq_len: int = typer.Option(None, help="Longest window in tokens (default 4096)."),
    lr: float = typer.Option(None, help="Peak learning rate."),
    accumulation: int = typer.Option(None, help="Micro-batches per optimizer step."),
    decision_loss: str = typer.Option(None, help="focal (default), balanced_bce (ProAssist) or bce."),
    rho: float = typer.Option(None, help="Keep each negative decision with this probability (re-drawn per epoch)."),
    num_workers: int = typer.Option(None, help="Data loader worker processes."),
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:1 ..."),
    allow_other_model: bool = typer.Option(None, "--allow-other-model", help="Train another --model than the "
                                                                             "shards were prepared with."),
) -> None:
    """Train the decision heads, DST text and responses on prepared shards; checkpoints resume exactly."""
    from train import run as train_cmd
    from train.config import TrainConfigError, resolve
    from train.guards import NonFiniteError
    from train.run_folder import RunFolderError
    from pipeline.shard_index import ShardFormatError

    options = dict(shards=shards, val_shards=val_shards, model=model, out=out, max_steps=max_steps, seed=seed,
                   variant=variant, resume=resume, lora=lora, load_in_4bit=load_in_4bit or None, precision=precision,
                   batch_size=batch_size, memory_fraction=memory_fraction, max_seq_len=max_seq_len, lr=lr,
                   accumulation=accumulation, decision_loss=decision_loss, rho=rho, num_workers=num_workers,
                   device=device, allow_other_model=allow_other_model or None)
    try:
        train_cmd.run(resolve(options, config), console)
    except (TrainConfigError, FileNotFoundError, FileExistsError, RunFolderError, ShardFormatError) as exc:
        _fail(str(exc))
    except NonFiniteError as exc:
        _fail(str(exc), 1)


@app.command("eval")
def evaluate(
    shards: Path = typer.Option(..., help="Shards to evaluate on (dst prepare output)."),
    out: Path = typer.Option(..., help="Output folder: predictions.jsonl, metrics.json, report.html."),
    ckpt: Path = typer.Option(None, help="A checkpoint folder, e.g. RUN/checkpoints/last (not needed for "
                                         "oracle, never, periodic)."),
    mode: str = typer.Option("model", help="model | teacher-forced | oracle | never | periodic."),
    variant: str = typer.Option(None, help="dst | summary | none. Default: the checkpoint's (an explicit value "
                                           "must agree with it); dst for the baselines."),
    protocol: str = typer.Option("proassist", help="proassist: each conversation up to its last assistant turn "
                                                   "(ProAssist's evaluation); full-video: to the last frame."),
    theta_speak: float = typer.Option(0.5, help="Speak when p_speak exceeds this."),
    theta_update: float = typer.Option(0.5, help="Update the DST when p_update exceeds this."),
    sweep: bool = typer.Option(False, help="Pick per-dataset thresholds maximising F1 (writes thresholds.json)."),
    thresholds_from: Path = typer.Option(None, help="Apply a thresholds.json written by --sweep (val -> test)."),
    sts_model: str = typer.Option(None, help="Sentence-embedding model for matching (name or local folder). "
                                             "Default: sentence-transformers/all-mpnet-base-v2."),
    context_strategy: str = typer.Option("reseed", help="reseed (the variant's memory: DST, a generated summary, "
                                                        "or nothing, plus recent turns) | drop-all | drop-middle."),
    max_context: int = typer.Option(None, help="Tokens the KV cache may hold before the context strategy runs. "
                                               "Default: the checkpoint's training max_seq_len."),
    max_new_tokens: int = typer.Option(48, help="Longest generated response."),
    max_summary_tokens: int = typer.Option(160, help="Longest generated progress summary (summary variant)."),
    dst_window: float = typer.Option(2.0, help="DST update/transition matching window, seconds each side."),
    every: float = typer.Option(10.0, help="periodic mode: speak every this many seconds."),
    max_videos: int = typer.Option(None, help="Only the first N videos."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, ..."),
    batch_dialogues: int = typer.Option(1, help="Conversations streamed together (one forward per round); "
                                                "under torchrun, per process."),
) -> None:
    """Stream videos through a trained model with a KV cache and score it with ProAssist's metrics.
    Under `torchrun --nproc-per-node N --no-python dst eval ...` the ranks share the conversations."""
    from eval import evaluate as eval_cmd
    from eval.scoring import DEFAULT_STS_MODEL
    from eval.stream import StreamConfig

    stream = StreamConfig(mode=mode, theta_update=theta_update, theta_speak=theta_speak,
                          max_new_tokens=max_new_tokens, max_summary_tokens=max_summary_tokens,
                          context_strategy=context_strategy, protocol=protocol, every_s=every)
    cfg = eval_cmd.EvalConfig(shards=shards, out=out, ckpt=ckpt, stream=stream, variant=variant,
                              max_context=max_context, dst_window_s=dst_window, sweep=sweep,
                              thresholds_from=thresholds_from, sts_model=sts_model or DEFAULT_STS_MODEL,
                              max_videos=max_videos, device=device, batch_dialogues=batch_dialogues)
    from pipeline.shard_index import ShardFormatError

    try:
        eval_cmd.run(cfg, console)
    except (FileNotFoundError, ShardFormatError, eval_cmd.EvalError, eval_cmd.PredictionsError,
            eval_cmd.ScoringError) as exc:
        _fail(str(exc))


@app.command()
def score(
    predictions: Path = typer.Option(..., help="predictions.jsonl written by dst eval."),
    out: Path = typer.Option(..., help="metrics.json to write (replaced only when scoring succeeds)."),
    sts_model: str = typer.Option(None, help="Sentence-embedding model (name or local folder)."),
    protocol: str = typer.Option("proassist", help="proassist: each dialogue up to its last assistant turn "
                                                   "(ProAssist's protocol, comparable with the paper); full-video."),
    dst_window: float = typer.Option(2.0, help="DST update and transition matching window, seconds each side."),
) -> None:
    """Re-score saved predictions without a model."""
    import math

    from eval import evaluate as eval_cmd
    from eval.protocol import PROTOCOLS, ScoringError
    from eval.scoring import DEFAULT_STS_MODEL, PredictionsError

    if protocol not in PROTOCOLS:
        _fail(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if not math.isfinite(dst_window) or dst_window < 0:
        _fail(f"--dst-window must be a number of seconds >= 0, got {dst_window}")
    try:
        eval_cmd.score_file(predictions, out, sts_model or DEFAULT_STS_MODEL, console, protocol=protocol,
                            dst_window_s=dst_window)
    except (PredictionsError, ScoringError) as exc:
        _fail(str(exc))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Output folder: new or empty, or an earlier demo's (replaced)."),
    fast: bool = typer.Option(False, help="A smaller, quicker run (a smoke test)."),
    seed: int = typer.Option(0, help="Seed for the synthetic data and training."),
    variants: str = typer.Option("dst", help="Comma-separated variants to train and compare: dst, summary, none."),
    model: str = typer.Option("tiny-random", help="tiny-random (minutes) or smollm2-135m (real SmolLM2 language "
                                                  "weights, LoRA; 111 min on a busy 2-core CPU, see README)."),
) -> None:
    """Generate synthetic task videos, prepare, train, evaluate, and compare with the baselines."""
    from experiments import demo as demo_cmd
    from train.sequence import VARIANTS

    if model not in demo_cmd.MODELS:
        _fail(f"--model must be one of {demo_cmd.MODELS}, got {model!r}")
    chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
    if not chosen or any(v not in VARIANTS for v in chosen) or len(set(chosen)) != len(chosen):
        _fail(f"--variants must list distinct variants among {', '.join(VARIANTS)}, got {variants!r}")
    try:
        demo_cmd.run(demo_cmd.DemoConfig(out=out, fast=fast, seed=seed, variants=chosen, model=model), console)
    except demo_cmd.DemoFolderError as exc:
        _fail(str(exc))


@app.command()
def experiment(
    config: Path = typer.Option(..., help="Experiment file (TOML): data setting, shared train/eval settings, grid; "
                                          "see configs/experiments/ and docs/experiments.md."),
    out: Path = typer.Option(..., help="Output folder; rerunning the same command resumes a killed grid."),
    fast: bool = typer.Option(False, help="The config's [fast] sizes: a smoke test in minutes."),
    threads: int = typer.Option(None, help="CPU threads for torch (default: torch's choice). On a CPU shared with "
                                           "other jobs, 1 avoids thread oversubscription."),
    rescore: bool = typer.Option(False, help="Score every finished cell again from its saved predictions with "
                                             "this version's metrics (nothing is trained or streamed)."),
) -> None:
    """Prepare once, train and evaluate every cell of a grid over seeds; results.jsonl, summary.md, report.html."""
    from experiments import runner as experiment_cmd
    from experiments.grid import ExperimentConfigError

    try:
        experiment_cmd.run(experiment_cmd.ExperimentRunConfig(config=config, out=out, fast=fast, threads=threads,
                                                                  rescore=rescore),
                           console)
    except (ExperimentConfigError, experiment_cmd.ExperimentError) as exc:
        _fail(str(exc))


@app.command("synth-frames")
def synth_frames(
    dst_json: Path = typer.Option(..., help="DST-augmented dialogues: a JSON list of video records."),
    out: Path = typer.Option(..., help="Frames root to create ({dataset}/frames/{name}.arrow)."),
    fps: float = typer.Option(2.0, help="Frame rate of the files."),
    size: int = typer.Option(64, help="Picture side in pixels (ProAssist's are 384)."),
) -> None:
    """Write synthetic frames files covering each record's video, for trying the pipeline without real frames."""
    from synthetic import frames as synth_cmd
    from pipeline.checks import ConfigError

    try:
        synth_cmd.run(synth_cmd.SynthFramesConfig(dst_json, out, fps, size), console)
    except (ConfigError, InputFileError) as exc:
        _fail(str(exc))
    except synth_cmd.NothingWritten as exc:
        _fail(str(exc), 1)


if __name__ == "__main__":
    app()
