"""The settings of `dst experiment` and `dst demo`, declared once (core/settings.py). The experiment file itself
(TOML: data, shared settings, grid) is read by experiments/grid.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.settings import ConfigError, check, setting
from train.variants import NAMES

MODELS = ("tiny-random", "smollm2-135m")


@dataclass(frozen=True)
class ExperimentRunConfig:
    config: Path = setting(
        help="Experiment file (TOML): data setting, shared train/eval settings, grid; see "
        "configs/experiments/ and docs/experiments.md."
    )
    out: Path = setting(help="Output folder; rerunning the same command resumes a killed grid.")
    fast: bool = setting(False, "The config's [fast] sizes: a smoke test in minutes.")
    threads: int | None = setting(
        None,
        "CPU threads for torch (default: torch's choice). On a CPU shared with "
        "other jobs, 1 avoids thread oversubscription.",
        minimum=1,
    )
    rescore: bool = setting(
        False,
        "Score every finished cell again from its saved predictions with this "
        "version's metrics (nothing is trained or streamed).",
    )
    jobs: int = setting(
        1,
        "Independent training runs (and their cells) in this many parallel processes, one torch "
        "thread each unless --threads; the same results as --jobs 1 --threads 1.",
        minimum=1,
    )

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class DemoConfig:
    out: Path = setting(Path("demo"), "Output folder: new or empty, or an earlier demo's (replaced).")
    fast: bool = setting(False, "A smaller, quicker run (a smoke test).")
    seed: int = setting(0, "Seed for the synthetic data and training.", minimum=0)
    variants: str = setting("dst", "Comma-separated variants to train and compare: dst, summary, none.")
    model: str = setting(
        "tiny-random",
        "tiny-random (minutes) or smollm2-135m (real SmolLM2 language weights, "
        "LoRA; 111 min on a busy 2-core CPU, see README).",
        choices=MODELS,
    )

    def __post_init__(self):
        check(self)
        chosen = self.variant_list
        if not chosen or any(v not in NAMES for v in chosen) or len(set(chosen)) != len(chosen):
            raise ConfigError(f"variants must list distinct variants among {', '.join(NAMES)}, got {self.variants!r}")

    @property
    def variant_list(self) -> tuple[str, ...]:
        return tuple(v.strip() for v in self.variants.split(",") if v.strip())
