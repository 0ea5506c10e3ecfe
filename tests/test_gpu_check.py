"""benchmarks/gpu_check.sh, the device check: its --cpu-smoke mode runs every step of the table with the tiny model
and writes only under --out; its time table fits the limit; a step past its time is reported, not dropped; its
GPU commands parse; its package survey and report read what they are given."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_deps  # noqa: E402
import gpu_report  # noqa: E402

STATUSES = {"ok", "failed", "timed_out", "skipped"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )


def repo_state() -> tuple[str, str]:
    """Everything git sees in the checkout, ignored files included, and the tracked files' changes."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    return git("status", "--porcelain", "--ignored", "--untracked-files=all"), git("diff", "HEAD")


def processes_in(folder: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found.append(proc.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.mark.parametrize("mode", list(gpu_check.STEPS))
def test_budgets_add_up_to_less_than_the_limit(mode):
    budgets = [seconds for _, seconds in gpu_check.STEPS[mode]]
    assert sum(budgets) + gpu_check.REPORT_S <= gpu_check.LIMIT_S[mode]
    assert gpu_check.LIMIT_S["gpu"] <= 9 * 60 and all(b > 0 for b in budgets)


def test_cpu_smoke_reports_every_step_and_writes_only_under_out(tmp_path):
    out = tmp_path / "check"
    before = repo_state()
    proc = run("--out", str(out), "--cpu-smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert repo_state() == before  # nothing in the checkout changed, not even an ignored file
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "steps", "work"]
    report = json.loads((out / "gpu_check.json").read_text())
    table = dict(gpu_check.STEPS["cpu-smoke"])
    assert [(s["name"], s["budget_s"]) for s in report["steps"]] == list(table.items())
    assert {s["status"] for s in report["steps"]} == {"ok"}, [s.get("log_tail") for s in report["steps"]]
    assert report["budgets_total_s"] == sum(table.values()) <= report["limit_s"] - gpu_check.REPORT_S
    assert report["elapsed_s"] < report["limit_s"]
    tiny = report["summary"]["tiny"]
    manifest = json.loads((out / "work" / "shards" / "tiny" / "manifest.json").read_text())
    assert tiny["prepare"]["frames"] == manifest["counts"]["frames"] > 0  # every frame the shards hold was timed
    assert tiny["train"]["resumed"] is True and tiny["train"]["steps_logged"] == [1, 2, 3, 4, 5, 6]
    assert tiny["train"]["token_budget"] == 4096  # the CPU's default budget for --batch-size auto
    assert tiny["train-full"]["steps_logged"] == [1, 2]
    assert [b["batch"] for b in tiny["eval"]["batches"]] == [1, 8, 16]
    assert all(b["rc"] == 0 and b["conversations"] == 3 and b["frames_per_s"] > 0 for b in tiny["eval"]["batches"])
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("# CPU smoke run of the device check (tiny model: not measurements)")
    assert (
        "picked 4096 then 4096 tokens" in markdown
        and "resume continued (steps [1, 2, 3, 4, 5, 6])" in markdown
        and "`--batch-dialogues 16`" in markdown
    )
    assert not processes_in(out)


def test_a_step_past_its_time_is_reported_and_its_dependents_skipped(tmp_path):
    out = tmp_path / "check"
    proc = run("--out", str(out), "--cpu-smoke", "--budget", "setup=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in steps] == [
        ("deps", "ok"),
        ("setup", "timed_out"),
        ("prepare-tiny", "skipped"),
        ("train-tiny", "skipped"),
        ("train-full-tiny", "skipped"),
        ("eval-tiny", "skipped"),
    ]
    assert steps[1]["reason"] == "ran past its 0.5 s"
    assert steps[4]["reason"] == "needs prepare-tiny, which ended skipped"
    assert "| setup | 0.5 | " in (out / "gpu_check.md").read_text()
    assert not processes_in(out)  # the worker and its children were killed with their group


def test_refuses_an_out_that_holds_files_or_a_longer_budget(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    proc = run("--out", str(tmp_path), "--cpu-smoke")
    assert proc.returncode != 0 and "is not empty; give a new folder" in proc.stderr
    proc = run("--out", str(tmp_path / "new"), "--cpu-smoke", "--budget", "setup=999")
    assert proc.returncode != 0 and "--budget setup=999" in proc.stderr and not (tmp_path / "new").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the real check would start")
def test_without_a_gpu_it_says_so(tmp_path):
    proc = run("--out", str(tmp_path / "x"))
    assert proc.returncode != 0 and "no CUDA GPU here; --cpu-smoke" in proc.stderr


def test_gpu_commands_parse_as_the_cli_options(tmp_path):
    """The GPU steps' argument lists (never run here) name real options with valid values."""
    import cli

    args = type("Args", (), {"out": tmp_path, "cap_gib": 24.0, "wheels": None, "tokenizer": None})()
    ctx = gpu_check.Context(args, "gpu")
    ctx.setup = {
        "data": {"dst_json": "d.json", "frames_root": "f"},
        "sts_model": "st",
        "models": {s: {"folder": f"models/{s}"} for s in ctx.shapes()},
    }
    group = typer.main.get_command(cli.app)
    seen = []
    for name, _ in gpu_check.STEPS["gpu"]:
        kind, shape = gpu_check.split(name)
        if kind in gpu_check.NEEDS:
            for argv in gpu_check.commands(kind, shape, ctx):
                command = group.commands[argv[0]]
                command.make_context(argv[0], list(argv[1:]))  # raises on an unknown option or a bad value
                seen.append(argv)
    assert ctx.shapes() == ["256M", "2.2B", "500M"]
    assert len(seen) == 3 * (1 + 2 + 3) + 1
    assert seen[1][seen[1].index("--precision") + 1] == "fp16" and "--resume" in seen[2]
    assert [a[a.index("--batch-dialogues") + 1] for a in seen if a[0] == "eval"][:3] == ["1", "8", "16"]


def test_package_survey_names_the_wheels_and_what_they_weigh(tmp_path):
    pins = gpu_deps.pins()
    assert pins["torch"] == "2.13.0" and pins["polars"] == "2.1.0"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(pins) == {re.split(r"[=<>\[ ]", d)[0] for d in declared} | {"torch"}  # every runtime pin, torch too
    for name in ("webdataset-1.0.2-py3-none-any.whl", "braceexpand-0.1.7-py2.py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    rows = {r["package"]: r for r in gpu_deps.survey([], tmp_path)}  # an empty path: nothing is installed
    assert {r["state"] for r in rows.values()} == {"missing"}
    assert rows["polars"]["wheels"] == ["polars==2.1.0", "polars-runtime-32==2.1.0"]
    assert rows["polars"]["wheel_mb"] == 54.8 and rows["torch"]["wheel_mb"] is None
    assert rows["webdataset"]["in_wheels_dir"] is True and rows["polars"]["in_wheels_dir"] is False
    here = {r["package"]: r for r in gpu_deps.survey(sys.path, None)}
    assert here["torch"]["state"] == "ok"  # 2.13.0+cpu satisfies the pin 2.13.0


def test_train_summary_compares_the_peak_with_the_memory_fraction():
    commands = [
        {"rc": 0, "train": {"last_step": 4, "loop_peak_reserved_gib": 20.0}, "token_budget": 65536},
        {"rc": 0, "train": {"last_step": 6, "loop_peak_reserved_gib": 23.0}, "token_budget": 61440},
    ]
    logged = [
        {
            "step": k,
            "loss": 1.0,
            "tokens_per_s": 1000.0 * k,
            "skipped_steps": min(k, 2) if k <= 4 else 1,
            "loss_scale": 16384.0,
            "nonfinite_forwards": 0,
        }
        for k in range(1, 7)
    ]
    step = {"status": "ok", "commands": commands, "runs": {"token_budget": 65536, "steps": logged}}
    got = gpu_report._train_summary(step, cap_gib=24.0)
    assert got["tokens_per_s"] == 4000.0  # median of steps 2-6
    assert got["skipped_steps"] == 3  # 2 in the first process, 1 after the resume
    assert got["peak_reserved_gib"] == 23.0 and not got["peak_within_memory_fraction"]
    assert got["resumed"] is True and got["loss_scale"] == 16384.0
    row = gpu_report._rows("256M", "train", got)[0]
    assert "(96% of the cap: OVER 90%)" in row and "picked 65536 then 61440 tokens; 4,000 tokens/s" in row


def test_wheels_found_in_the_folder_are_installed_into_out(tmp_path):
    """--wheels: a missing pin's wheel is pip-installed (offline) under OUT/site, where the later steps look first."""
    import zipfile

    wheel = tmp_path / "wheels" / "braceexpand-0.1.7-py3-none-any.whl"
    wheel.parent.mkdir()
    info = "braceexpand-0.1.7.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("braceexpand.py", "VALUE = 1\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: braceexpand\nVersion: 0.1.7\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"braceexpand.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    rows = [{"package": "braceexpand", "state": "missing", "wheels": ["braceexpand==0.1.7"], "in_wheels_dir": True}]
    site = tmp_path / "out" / "site"
    files, _ = gpu_deps.install(wheel.parent, rows, site, timeout=120)
    assert files == [str(wheel)] and (site / "braceexpand.py").read_text() == "VALUE = 1\n"
    assert gpu_deps.installed("braceexpand", [str(site)]) == "0.1.7"
