"""The GPU check's side of its worker process (benchmarks/gpu_launch.py): start it, hand it a step, wait for the
step's exit code at most the step's budget, kill it with its process group past that."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


class Worker:
    """benchmarks/gpu_launch.py, the process the steps run in: started at the first step that needs it (that
    step's budget pays for its imports), killed with its process group when a step runs out of time or it dies,
    and started afresh for the next step. `settings()` gives (environment, flags) at each start."""

    def __init__(self, logs: Path, cwd: Path, settings: Callable[[], tuple[dict, list[str]]]):
        self.logs, self.cwd, self.settings, self.proc, self.started = logs, cwd, settings, None, 0

    def _start(self) -> None:
        read, write = os.pipe()
        env, flags = self.settings()
        launcher = Path(__file__).resolve().parent / "gpu_launch.py"
        argv = [sys.executable, str(launcher), "--status-fd", str(write), *flags]
        self.started += 1
        with open(self.logs / f"worker-{self.started}.log", "w", encoding="utf-8") as log:
            # its own process group: the DataLoader and frame feeder workers die with it
            self.proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(write,),
                text=True,
                start_new_session=True,
            )
        os.close(write)
        self.status = os.fdopen(read, "rb", buffering=0)

    def run(self, request: dict, timeout: float) -> str:
        """ "ok", "failed" or "timed_out" for one step."""
        if self.proc is None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.kill()
            return "failed"
        ready, _, _ = select.select([self.status], [], [], max(0.0, timeout))
        line = self.status.readline() if ready else b""
        if not line:  # past its time, or the process died (its log says how)
            self.kill()
            return "failed" if ready else "timed_out"
        return "ok" if json.loads(line)["rc"] == 0 else "failed"

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.status.close()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # end of its input: it exits
            try:
                self.proc.wait(timeout=5)  # it has nothing left to do
            except subprocess.TimeoutExpired:
                pass
            self.kill()


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]) if path.exists() else ""
