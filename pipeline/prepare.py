"""`dst prepare`: frames -> SmolVLM2 vision embeddings -> WebDataset shards, resumable and multi-process.

Steps: labels for every usable record (the same code as `dst labels`, written to `labels.parquet`); a deterministic
shard plan; then, per shard owned by this rank, encode each video (cached per video under `.prepare/cache/`), write
the shard under a temporary name and rename it, and record its per-video status in `.prepare/`. A rerun skips
finished shards and cached videos, so it re-encodes nothing; at the end rank 0 merges the statuses into
`manifest.json`. Under `torchrun`, shard `i` belongs to rank `i % world_size`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from core.errors import InputError
from core.files import write_atomic
from core.runtime import Ranks, choose_device, process_group
from pipeline.config import PrepareConfig
from pipeline.embeddings import encode_frames, tokens_per_frame_count
from pipeline.frame_feeder import FrameFeeder, default_workers
from pipeline.frame_sources import (
    FrameSourceError,
    NoDecodableFrame,
    open_frames,
    replacement_rows,
)
from pipeline.frames_files import (
    VIDEOS_LAYOUT,
    FramesFileError,
    find_frames_file,
    find_video_file,
)
from pipeline.labels import (
    LabelsReport,
    NoUsableRecords,
    arrow_frame_counter,
    fail_if_nothing_usable,
    fail_if_strict,
    frames_layout_hint,
    iter_video_labels,
    write_labels,
)
from pipeline.models import load_model
from pipeline.prepare_report import STATE_DIR, print_summary, write_manifest
from pipeline.records import VideoRecord, load_record_list
from pipeline.shards import (
    SHARD_PATTERN,
    VideoMeta,
    encode_sample,
    npy_bytes,
    plan_shards,
    sample_key,
    write_shard,
)
from pipeline.smolvlm import vision_spec
from pipeline.timeline import VideoLabels


class PlanMismatch(InputError):
    """The output folder holds a run with other settings or other videos."""


def _source_path(cfg: PrepareConfig, record: VideoRecord) -> Path:
    if cfg.frames_root is not None:
        return find_frames_file(cfg.frames_root, record.dataset, record.video_uid)
    return find_video_file(cfg.videos_root, record.dataset, record.video_uid)


def _frame_counter(cfg: PrepareConfig):
    if cfg.frames_root is not None:
        return arrow_frame_counter(cfg.frames_root)

    def count(record: VideoRecord) -> int:
        try:
            with open_frames(_source_path(cfg, record), cfg.fps) as src:
                return src.num_frames
        except FrameSourceError as exc:
            raise FramesFileError(str(exc)) from None

    return count


def encode_video(
    model,
    labels: VideoLabels,
    path: Path,
    cfg: PrepareConfig,
    image_size: int,
    device: torch.device,
    feeder: FrameFeeder,
    on_frames=lambda n: None,
) -> tuple[np.ndarray, list[int]]:
    """float16 [n_stream_frames, tokens, hidden] for frames k0..n-1 (row 0 = frame k0), and the absolute indices
    of frames that could not be decoded. Only decodable frames are encoded; the row of an undecodable one is a copy
    of the nearest earlier decodable frame's row, or, before the first decodable frame, of that frame's
    (`frame_sources.replacement_rows`). NoDecodableFrame (a FrameSourceError: the video is skipped) when not one
    frame of the stream decodes. Batches are fixed by cfg.batch_size alone, so the output does not depend on
    `feeder.workers`."""
    k0, n = labels.k0, labels.n_frames
    batches = [range(start, min(start + cfg.batch_size, n)) for start in range(k0, n, cfg.batch_size)]
    encoded, bad = [], []
    with feeder.feed(path, batches) as fed:
        for batch in fed:
            if len(batch.pixels):
                encoded.append(encode_frames(model, batch.pixels, cfg.tokens_per_frame, cfg.batch_size, device))
            bad += batch.bad
            on_frames(len(batch.indices))
    if n > k0 and len(bad) == n - k0:
        raise NoDecodableFrame(f"{path}: none of its {n - k0} frames ({k0} to {n - 1}) could be decoded")
    if not encoded:  # an empty stream
        return encode_frames(model, torch.empty((0, 3, image_size, image_size)), cfg.tokens_per_frame).numpy(), []
    decodable = np.ones(n - k0, bool)
    decodable[np.asarray(bad, int) - k0] = False
    row_of_good = np.cumsum(decodable) - 1  # where each decodable frame sits among the encoded rows
    source = row_of_good[replacement_rows(decodable.tolist())]
    return torch.cat(encoded).numpy()[source], bad


def _plan(cfg: PrepareConfig, videos: list[VideoLabels], tokens: int, hidden: int) -> dict:
    sizes = [(sample_key(v.record.dataset, v.record.video_uid), len(v.points) * tokens * hidden * 2) for v in videos]
    owners: dict[str, str] = {}
    for v, (key, _) in zip(videos, sizes):  # unique by construction (labels drop duplicate uids): make sure
        if key in owners:
            raise RuntimeError(f"sample key {key} for both {owners[key]} and {v.record.video_uid}")
        owners[key] = v.record.video_uid
    return {
        "model": cfg.model,
        "tokens_per_frame": cfg.tokens_per_frame,
        "tokens": tokens,
        "hidden_size": hidden,
        "fps": cfg.fps,
        "source": "arrow" if cfg.frames_root is not None else "video",
        "shards": plan_shards(sizes, int(cfg.shard_size_mb * 2**20)),
    }


def _check_plan(state: Path, plan: dict) -> None:
    """A rerun must find the plan of the first run, or it would mix two runs in one folder. Only reads."""
    path = state / "plan.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise PlanMismatch(f"{path} is unreadable ({exc}); use another --out or remove that folder") from None
    if old != plan:
        changed = [k for k in plan if not isinstance(old, dict) or old.get(k) != plan[k]]
        raise PlanMismatch(
            f"{path.parent.parent} holds a prepare run with different {', '.join(changed)}; "
            "use another --out or remove that folder"
        )


class UnusableVideo(ValueError):
    """A video whose encoding cannot be stored: non-finite embeddings (an all-undecodable video is refused earlier,
    by `encode_video`)."""


def _check_encoded(emb: np.ndarray, bad: list[int], labels: VideoLabels) -> None:
    """Never store embeddings that are not finite (fp16 overflow in the encoder, a broken model): training would
    turn NaN."""
    finite = np.isfinite(emb).reshape(len(emb), -1).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise UnusableVideo(
            f"non-finite embeddings at {len(rows)} of {len(emb)} frames (first: frame "
            f"{labels.k0 + int(rows[0])}); the encoder overflowed or the model is broken"
        )


def _read_cache(emb_path: Path, info_path: Path, labels: VideoLabels) -> tuple[np.ndarray, dict] | None:
    """A video's cached embeddings and info, or None when absent or unusable (then it is encoded again)."""
    if not (emb_path.exists() and info_path.exists()):
        return None
    try:
        emb = np.load(emb_path, allow_pickle=False)
        info = json.loads(info_path.read_text())
    except (ValueError, OSError, EOFError):  # a cache file cut short by a crash: encode again
        return None
    if emb.dtype != np.float16 or emb.ndim != 3 or len(emb) != len(labels.points) or not isinstance(info, dict):
        return None
    return emb, info


