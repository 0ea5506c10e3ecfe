"""The `dst` command line. Each command parses its options into a frozen config and calls one `run(cfg)`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from pipeline.records import InputFileError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate SmolVLM2 as a proactive assistant with dialogue state tracking.")
console = Console()  # progress, skip lines and summaries
err_console = Console(stderr=True)  # fatal errors


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


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

    try:
        labels_cmd.run(labels_cmd.LabelsConfig(dst_json, frames_root, out, fps, strict), console)
    except InputFileError as exc:
        _fail(str(exc))


@app.command("synth-frames")
def synth_frames(
    dst_json: Path = typer.Option(..., help="DST-augmented dialogues: a JSON list of video records."),
    out: Path = typer.Option(..., help="Frames root to create ({dataset}/frames/{name}.arrow)."),
    fps: float = typer.Option(2.0, help="Frame rate of the files."),
    size: int = typer.Option(64, help="Picture side in pixels (ProAssist's are 384)."),
) -> None:
    """Write synthetic frames files covering each record's video, for trying the pipeline without real frames."""
    from pipeline import synth_frames as synth_cmd

    try:
        synth_cmd.run(synth_cmd.SynthFramesConfig(dst_json, out, fps, size), console)
    except InputFileError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    app()
