"""The GPU check's results: what each step's commands measured, per shape, as JSON and as a markdown report."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

MEMORY_SHARE = 0.9  # `dst train --memory-fraction`: the peak should stay under this share of the (capped) card


def cuda_available() -> bool:
    import torch  # here: the orchestrator needs torch for this question only

    return torch.cuda.is_available()


def commit(root: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def train_runs(run: Path) -> dict | None:
    """What a `dst train` run folder says: the token budget it picked and its logged steps."""
    if not (run / "config.json").is_file():
        return None
    config = json.loads((run / "config.json").read_text())
    lines = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").is_file()
        else []
    )
    steps = [line for line in lines if "tokens_per_s" in line]
    return {
        "token_budget": config.get("token_budget"),
        "precision": config.get("precision"),
        "max_seq_len": config["config"]["max_seq_len"],
        "lora": config["config"]["lora"],
        "steps": [
            {
                k: line.get(k)
                for k in ("step", "loss", "tokens_per_s", "skipped_steps", "loss_scale", "nonfinite_forwards")
            }
            for line in steps
        ],
        "checkpoints": sorted(p.name for p in (run / "checkpoints").glob("step-*")),
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _train_summary(step: dict, cap_gib: float | None) -> dict:
    runs, commands = step.get("runs") or {}, step.get("commands", [])
    logged = runs.get("steps", [])
    # step 1 includes the first kernels' start-up: the rate is the median of the later steps
    rates = [s["tokens_per_s"] for s in logged if s["step"] > 1 and s["tokens_per_s"]]
    peaks = [c["train"]["loop_peak_reserved_gib"] for c in commands if "loop_peak_reserved_gib" in c.get("train", {})]
    # each `dst train` process counts its own skipped steps: add the first run's count at its last step
    first_end = commands[0].get("train", {}).get("last_step") if len(commands) == 2 else None
    segments = [s for s in logged if s["step"] == first_end] + logged[-1:]
    skipped = [s["skipped_steps"] for s in segments if s.get("skipped_steps") is not None]
    out = {
        "status": step["status"],
        "token_budget": runs.get("token_budget"),
        "token_budgets": [c.get("token_budget") for c in commands],
        "tokens_per_s": _median(rates),
        "skipped_steps": sum(skipped) if skipped else None,
        "loss_scale": logged[-1].get("loss_scale") if logged else None,
        "nonfinite_forwards": sum(s.get("nonfinite_forwards") or 0 for s in segments),
        "steps_logged": [s["step"] for s in logged],
        "peak_reserved_gib": max(peaks) if peaks else None,
    }
    if cap_gib and out["peak_reserved_gib"] is not None:
        out["peak_share_of_cap"] = out["peak_reserved_gib"] / cap_gib
        out["peak_within_memory_fraction"] = out["peak_share_of_cap"] <= MEMORY_SHARE
    if len(commands) == 2:  # the resume: it went on from the first run's last checkpoint, one line per step
        out["resumed"] = (
            commands[1]["rc"] == 0
            and first_end is not None
            and [s["step"] for s in logged] == list(range(1, len(logged) + 1))
            and logged[-1]["step"] > first_end
        )
    return out


def summary(report: dict) -> dict:
    """Per shape: prepare, train (LoRA; full), eval rows, from the steps' probes."""
    shapes: dict[str, dict] = {}
    for step in report["steps"]:
        kind, _, shape = step["name"].rpartition("-")
        if not kind:
            continue
        row = shapes.setdefault(shape, {})
        if step["status"] in ("skipped",) or not step.get("commands"):
            row[kind] = {"status": step["status"], "reason": step.get("reason")}
            continue
        if kind == "prepare":
            c = step["commands"][0]
            p = c.get("prepare", {})
            row[kind] = {
                "status": step["status"],
                "frames": p.get("frames"),
                "encoder_frames_per_s": p["frames"] / p["encode_s"] if p.get("encode_s") else None,
                "command_frames_per_s": p["frames"] / c["wall_s"] if p.get("frames") else None,
                "peak_reserved_gib": c.get("peak_reserved_gib"),
            }
        elif kind.startswith("train"):
            row[kind] = _train_summary(step, report.get("cap_gib"))
        elif kind == "eval":
            rows = []
            for c in step["commands"]:
                e = c.get("eval", {})
                batch = int(c["argv"][c["argv"].index("--batch-dialogues") + 1])
                rows.append(
                    {
                        "batch": batch,
                        "rc": c["rc"],
                        "conversations": e.get("conversations"),
                        "frames": e.get("frames"),
                        "stream_s": e.get("stream_s"),
                        "frames_per_s": e["frames"] / e["stream_s"] if e.get("stream_s") else None,
                        "conversations_per_s": e["conversations"] / e["stream_s"] if e.get("stream_s") else None,
                        "peak_reserved_gib": c.get("peak_reserved_gib"),
                    }
                )
            row[kind] = {"status": step["status"], "batches": rows}
    return shapes


