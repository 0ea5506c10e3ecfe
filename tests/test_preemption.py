"""SIGTERM to the whole process group (what SLURM sends) while DataLoader workers run, and the README's SLURM
recipe run command for command: a hard kill before the first checkpoint, a signal, a requeue, the finish."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DST = str(Path(sys.executable).with_name("dst"))
README = Path(__file__).parent.parent / "README.md"
COMMON = {
    "model": "tiny-random",
    "batch_size": "600",
    "max_seq_len": 300,
    "log_every": 1,
    "save_every": 100,
    "warmup_steps": 5,
    "lr": 3e-3,
}


def write_config(path: Path, **values) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[train]\n"
        + "".join(f"{k} = {json.dumps(v if not isinstance(v, Path) else str(v))}\n" for k, v in values.items())
    )
    return path


def steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the process ended (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """Processes of a process group, from /proc (the comm field may hold spaces: parse after its ')')."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_sigterm_to_the_process_group_with_workers_saves_and_resumes(tiny_shards, tmp_path):
    config = write_config(
        tmp_path / "train.toml", shards=tiny_shards, out=tmp_path / "run", max_steps=12, num_workers=2, **COMMON
    )
    run = tmp_path / "run"
    log = open(tmp_path / "out.log", "w")
    proc = subprocess.Popen(
        [DST, "train", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_for(lambda: len(steps_logged(run)) >= 2, "two logged steps", proc)
    assert len(group_members(proc.pid)) >= 3  # the main process and its two DataLoader workers
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    output = " ".join((tmp_path / "out.log").read_text().split())
    stopped = json.loads((run / "preempted.json").read_text())["step"]
    assert f"SIGTERM: saving a checkpoint at step {stopped} and stopping" in output and "Traceback" not in output
    assert 2 <= stopped < 12 and (run / "checkpoints" / "last").resolve().name == f"step-{stopped:06d}"
    deadline = time.time() + 20
    while group_members(proc.pid) and time.time() < deadline:  # workers leave with the main process
        time.sleep(0.1)
    assert group_members(proc.pid) == []

    subprocess.run([DST, "train", "--config", str(config), "--resume"], check=True, capture_output=True)
    assert steps_logged(run) == list(range(1, 13)) and not (run / "preempted.json").exists()
    trainer = json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())
    assert trainer["step"] == 12


FAKE_SRUN = """#!{python}
import os, sys
os.setsid()  # like a job step: its own process group, apart from the batch shell
open(os.path.join(os.environ["FAKE_SLURM"], "step.pgid"), "w").write(str(os.getpid()))
os.execvp(sys.argv[1], sys.argv[1:])
"""
FAKE_TORCHRUN = """#!/bin/bash
# one process in place of torchrun's workers: drop the launcher options, run what follows --no-python
while [ "$1" != "--no-python" ]; do shift; done; shift
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_SLURM/scontrol.log"
"""


def readme_recipe() -> str:
    script = re.search(r"```bash\n(#!/bin/bash\n#SBATCH.*?)```", README.read_text(), re.S).group(1)
    assert "dst train --config configs/train.toml --resume" in script
    return script


def test_readme_recipe_uses_valid_torchrun_options():
    from torch.distributed.run import get_args_parser

    line = next(x for x in readme_recipe().splitlines() if x.startswith("srun torchrun"))
    launcher = line.split()[2 : line.split().index("--no-python") + 1]
    args = get_args_parser().parse_args(launcher + ["dst"])
    assert (args.nproc_per_node, args.shutdown_timeout, args.no_python) == ("2", 240, True)


@pytest.fixture
def job(tmp_path, tiny_shards):
    """A job folder as on the cluster (the recipe runs from the project folder), with fake srun, torchrun and
    scontrol on the PATH and the run folder the recipe names."""
    job = tmp_path / "job"
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    for name, text in (
        ("srun", FAKE_SRUN.format(python=sys.executable)),
        ("torchrun", FAKE_TORCHRUN),
        ("scontrol", FAKE_SCONTROL),
    ):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (job / ".venv" / "bin").mkdir(parents=True)
    (job / ".venv" / "bin" / "activate").write_text(f'export PATH="{fake}:{Path(sys.executable).parent}:$PATH"\n')
    write_config(
        job / "configs" / "train.toml",
        shards=tiny_shards,
        out="../runs/256m-lora",
        max_steps=10,
        num_workers=1,
        **COMMON,
    )
    (job / "job.sh").write_text(readme_recipe())
    env = {**os.environ, "FAKE_SLURM": str(tmp_path), "SLURM_JOB_ID": "4242", "OMP_NUM_THREADS": "1"}
    return job, env, tmp_path


def start_job(job: Path, env: dict, attempt: int) -> subprocess.Popen:
    (Path(env["FAKE_SLURM"]) / "step.pgid").unlink(missing_ok=True)
    out = open(job.parent / f"attempt-{attempt}.log", "w")
    return subprocess.Popen(["bash", "job.sh"], cwd=job, env=env, stdout=out, stderr=subprocess.STDOUT)


def step_pgid(fake_slurm: Path, proc: subprocess.Popen) -> int:
    wait_for(lambda: (fake_slurm / "step.pgid").exists(), "the job step", proc)
    return int((fake_slurm / "step.pgid").read_text())


def test_readme_slurm_recipe_as_written(job):
    job, env, fake_slurm = job
    run = job / "runs" / "256m-lora"
    requeues = fake_slurm / "scontrol.log"

    # 1. killed outright before the first checkpoint (node failure; SLURM requeues such a job by itself)
    proc = start_job(job, env, 1)
    pgid = step_pgid(fake_slurm, proc)
    wait_for(lambda: len(steps_logged(run)) >= 1, "a logged step", proc)
    os.killpg(pgid, signal.SIGKILL)
    assert proc.wait(timeout=60) == 128 + signal.SIGKILL
    assert not requeues.exists() and not (run / "checkpoints" / "last").exists()
    first_attempt = (run / "metrics.jsonl").read_text()

    # 2. the same script again: starts from step 0, keeps the first attempt's metrics; then SLURM's signal
    proc = start_job(job, env, 2)
    pgid = step_pgid(fake_slurm, proc)
    wait_for(
        lambda: (run / "metrics.jsonl.restart.1").exists() and len(steps_logged(run)) >= 2,
        "two logged steps of the new attempt",
        proc,
    )
    assert len(group_members(pgid)) >= 2  # dst train and its DataLoader worker
    os.killpg(pgid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = " ".join((job.parent / "attempt-2.log").read_text().split())
    assert (
        "no checkpoint yet: starting from step 0; the earlier attempt's metrics are in metrics.jsonl.restart.1" in log
    )
    assert (run / "metrics.jsonl.restart.1").read_text() == first_attempt
    stopped = json.loads((run / "preempted.json").read_text())["step"]
    assert requeues.read_text() == "requeue 4242\n" and stopped >= 2

    # 3. the requeued job resumes and finishes; a finished run is not requeued
    proc = start_job(job, env, 3)
    assert proc.wait(timeout=300) == 0, (job.parent / "attempt-3.log").read_text()[-2000:]
    assert requeues.read_text() == "requeue 4242\n" and not (run / "preempted.json").exists()
    assert steps_logged(run) == list(range(1, 11))
    assert json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())["step"] == 10
