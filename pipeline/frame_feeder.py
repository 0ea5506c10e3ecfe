"""Frames decoded and preprocessed ahead of the encoder, in worker processes (`dst prepare --workers N`).

    with FrameFeeder(workers=2, image_size=512, batch_size=32, fps=2.0) as feeder:
        with feeder.feed(path, batches) as fed:      # batches: lists of frame indices, in stream order
            for batch in fed:                        # FedBatch, in the order of `batches`
                encode(batch.pixels)                 # float32 [decodable frames of the batch, 3, S, S]

One function, `feed_worker.decode_and_preprocess`, turns a batch into pixels: in this process when workers=0, in a
worker otherwise; the encoder therefore gets bit-identical pixels for every worker count and timing. Batch j goes to
worker j % N and each worker answers its tasks in order, so results come back in order with no reordering. Workers
write pixels into slots of one shared buffer (a file in /dev/shm, unlinked once every worker has mapped it): passing
100 MB batches through a pipe cost the main process more CPU than the resize it saved, and even a copy out of the
buffer costs 2 ms per 512 px frame, so the encoder reads the slot in place. 2 N slots bound the prefetch; a slot is
reused once the caller asks for the next batch. Without workers the same code fills a one-slot private buffer.

Failures: an exception in a worker comes back and is raised here, naming the video and the frames. A
FrameSourceError (the file cannot be used) stays one, with its own message, so the video is skipped exactly as
without workers; anything else is a FrameFeedError carrying the worker's traceback. A worker that dies, or gives
no answer for BATCH_TIMEOUT_S, is a FrameFeedError too, never a hang. Abandoning a feed early (an error, Ctrl-C)
stops the workers; the next feed starts fresh ones. Workers ignore SIGINT (this process handles Ctrl-C and stops
them) and exit by themselves when this process goes away (their pipe closes), so SIGTERM or SIGKILL here leaves
no worker behind. Under torchrun every rank has its own feeder and workers.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import InputError
from pipeline.feed_worker import (
    batch_name,
    decode_and_preprocess,
    error_reply,
    worker_main,
)
from pipeline.frame_sources import FrameSourceError, open_frames

BATCH_TIMEOUT_S = 600.0  # no answer for a batch in this long: the worker is stuck (a 32-frame batch takes ~1 s)
START_TIMEOUT_S = 120.0  # a spawned worker imports numpy, PIL, pyarrow: seconds, even on a loaded machine
_POLL_S = 0.5
_SLOTS_PER_WORKER = 2
_SHM_DIR = Path("/dev/shm")


class FrameFeedError(InputError):
    """Decoding or preprocessing failed in a way that is not a bad file or a bad frame (a worker died, stalled, or
    raised); the message names the video and the frames."""


@dataclass
class FedBatch:
    indices: list[int]  # the batch's frame indices, as given
    bad: list[int]  # those whose picture could not be decoded, in batch order
    # float32 [len(indices) - len(bad), 3, S, S]: the decodable frames, in batch order. A view of the feeder's
    # buffer, valid until the next batch is asked for: encode (or copy) it first. No copy, no allocation per batch.
    pixels: torch.Tensor


def default_workers() -> int:
    """min(4, CPUs per local rank - 1): leaves a core for the process that runs the encoder."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(4, cpus // ranks_here - 1))