def _encode_shard(
    shard: Path, keys: list[str], by_key: dict, model, cfg, spec, device, feeder, progress, tasks
) -> None:
    """Encode (or take from the cache) every video of one shard; write its per-video status, then the shard."""
    cache = shard.parent / STATE_DIR / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    samples, status = [], {}
    for key in keys:
        labels = by_key[key]
        emb_path, info_path = cache / f"{key}.npy", cache / f"{key}.json"
        cached = _read_cache(emb_path, info_path, labels)
        try:
            if cached is not None:
                emb, info = cached
                progress.advance(tasks["frames"], len(labels.points))
            else:
                path = _source_path(cfg, labels.record)
                emb, bad = encode_video(
                    model,
                    labels,
                    path,
                    cfg,
                    spec.image_size,
                    device,
                    feeder,
                    lambda n: progress.advance(tasks["frames"], n),
                )
                info = {"source": str(path), "bad_frames": bad}
            _check_encoded(emb, info["bad_frames"], labels)
        except (FrameSourceError, UnusableVideo) as exc:  # found while encoding: report it, keep the rest
            status[labels.record.video_uid] = {"status": "skipped", "reason": str(exc), "key": key}
            progress.advance(tasks["videos"])
            continue
        if cached is None:
            write_atomic(emb_path, npy_bytes(emb))
            write_atomic(info_path, json.dumps(info).encode())
        samples.append(encode_sample(key, emb, VideoMeta.from_labels(labels, cfg.model, cfg.tokens_per_frame)))
        status[labels.record.video_uid] = {
            "status": "written",
            "key": key,
            "shard": shard.name,
            "dataset": labels.record.dataset,
            "first_frame": labels.k0,
            "num_frames": labels.n_frames,
            "frames": len(labels.points),
            "bad_frames": info["bad_frames"],
            "source": info["source"],
            "clamped_turns": labels.clamped_turns,
            "dropped_turns": labels.dropped_turns,
            "empty_turns": labels.empty_turns,
            "dropped_transitions": labels.dst.dropped,
        }
        progress.advance(tasks["videos"])
    # Status first, shard second: a shard on disk always has its status beside it.
    write_atomic(shard.parent / STATE_DIR / f"{shard.stem}.json", json.dumps(status).encode())
    write_shard(shard, samples)
    for key in keys:
        for suffix in (".npy", ".json"):
            (cache / f"{key}{suffix}").unlink(missing_ok=True)


