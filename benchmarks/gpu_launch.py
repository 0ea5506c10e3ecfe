"""The GPU check's worker: runs its steps' `dst` commands in one process and records what they cost.

    python benchmarks/gpu_launch.py --status-fd N [--cap-gib 24] [--no-flash] [--no-meteor] [--stand-in-coco]

It reads one step per line on stdin (`{"kind": "dst", "commands": [argument lists], "log": ..., "probe": ...}`
or `{"kind": "setup", "args": {...}, ...}`), runs each command through the real CLI (cli.py's app) and writes the
step's exit code to file descriptor N. One process for all steps imports torch and transformers once, not once
per step (seconds each); the orchestrator's side (benchmarks/gpu_worker.py) kills it with its process group when a
step runs past its time, and starts a fresh one for the next step.

At start, `--cap-gib` caps this process's CUDA memory with `set_per_process_memory_fraction` (a 24 GB Titan RTX
on a bigger card), `--no-flash` turns SDPA's flash kernel off (Turing has none), `--no-meteor` turns METEOR off
as if Java were missing, `--stand-in-coco` stands in for a missing pycocoevalcap. Timers wrap, without changing
them: `pipeline.prepare.encode_frames` (encoder seconds and frames), `train.run.train_loop` (the loop after the
batch-size search: its seconds and peak memory, the search's cached blocks released first) and
`eval.evaluate._dialogues` (streaming seconds, frames and conversations). One JSON line per finished command goes
to the step's probe file at once, so a step killed at its time limit keeps what it finished; a command that fails
stops its step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

GIB = 2**30
_probe: dict = {}


def _cuda() -> bool:
    return torch.cuda.is_available()


def _memory(prefix: str) -> dict:
    if not _cuda():
        return {}
    return {
        f"{prefix}peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        f"{prefix}peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
    }


def _wrap(module, name: str, around) -> None:
    """Replace module.name by around(original) when the name exists (other code may rename it: then no timer)."""
    original = getattr(module, name, None)
    if original is None:
        _probe.setdefault("missing_timers", []).append(f"{module.__name__}.{name}")
        return
    setattr(module, name, around(original))


def _timed_encode(original):
    def encode(model, pixel_values, *args, **kwargs):
        started = time.perf_counter()
        out = original(model, pixel_values, *args, **kwargs)  # returns CPU tensors: the GPU work is done
        timers = _probe.setdefault("prepare", {"encode_s": 0.0, "frames": 0})
        timers["encode_s"] += time.perf_counter() - started
        timers["frames"] += int(pixel_values.shape[0])
        return out

    return encode


def _timed_loop(original):
    def loop(cfg, runtime, *args, **kwargs):
        if _cuda():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the search's cached blocks are not the loop's
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        step = original(cfg, runtime, *args, **kwargs)
        if _cuda():
            torch.cuda.synchronize()
        _probe["train"] = {"loop_s": time.perf_counter() - started, "last_step": step, **_memory("loop_")}
        return step

    return loop


def _timed_dialogues(original):
    def dialogues(*args, **kwargs):
        started = time.perf_counter()
        records = original(*args, **kwargs)
        if records is not None:
            timers = _probe.setdefault("eval", {"stream_s": 0.0, "frames": 0, "conversations": 0})
            timers["stream_s"] += time.perf_counter() - started
            timers["frames"] += sum(len(r["frames"]) for r in records)
            timers["conversations"] += len(records)
        return records

    return dialogues


def stand_in_coco() -> None:
    """pycocoevalcap is missing (its wheel is over the carry limit): BLEU and CIDEr answer 0, so `dst eval` runs
    and its streaming rates are measured; its text scores are then not ProAssist's (the report says so)."""
    import types

    class Bleu:
        def __init__(self, n=4):
            self.n = n

        def compute_score(self, gts, res, verbose=0):
            return [0.0] * self.n, None

    class Cider:
        def compute_score(self, gts, res):
            return 0.0, None

    class Unavailable:  # METEOR and PTB need Java and the package's jars: the check turns them off anyway
        def __init__(self, *args, **kwargs):
            raise RuntimeError("pycocoevalcap stand-in: no METEOR/PTB")

    for name, attrs in {
        "pycocoevalcap": {},
        "pycocoevalcap.bleu": {},
        "pycocoevalcap.bleu.bleu": {"Bleu": Bleu},
        "pycocoevalcap.cider": {},
        "pycocoevalcap.cider.cider": {"Cider": Cider},
        "pycocoevalcap.meteor": {},
        "pycocoevalcap.meteor.meteor": {"Meteor": Unavailable},
        "pycocoevalcap.tokenizer": {},
        "pycocoevalcap.tokenizer.ptbtokenizer": {"PTBTokenizer": Unavailable},
    }.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def no_meteor() -> None:
    """METEOR starts a JVM per corpus (seconds): off, as without Java; the check measures throughput."""
    import eval.metrics_text

    eval.metrics_text.java_missing_reason = lambda: "off in the device check (it measures throughput)"


