"""`dst prepare --workers`: the same bytes for any worker count, undecodable videos and frames, worker failures,
Ctrl-C and SIGTERM, and torchrun with workers per rank."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_record, write_records
from PIL import Image

from pipeline import frame_feeder, prepare
from pipeline.config import ConfigError, resolve
from pipeline.frame_feeder import FrameFeeder, FrameFeedError, default_workers
from pipeline.frame_sources import FrameSourceError, open_frames
from pipeline.frames_files import (
    frames_file_candidates,
    synthetic_jpegs,
    write_frames_file,
)
from pipeline.preprocess import preprocess_frames
from pipeline.shards import read_shard, sample_key

# Frames files: (uid, start time, frames, undecodable rows). k0 = 2 * start.
VIDEOS = (
    ("vid-ok", 1.0, 22, ()),
    ("vid-holes", 0.0, 20, (0, 1, 5, 8, 9)),  # leading bad rows, one mid-batch, two at a batch start
    ("vid-dead", 0.0, 12, tuple(range(12))),
)  # nothing decodes


@pytest.fixture(autouse=True)
def away_from_repo_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    for i, (uid, _, n, bad) in enumerate(VIDEOS):
        jpegs = synthetic_jpegs(n, size=32, seed=i)
        for k in bad:
            jpegs[k] = b"not a jpeg"
        write_frames_file(frames_file_candidates(tmp_path / "frames", "wtag", uid)[0], jpegs)
    records = [tiny_record(uid, "wtag", start, 4) for uid, start, _, _ in VIDEOS]
    return write_records(tmp_path / "val.json", records), tmp_path / "frames"


def run_prepare(dst_json: Path, out: Path, workers: int, **source) -> dict:
    source = source or {"frames_root": dst_json.parent / "frames"}
    return prepare.run(
        resolve(
            "val",
            {
                "dst_json": (dst_json,),
                "model": "tiny-random",
                "out": out,
                "batch_size": 4,
                "shard_size_mb": 0.002,
                "workers": workers,
                **source,
            },
        )
    )


def tree_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_two_workers_write_the_same_bytes_as_none(data, tmp_path):
    dst_json, _ = data
    run_prepare(dst_json, tmp_path / "out", workers=0)
    (tmp_path / "out").rename(tmp_path / "in-process")  # the manifest names --out: compare runs into one path
    run_prepare(dst_json, tmp_path / "out", workers=2)
    zero, two = tree_digests(tmp_path / "in-process"), tree_digests(tmp_path / "out")
    assert {"manifest.json", "labels.parquet", "shard-000000.tar", "shard-000001.tar"} <= set(zero)
    assert two == zero


def test_undecodable_frames_take_the_nearest_decodable_row_and_a_dead_video_is_skipped(data, tmp_path):
    dst_json, _ = data
    manifest = run_prepare(dst_json, tmp_path / "out", workers=1)
    assert manifest["videos"]["vid-holes"]["bad_frames"] == [0, 1, 5, 8, 9]
    assert manifest["videos"]["vid-dead"]["status"] == "skipped"
    assert manifest["skipped"] == [
        {
            "video_uid": "vid-dead",
            "reason": f"{frames_file('vid-dead', dst_json)}: none of its 12 frames (0 to 11) could be decoded",
        }
    ]
    assert manifest["counts"]["videos_written"] == 2 and manifest["counts"]["bad_frames"] == 5
    samples = {key: emb for shard in manifest["shards"] for key, emb, _ in read_shard(tmp_path / "out" / shard)}
    assert sorted(samples) == sorted(sample_key("wtag", uid) for uid in ("vid-ok", "vid-holes"))
    emb = samples[sample_key("wtag", "vid-holes")]
    assert emb.shape == (20, 5, 64)
    for row, source in ((0, 2), (1, 2), (5, 4), (8, 7), (9, 7)):  # before the first good frame: that frame
        assert np.array_equal(emb[row], emb[source]), (row, source)
    distinct = {emb[k].tobytes() for k in (2, 3, 4, 6, 7, 10, 11)}
    assert len(distinct) == 7  # decodable frames keep their own rows


def frames_file(uid: str, dst_json: Path) -> Path:
    return frames_file_candidates(dst_json.parent / "frames", "wtag", uid)[0]


def _write_mp4(path: Path, n: int, seed: int) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=2)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for jpeg in synthetic_jpegs(n, size=32, seed=seed):
            container.mux(stream.encode(av.VideoFrame.from_image(Image.open(io.BytesIO(jpeg)).convert("RGB"))))
        container.mux(stream.encode())


def test_raw_videos_give_the_same_bytes_with_workers(tmp_path):
    for i, uid in enumerate(("clip-a", "clip-b")):
        _write_mp4(tmp_path / "videos" / "wtag" / f"{uid}.mp4", 16, seed=i)
    dst_json = write_records(tmp_path / "v.json", [tiny_record(u, "wtag", 0.5, 4) for u in ("clip-a", "clip-b")])
    run_prepare(dst_json, tmp_path / "out", workers=0, videos_root=tmp_path / "videos")
    (tmp_path / "out").rename(tmp_path / "in-process")
    manifest = run_prepare(dst_json, tmp_path / "out", workers=2, videos_root=tmp_path / "videos")
    assert manifest["source"] == "video" and manifest["counts"]["frames"] == 2 * 15
    assert tree_digests(tmp_path / "out") == tree_digests(tmp_path / "in-process")


def _feed_all(feeder: FrameFeeder, path: Path, batches) -> list:
    """Every batch, its pixels copied: a batch's pixels live in the feeder's buffer only until the next one."""
    with feeder.feed(path, batches) as fed:
        return [(batch.indices, batch.bad, batch.pixels.clone()) for batch in fed]


def test_pixels_are_those_of_in_process_preprocessing(tmp_path):
    jpegs = synthetic_jpegs(11, size=24, seed=5)
    jpegs[4] = b"broken"
    write_frames_file(tmp_path / "v.arrow", jpegs)
    batches = [range(0, 4), range(4, 8), range(8, 11)]
    with FrameFeeder(0, 32, 4, 2.0) as none, FrameFeeder(2, 32, 4, 2.0) as two:
        alone, fed = _feed_all(none, tmp_path / "v.arrow", batches), _feed_all(two, tmp_path / "v.arrow", batches)
    assert (
        [(i, b) for i, b, _ in fed]
        == [(i, b) for i, b, _ in alone]
        == [([0, 1, 2, 3], []), ([4, 5, 6, 7], [4]), ([8, 9, 10], [])]
    )
    expected = preprocess_frames(open_frames(tmp_path / "v.arrow").read([k for k in range(11) if k != 4])[0], 32)
    assert torch.equal(torch.cat([p for _, _, p in fed]), expected)
    assert torch.equal(torch.cat([p for _, _, p in alone]), expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_errors_name_the_video_and_frames(tmp_path, workers):
    write_frames_file(tmp_path / "v.arrow", synthetic_jpegs(10, size=16))
    (tmp_path / "junk.arrow").write_bytes(b"not an arrow stream")
    with FrameFeeder(workers, image_size=16, batch_size=4, fps=2.0) as feeder:
        got = _feed_all(feeder, tmp_path / "v.arrow", [range(0, 4), range(4, 8), range(8, 10)])
        assert [indices for indices, _, _ in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert [tuple(pixels.shape) for _, _, pixels in got] == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]
        # A batch past the end is a bug in the caller: FrameFeedError naming file and frames, and a traceback.
        with pytest.raises(FrameFeedError, match=r"v.arrow: frames 8-11: FrameIndexError: .*frame 10 out of range"):
            _feed_all(feeder, tmp_path / "v.arrow", [range(0, 4), range(8, 12)])
        # An unusable file stays a FrameSourceError with the message the 0-worker path gives (the video is skipped).
        with pytest.raises(FrameSourceError) as exc:
            _feed_all(feeder, tmp_path / "junk.arrow", [range(0, 4)])
        assert str(exc.value).startswith(f"{tmp_path / 'junk.arrow'}: not a readable Arrow IPC stream")
        assert len(_feed_all(feeder, tmp_path / "v.arrow", [range(0, 4)])) == 1  # usable again afterwards


def test_a_worker_that_dies_or_stalls_is_an_error_not_a_hang(tmp_path, monkeypatch):
    write_frames_file(tmp_path / "v.arrow", synthetic_jpegs(40, size=16))
    batches = [range(k, k + 4) for k in range(0, 40, 4)]
    with FrameFeeder(2, image_size=16, batch_size=4, fps=2.0) as feeder:
        with pytest.raises(
            FrameFeedError,
            match=r"v.arrow: frames \d+-\d+: decoding worker \d+ died \(killed by "
            r"SIGKILL\)",
        ):
            with feeder.feed(tmp_path / "v.arrow", batches) as fed:
                next(fed)
                for pid in feeder.worker_pids:
                    os.kill(pid, signal.SIGKILL)
                list(fed)
        monkeypatch.setattr(frame_feeder, "BATCH_TIMEOUT_S", 1.0)
        started = time.monotonic()
        with pytest.raises(FrameFeedError, match=r"frames 0-3: decoding worker \d+ gave no answer in 1 s"):
            feeder.start()
            for pid in feeder.worker_pids:
                os.kill(pid, signal.SIGSTOP)
            _feed_all(feeder, tmp_path / "v.arrow", batches)
        assert time.monotonic() - started < 30 and feeder.worker_pids == []  # stopped workers were killed


def test_too_little_shared_memory_is_refused_up_front(tmp_path, monkeypatch):
    write_frames_file(tmp_path / "v.arrow", synthetic_jpegs(4, size=16))
    real = os.statvfs(tempfile_dir())
    monkeypatch.setattr(os, "statvfs", lambda _: os.statvfs_result((real.f_bsize, 4096, 1000, 10, 10, *real[5:])))
    with FrameFeeder(2, image_size=512, batch_size=32, fps=2.0) as feeder:
        with pytest.raises(
            FrameFeedError,
            match=r"2 decoding workers need 384 MiB of shared memory in \S+ \(0 MiB "
            r"free\): use fewer --workers \(0: none\)",
        ):
            _feed_all(feeder, tmp_path / "v.arrow", [range(0, 4)])
        assert feeder.worker_pids == []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (nobody may reap it in a container)


FEEDING_SCRIPT = """
import sys, time
from pathlib import Path
from pipeline.frame_feeder import FrameFeeder
if __name__ == "__main__":
    with FrameFeeder(2, image_size=16, batch_size=2, fps=2.0) as feeder:
        with feeder.feed(Path(sys.argv[1]), [range(k, k + 2) for k in range(0, 40, 2)]) as fed:
            next(fed)
            print(" ".join(map(str, feeder.worker_pids)), flush=True)
            time.sleep(60)  # an encoder busy with a batch
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_leave_no_worker(tmp_path, sig):
    write_frames_file(tmp_path / "v.arrow", synthetic_jpegs(40, size=16))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", FEEDING_SCRIPT, str(tmp_path / "v.arrow")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids), proc.stderr.read()
        proc.send_signal(sig)  # SIGTERM: no Python cleanup at all; the workers see their pipe close
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
        assert proc.returncode == -sig  # KeyboardInterrupt: Python re-raises SIGINT as it exits
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert not list(Path(tempfile_dir()).glob("dst-feed-*"))  # the shared buffer file is gone


