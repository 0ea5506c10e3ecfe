"""The `dst` command line. Each command's options are derived from its frozen config dataclass (core/settings.py),
parsed into that config, and passed to one `run(cfg, console)`; errors end in one line and exit 2 (bad input or
settings) or 1 (unusable data)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

import pipeline.config
import train.config
from core.errors import EXIT_CODES
from core.settings import ConfigError, nest, options, required
from eval.config import EvalConfig, ScoreConfig
from eval.judge import JudgeConfig
from experiments.config import DemoConfig, ExperimentRunConfig
from pipeline.config import LabelsConfig, PrepareConfig
from synthetic.frames import SynthFramesConfig
from train.config import TrainConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train and evaluate SmolVLM2 as a proactive assistant with dialogue state tracking.",
)
console = Console()  # progress, skip lines and summaries
err_console = Console(stderr=True)  # fatal errors


def _fail(message: str, code: int) -> None:
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _flag(option) -> str:
    if option.flag:
        return option.flag
    name = "--" + option.name.replace("_", "-")
    return f"{name}/--no-{name[2:]}" if option.type is bool else name


def _build_plain(config: type) -> Callable[[dict, Path | None], object]:
    def build(values: dict, _file: Path | None):
        missing = [name for name in required(config) if values.get((name,)) in (None, [])]
        if missing:
            raise ConfigError(f"--{missing[0].replace('_', '-')} is required")
        return nest(config, {path: tuple(v) if isinstance(v, list) else v for path, v in values.items()})

    return build


def _by_name(resolve: Callable) -> Callable[[dict, Path | None], object]:
    """A config-file command's resolver takes options by name (None = not given)."""
    return lambda values, file: resolve(
        {path[-1]: tuple(v) if isinstance(v, list) else v for path, v in values.items()}, file
    )


def command(
    name: str, config: type, target: str, doc: str, build: Callable | None = None, config_file: str | None = None
) -> None:
    """Register `dst {name}`: one option per declared field of `config` (None when not given, so the config's own
    default applies), `--config` for commands that read a config file, then `target` ("module:function")."""
    opts = options(config)
    params = [
        inspect.Parameter(
            o.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[o.type],  # noqa: UP045 - built at run time, where Optional is the plain form
            default=typer.Option(None, _flag(o), help=o.help, show_default=False),
        )
        for o in opts
    ]
    if config_file:
        params.append(
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Optional[Path],  # noqa: UP045 - as above
                default=typer.Option(None, "--config", help=config_file),
            )
        )
    build = build or _build_plain(config)

    def run_command(**kwargs) -> None:
        file = kwargs.pop("config") if config_file else None
        try:
            cfg = build({o.path: kwargs[o.name] for o in opts}, file)
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(cfg, console)
        except tuple(base for base, _ in EXIT_CODES) as exc:
            _fail(str(exc), next(code for base, code in EXIT_CODES if isinstance(exc, base)))

    run_command.__signature__ = inspect.Signature(params)
    run_command.__doc__ = doc
    app.command(name)(run_command)


_DATA_FILE = "Data config file (TOML). Default: configs/data.toml if it exists."
_TRAIN_FILE = "TOML file with a [train] table (any of these settings, and dataset_weights)."
_EVAL_DOC = (
    "Stream videos through a trained model with a KV cache and score it with ProAssist's metrics. Under "
    "`torchrun --nproc-per-node N --no-python dst eval ...` the ranks share the conversations."
)
# name, config, target, help, (options -> config, --config help) for the commands that read a config file
COMMANDS = [
    ("labels", LabelsConfig, "pipeline.labels:run", "Per-frame labels: DST update, DST state, speak and response."),
    (
        "prepare",
        PrepareConfig,
        "pipeline.prepare:run",
        "Frames -> SmolVLM2 vision embeddings -> WebDataset shards.",
        _by_name(lambda options, file: pipeline.config.resolve(options.get("split"), options, file)),
        _DATA_FILE,
    ),
    (
        "train",
        TrainConfig,
        "train.run:run",
        "Train the decision heads, DST text and responses; resumes exactly.",
        _by_name(train.config.resolve),
        _TRAIN_FILE,
    ),
    ("eval", EvalConfig, "eval.evaluate:run", _EVAL_DOC),
    ("score", ScoreConfig, "eval.evaluate:score_file", "Re-score saved predictions without a model."),
    ("judge", JudgeConfig, "eval.judge:run", "ProAssist's LLM judge on saved predictions: judge.json."),
    ("demo", DemoConfig, "experiments.demo:run", "Synthetic task videos through prepare, train, eval, and baselines."),
    ("experiment", ExperimentRunConfig, "experiments.runner:run", "Train and evaluate a grid of cells over seeds."),
    ("synth-frames", SynthFramesConfig, "synthetic.frames:run", "Synthetic frames files for trying the pipeline."),
]
for spec in COMMANDS:
    command(*spec)

if __name__ == "__main__":
    app()