def install_timers() -> None:
    import eval.evaluate
    import pipeline.prepare
    import train.run

    _wrap(pipeline.prepare, "encode_frames", _timed_encode)
    _wrap(train.run, "train_loop", _timed_loop)
    _wrap(eval.evaluate, "_dialogues", _timed_dialogues)


def setup_device(cap_gib: float | None, no_flash: bool) -> dict:
    """The cap and the kernel choice, applied once for every command of the step; returns what was set."""
    info: dict = {"cuda": _cuda()}
    if not _cuda():
        return info
    total = torch.cuda.get_device_properties(0).total_memory
    info |= {
        "device_name": torch.cuda.get_device_name(0),
        "total_gib": total / GIB,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
    }
    if cap_gib is not None:
        fraction = min(1.0, cap_gib * GIB / total)
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        info |= {"cap_gib": cap_gib, "memory_fraction_set": fraction}
    if no_flash:
        torch.backends.cuda.enable_flash_sdp(False)  # mem-efficient and math SDPA stay, as on Turing
    info["flash_sdp"] = torch.backends.cuda.flash_sdp_enabled()
    return info


def run_command(argv: list[str]) -> dict:
    """One `dst` command through the real CLI; its exit code, wall time and timers."""
    from cli import app

    _probe.clear()
    gc.collect()  # the previous command's model and batches
    if _cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    error = None
    try:
        # not standalone: click returns typer.Exit's code (the CLI's error path) instead of exiting
        returned = app(args=argv, prog_name="dst", standalone_mode=False)
        code = returned if isinstance(returned, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # noqa: BLE001 - recorded for the report; the traceback goes to the step's log
        traceback.print_exc()
        code, error = 1, f"{type(exc).__name__}: {exc}"[:500]
    result = {
        "argv": argv,
        "rc": code,
        "error": error,
        "wall_s": time.perf_counter() - started,
        **_memory(""),
        **_probe,
    }
    if argv[0] == "train" and "--out" in argv:  # each run's pick: the resumed run searches again
        config = Path(argv[argv.index("--out") + 1]) / "config.json"
        if config.is_file():
            result["token_budget"] = json.loads(config.read_text()).get("token_budget")
    return result


def serve_one(request: dict, device: dict) -> int:
    """One step: its output to its log (file descriptors 1 and 2, so the children's output too), its commands'
    results to its probe file, one JSON line each as soon as it is known. Returns the step's exit code."""
    with open(request["log"], "a", encoding="utf-8") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    if request["kind"] == "setup":
        from real_shapes import setup

        try:
            report = setup(**{**request["args"], "out": Path(request["args"]["out"])})
        except Exception:  # noqa: BLE001 - the step fails; the traceback is in its log
            traceback.print_exc()
            return 1
        Path(request["probe"]).write_text(json.dumps(report, indent=1))
        return 0
    with open(request["probe"], "a", encoding="utf-8") as probe:
        probe.write(json.dumps({"device": device}) + "\n")
        probe.flush()
        for argv in request["commands"]:
            print(f"gpu_launch: dst {' '.join(argv)}", flush=True)
            result = run_command(argv)
            probe.write(json.dumps(result) + "\n")
            probe.flush()
            if result["rc"]:
                return result["rc"]
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status-fd", type=int, required=True, help="where each step's exit code is written")
    parser.add_argument("--cap-gib", type=float, default=None)
    parser.add_argument("--no-flash", action="store_true")
    parser.add_argument("--no-meteor", action="store_true")
    parser.add_argument("--stand-in-coco", action="store_true", help="pycocoevalcap is missing: BLEU/CIDEr give 0")
    args = parser.parse_args()
    device = setup_device(args.cap_gib, args.no_flash)
    if args.stand_in_coco:
        stand_in_coco()
    install_timers()
    if args.no_meteor:
        no_meteor()
    status = os.fdopen(args.status_fd, "w", buffering=1)
    for line in sys.stdin:  # one step per line, until the orchestrator closes the pipe
        code = serve_one(json.loads(line), device)
        sys.stdout.flush()
        sys.stderr.flush()
        status.write(json.dumps({"rc": code}) + "\n")


if __name__ == "__main__":
    main()