def tempfile_dir() -> str:
    return "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()


def test_torchrun_ranks_with_workers_match_one_process(data, tmp_path):
    dst_json, frames = data
    run_prepare(dst_json, tmp_path / "out", workers=0)
    (tmp_path / "out").rename(tmp_path / "in-process")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29531",
        "--no-python",
        str(Path(sys.executable).with_name("dst")),
        "prepare",
        "--split",
        "val",
        "--dst-json",
        str(dst_json),
        "--frames-root",
        str(frames),
        "--model",
        "tiny-random",
        "--out",
        str(tmp_path / "out"),
        "--shard-size-mb",
        "0.002",
        "--batch-size",
        "4",
        "--workers",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_digests(tmp_path / "out") == tree_digests(tmp_path / "in-process")


def test_default_workers_leave_a_core_per_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, expected in ((1, 0), (2, 1), (4, 3), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, cpus=cpus: set(range(cpus)))
        assert default_workers() == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == 4  # 16 CPUs, 2 ranks: 7 each, capped at 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    assert default_workers() == 0


def test_workers_option_and_config_key(data, tmp_path):
    dst_json, frames = data
    given = {"dst_json": (dst_json,), "frames_root": frames, "model": "tiny-random"}
    assert resolve("val", given).workers is None  # None: default_workers() at run time
    assert resolve("val", {**given, "workers": 3}).workers == 3
    with pytest.raises(ConfigError, match="workers must be >= 0, got -1"):
        resolve("val", {**given, "workers": -1})
    config = tmp_path / "data.toml"
    config.write_text(
        f'[prepare]\nworkers = 0\n[splits.val]\ndst_json = ["{dst_json}"]\nframes_root = "{frames}"\n'
        'model = "tiny-random"\n'
    )
    assert resolve("val", {}, config).workers == 0
    assert "workers" not in prepare.config_dict(resolve("val", {}, config))  # the manifest never depends on it