class FrameFeeder:
    def __init__(self, workers: int, image_size: int, batch_size: int, fps: float):
        if workers < 0 or batch_size < 1 or image_size < 1:
            raise ValueError(
                f"need workers >= 0, batch_size >= 1, image_size >= 1; got {workers}, {batch_size}, {image_size}"
            )
        self.workers, self.image_size, self.batch_size, self.fps = workers, image_size, batch_size, fps
        self._slots = max(1, _SLOTS_PER_WORKER * workers)
        # Every slot starts on a page, with or without workers: the encoder reads the same layout either way.
        raw = batch_size * 3 * image_size * image_size * 4
        self._slot_bytes = -(-raw // mmap.PAGESIZE) * mmap.PAGESIZE
        self._procs: list = []
        self._conns: list = []
        self._shared: mmap.mmap | None = None
        self._next_worker = 0

    def __enter__(self) -> FrameFeeder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def feed(self, path: str | Path, batches: Iterable[Iterable[int]]) -> Iterator[Iterator[FedBatch]]:
        """The batches of one video, decoded and preprocessed, in order. Leaving the block before the last batch
        (an exception, a break) stops the workers, so no stale answer is ever read by a later feed."""
        batches = [list(b) for b in batches]
        if any(len(b) > self.batch_size for b in batches):
            raise ValueError(f"{path}: a batch holds more than batch_size={self.batch_size} frames")
        done = [False]
        if self.workers == 0:
            iterator = self._local(Path(path), batches, done)
        else:
            iterator = self._from_workers(Path(path), batches, done)
        try:
            yield iterator
        finally:
            iterator.close()
            if not done[0]:
                self.close()

    def _local(self, path: Path, batches: list[list[int]], done: list[bool]) -> Iterator[FedBatch]:
        if self._shared is None:
            self._shared = mmap.mmap(-1, self._slot_bytes)  # one slot, private to this process
        with open_frames(path, self.fps) as src:
            for indices in batches:
                try:
                    bad, count = decode_and_preprocess(src, indices, self.image_size, lambda n: self._slot(0))
                except Exception as exc:  # the same reply, hence the same exception, as from a worker
                    _raise(error_reply(path, indices, exc), exc)
                yield FedBatch(indices, bad, torch.from_numpy(self._slot(0, count)))
        done[0] = True

    def _from_workers(self, path: Path, batches: list[list[int]], done: list[bool]) -> Iterator[FedBatch]:
        self.start()
        free = deque(range(self._slots))
        pending: deque[tuple[int, int, list[int]]] = deque()  # (slot, worker, indices), in submission order
        todo = deque(batches)

        def submit() -> None:
            while free and todo:
                slot, worker, indices = free.popleft(), self._next_worker, todo.popleft()
                self._next_worker = (worker + 1) % self.workers
                try:
                    self._conns[worker].send((slot, str(path), self.fps, indices))
                except OSError:  # its end of the pipe is closed: the worker is gone
                    raise self._died(worker, path, indices) from None
                pending.append((slot, worker, indices))

        submit()
        while pending:
            slot, worker, indices = pending.popleft()
            reply = self._receive(worker, path, indices)
            if reply[0] != "ok":
                _raise(reply)
            _, bad, count = reply
            yield FedBatch(indices, bad, torch.from_numpy(self._slot(slot, count)))
            free.append(slot)  # the caller asked for the next batch: it is done with this slot
            submit()
        done[0] = True

    def _slot(self, slot: int, count: int | None = None) -> np.ndarray:
        """Slot `slot` of the buffer as float32 [count (default: batch_size), 3, S, S]."""
        count = self.batch_size if count is None else count
        return np.ndarray(
            (count, 3, self.image_size, self.image_size),
            np.float32,
            buffer=self._shared,
            offset=slot * self._slot_bytes,
        )

    def _receive(self, worker: int, path: Path, indices: list[int]) -> tuple:
        conn, proc = self._conns[worker], self._procs[worker]
        deadline = time.monotonic() + BATCH_TIMEOUT_S
        where = batch_name(path, indices)
        while not conn.poll(_POLL_S):
            if not proc.is_alive():
                break
            if time.monotonic() > deadline:
                raise FrameFeedError(f"{where}: decoding worker {proc.pid} gave no answer in {BATCH_TIMEOUT_S:.0f} s")
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise self._died(worker, path, indices) from None

    def _died(self, worker: int, path: Path, indices: list[int]) -> FrameFeedError:
        proc = self._procs[worker]
        proc.join(timeout=5)
        return FrameFeedError(
            f"{batch_name(path, indices)}: decoding worker {proc.pid} died ({_exit_reason(proc.exitcode)})"
        )

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def start(self) -> None:
        """Create the shared buffer and spawn the workers, unless running (a feed starts them when it needs them).
        Spawn, not fork: no inherited threads, locks or other workers' pipe ends."""
        if self.workers == 0:
            return
        if self._procs:
            return
        total = self._slots * self._slot_bytes
        folder = _SHM_DIR if _SHM_DIR.is_dir() and os.access(_SHM_DIR, os.W_OK) else Path(tempfile.gettempdir())
        stat = os.statvfs(folder)
        if stat.f_bavail * stat.f_frsize < total:
            raise self._no_room(total, folder, f"{stat.f_bavail * stat.f_frsize / 2**20:.0f} MiB free")
        fd, name = tempfile.mkstemp(prefix="dst-feed-", dir=folder)
        try:
            try:  # reserve the space now: a full tmpfs would otherwise kill a worker (SIGBUS) mid-run
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, total)
                else:
                    os.ftruncate(fd, total)
            except OSError as exc:
                raise self._no_room(total, folder, str(exc)) from None
            self._shared = mmap.mmap(fd, total)
            ctx = multiprocessing.get_context("spawn")
            for _ in range(self.workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=worker_main,
                    args=(child, name, self._slot_bytes, self.batch_size, self.image_size),
                    daemon=True,
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            for conn, proc in zip(self._conns, self._procs):
                try:
                    ready = conn.poll(START_TIMEOUT_S) and conn.recv() == ("ready",)
                except (EOFError, OSError):  # it exited before saying so
                    ready = False
                if not ready:
                    proc.join(timeout=1)
                    raise FrameFeedError(
                        f"decoding worker {proc.pid} did not start ({_exit_reason(proc.exitcode)}"
                        "; its error, if any, is printed above)"
                    )
        except BaseException:
            self.close()
            raise
        finally:
            os.close(fd)
            os.unlink(name)  # every worker has mapped it (or failed): nothing is left behind in any case

    def _no_room(self, total: int, folder: Path, why: str) -> FrameFeedError:
        return FrameFeedError(
            f"{self.workers} decoding workers need {total / 2**20:.0f} MiB of shared memory in "
            f"{folder} ({why}): use fewer --workers (0: none), a smaller --batch-size, or a larger "
            f"{folder} (docker: --shm-size)"
        )

    def close(self) -> None:
        """Stop the workers: ask, then terminate, then kill; idempotent."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:  # its pipe is closed: the worker has exited already, there is nothing to ask
                continue
        for proc in self._procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._next_worker = [], [], 0
        # Dropped, not closed: a FedBatch still held (say, by a traceback) views it; it is freed with the last view.
        self._shared = None


def _raise(reply: tuple, cause: BaseException | None = None) -> None:
    kind, message, remote_traceback = reply
    if kind == "source-error":
        raise FrameSourceError(message) from cause
    if remote_traceback and cause is None:
        message += "\n(in the decoding worker)\n" + remote_traceback.rstrip()
    raise FrameFeedError(message) from cause


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
