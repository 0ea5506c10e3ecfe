"""The work of one frame-feeder batch, and the loop of a feeder worker process (see pipeline/frame_feeder.py).

Imports no torch: a worker only decodes (pipeline.frame_sources) and preprocesses (pipeline.preprocess) into a
shared buffer, so it starts fast and stays small.
"""

from __future__ import annotations

import mmap
import signal
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.frame_sources import FrameSource, FrameSourceError, open_frames
from pipeline.preprocess import preprocess_into


def decode_and_preprocess(
    src: FrameSource, indices: list[int], image_size: int, out_for: Callable[[int], np.ndarray]
) -> tuple[list[int], int]:
    """Decode frames `indices` of `src` and write the decodable ones, in batch order, into `out_for(count)`.
    Returns (the indices that could not be decoded, the count written). Runs unchanged with or without workers,
    which is what makes the pixels identical for every worker count."""
    pics = src.decode(indices)
    good = [p for p in pics if p is not None]
    preprocess_into(good, image_size, out_for(len(good)))
    return [i for i, p in zip(indices, pics) if p is None], len(good)


def batch_name(path: str | Path, indices: list[int]) -> str:
    """`video: frames a-b`, how every message about a batch starts."""
    if not indices:
        return f"{path}: no frames"
    frames = f"frame {indices[0]}" if len(indices) == 1 else f"frames {indices[0]}-{indices[-1]}"
    return f"{path}: {frames}"


def error_reply(path: str | Path, indices: list[int], exc: Exception) -> tuple:
    """A picklable description of a failed batch. A FrameSourceError (the file cannot be used) keeps its own
    message, which names the file, so that a video skipped for it reads the same with and without workers."""
    if isinstance(exc, FrameSourceError):
        return ("source-error", str(exc), "")
    return ("error", f"{batch_name(path, indices)}: {type(exc).__name__}: {exc}", traceback.format_exc())


def worker_main(conn, buffer_path: str, slot_bytes: int, slot_frames: int, image_size: int) -> None:
    """Answer tasks `(slot, path, fps, indices)` in order with `("ok", bad, count)` or an error reply, writing
    pixels into slot `slot` of the shared buffer file (slots start every `slot_bytes`). `None` stops the loop; so
    does a closed pipe (the main process is gone, however it ended)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the main process, which stops the workers
    with open(buffer_path, "r+b") as f:
        shared = mmap.mmap(f.fileno(), 0)
    shape = (slot_frames, 3, image_size, image_size)

    def slot_array(slot: int) -> np.ndarray:
        return np.ndarray(shape, np.float32, buffer=shared, offset=slot * slot_bytes)

    src: FrameSource | None = None
    try:
        conn.send(("ready",))
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            slot, path, fps, indices = task
            try:
                if src is None or (str(src.path), src.fps) != (path, fps):
                    if src is not None:
                        src.close()
                        src = None
                    src = open_frames(path, fps)
                bad, count = decode_and_preprocess(src, indices, image_size, lambda n, slot=slot: slot_array(slot))
                reply = ("ok", bad, count)
            except Exception as exc:  # every failure goes back to the main process, which raises it
                reply = error_reply(path, indices, exc)
            try:
                conn.send(reply)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                return
    finally:  # the mapping goes with the process
        if src is not None:
            src.close()