def _f(value, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def markdown(report: dict) -> str:
    smoke = report["mode"] == "cpu-smoke"
    device = next((s["device"] for s in report["steps"] if s.get("device")), None) or {}
    title = (
        "CPU smoke run of the device check (tiny model: not measurements)"
        if smoke
        else f"Device check on {device.get('device_name', 'a GPU')} ({_f(device.get('total_gib'), '.0f')} GiB, capped "
        f"to {report['cap_gib']:g} GiB, flash SDPA {'on' if device.get('flash_sdp') else 'off'})"
    )
    out = [
        f"# {title}",
        "",
        f"commit {report['commit']}; {report['elapsed_s']:.0f} s of the {report['limit_s']} s "
        f"limit; step budgets add up to {report['budgets_total_s']} s.",
        "",
    ]
    out += [f"> {note}" for note in report["notes"]] + [""]
    out += ["| step | budget s | took s | status | note |", "|---|---|---|---|---|"]
    for s in report["steps"]:
        note = s.get("reason") or (
            "; ".join(f"rc {c['rc']}: {c['error']}" for c in s.get("commands", []) if c.get("rc")) or ""
        )
        out.append(f"| {s['name']} | {s['budget_s']:g} | {_f(s.get('elapsed_s'))} | {s['status']} | {note} |")
    out += ["", "| shape | what | result |", "|---|---|---|"]
    setup = next((s.get("setup") for s in report["steps"] if s["name"] == "setup"), None) or {}
    for shape, row in report["summary"].items():
        model = setup.get("models", {}).get(shape)
        if model:
            out.append(
                f"| {shape} | model | "
                + (
                    f"{model['text_layers']} of {model['text_layers_real']} text layers, {model['vision_layers']} of "
                    f"{model['vision_layers_real']} vision layers, {model['tokens_per_frame']} tokens/frame, "
                    f"{model['parameters'] / 1e6:,.0f}M parameters"
                    if "text_layers" in model
                    else f"{model['folder']}, {model['tokens_per_frame']} tokens/frame"
                )
                + " |"
            )
        for kind, r in row.items():
            out += _rows(shape, kind, r)
    deps = next((s.get("deps") for s in report["steps"] if s["name"] == "deps"), None)
    if deps:
        from gpu_deps import lines

        out += ["", "Packages against pyproject.toml's pins:", ""] + [f"- {line}" for line in lines(deps)]
    if setup.get("tokenizer"):
        out += [
            "",
            f"Tokenizer: {setup['tokenizer']}"
            + (f" ({setup['tokenizer_missing']})" if setup.get("tokenizer_missing") else ""),
        ]
    return "\n".join(out) + "\n"


def _rows(shape: str, kind: str, r: dict) -> list[str]:
    if "reason" in r and len(r) == 2:
        return [f"| {shape} | {kind} | {r['status']}: {r['reason']} |"]
    if kind == "prepare":
        return [
            f"| {shape} | dst prepare | {r['status']}; {r['frames']} frames; encoder "
            f"{_f(r['encoder_frames_per_s'])} frames/s, whole command {_f(r['command_frames_per_s'])} frames/s; "
            f"peak {_f(r['peak_reserved_gib'], '.2f')} GiB reserved |"
        ]
    if kind.startswith("train"):
        share = (
            f" ({r['peak_share_of_cap']:.0%} of the cap: "
            f"{'within' if r['peak_within_memory_fraction'] else 'OVER'} 90%)"
            if "peak_share_of_cap" in r
            else ""
        )
        resumed = (
            ""
            if "resumed" not in r
            else f"; resume {'continued' if r['resumed'] else 'DID NOT continue'} (steps {r['steps_logged']})"
        )
        picks = " then ".join(str(b) for b in r["token_budgets"] if b is not None) or r["token_budget"]
        return [
            f"| {shape} | dst {kind} ({'full' if 'full' in kind else 'LoRA'}) | {r['status']}; "
            f"`--batch-size auto` picked {picks} tokens; {_f(r['tokens_per_s'], ',.0f')} tokens/s; "
            f"loop peak {_f(r['peak_reserved_gib'], '.2f')} GiB reserved{share}; skipped fp16 steps "
            f"{_f(r['skipped_steps'], 'd')}, loss scale {_f(r['loss_scale'], 'g')}{resumed} |"
        ]
    return [
        f"| {shape} | dst eval `--batch-dialogues {b['batch']}` | {b['conversations']} conversations, "
        f"{b['frames']} frames: {_f(b['frames_per_s'])} frames/s streamed, "
        f"{_f(b['conversations_per_s'], '.2f')} conversations/s; peak {_f(b['peak_reserved_gib'], '.2f')} GiB |"
        for b in r["batches"]
    ] or [f"| {shape} | dst eval | {r['status']} |"]