def run(cfg: PrepareConfig, console: Console | None = None) -> dict | None:
    """Prepare `cfg.out`; returns the manifest on rank 0 (None on other ranks)."""
    ranks = Ranks.from_env()
    console = console or Console()
    device = choose_device(cfg.device, ranks)
    # Ranks only meet once, at the end, and may finish hours apart: a CPU (gloo) barrier with a long timeout
    # rather than NCCL's watchdog. torchrun stops every rank if one fails.
    with process_group(ranks, device, "gloo", timedelta(days=3)):
        return _run(cfg, ranks.rank, ranks.world, device, console if ranks.main else Console(quiet=True))


def _layout_hint(cfg: PrepareConfig) -> str:
    if cfg.frames_root is not None:
        return frames_layout_hint(cfg.frames_root)
    return (
        f"videos are expected at {cfg.videos_root}/{VIDEOS_LAYOUT} or {cfg.videos_root}/{{name}}.mp4 (also "
        ".mkv .webm .avi .mov)"
    )


def _run(cfg: PrepareConfig, rank: int, world: int, device: torch.device, say: Console) -> dict | None:
    started = time.time()
    raws = [raw for path in cfg.dst_json for raw in load_record_list(path)]
    report = LabelsReport(records=len(raws))
    videos = list(iter_video_labels(raws, _frame_counter(cfg), cfg.fps, report, say))
    fail_if_strict(cfg.strict, report, say)
    fail_if_nothing_usable(report, _layout_hint(cfg))
    if cfg.max_videos is not None:
        videos = videos[: cfg.max_videos]
    out = cfg.out
    state = out / STATE_DIR

    # Everything is checked before anything is written: a refused rerun leaves the folder as it was.
    model, _ = load_model(cfg.model, dtype=torch.float16 if device.type == "cuda" else torch.float32, device=device)
    spec = vision_spec(model)
    tokens = tokens_per_frame_count(cfg.tokens_per_frame, spec.grid)
    plan = _plan(cfg, videos, tokens, spec.text_hidden_size)
    _check_plan(state, plan)
    state.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_labels(videos, out / "labels.parquet", LabelsReport()).replace(out / "labels.parquet")
        if not (state / "plan.json").exists():
            write_atomic(state / "plan.json", json.dumps(plan, indent=1).encode())
    by_key = {sample_key(v.record.dataset, v.record.video_uid): v for v in videos}
    mine = [(i, keys) for i, keys in enumerate(plan["shards"]) if i % world == rank]
    todo = [(i, keys) for i, keys in mine if not (out / SHARD_PATTERN.format(i)).exists()]
    with _progress(say) as progress:
        tasks = {
            "videos": progress.add_task("videos", total=sum(len(k) for _, k in todo)),
            "frames": progress.add_task("frames", total=sum(len(by_key[k].points) for _, ks in todo for k in ks)),
        }
        workers = default_workers() if cfg.workers is None else cfg.workers
        with FrameFeeder(workers, spec.image_size, cfg.batch_size, cfg.fps) as feeder:
            for i, keys in todo:
                shard = out / SHARD_PATTERN.format(i)
                _encode_shard(shard, keys, by_key, model, cfg, spec, device, feeder, progress, tasks)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    manifest = write_manifest(out, config_dict(cfg), plan, report, videos)
    print_summary(manifest, say, elapsed=time.time() - started)
    if not manifest["counts"]["videos_written"]:
        uid, failed = next((uid, s) for uid, s in manifest["videos"].items() if s["status"] != "written")
        raise NoUsableRecords(
            f"no video could be encoded (the first, {uid}: {failed['reason']}); see {out / 'manifest.json'}"
        )
    return manifest


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:>6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def config_dict(cfg: PrepareConfig) -> dict:
    """The settings for manifest.json; `workers` is left out: it changes the speed, never the output."""
    return {
        k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, tuple) else v)
        for k, v in asdict(cfg).items()
        if k != "workers"
    }
