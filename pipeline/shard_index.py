"""Random access to `dst prepare` shards: any rows of any video, read by byte offset.

The shards stay plain WebDataset tars, but training reads them by offset instead of streaming them through a
WebDataset pipeline, so that windows can be sampled with weights and a run can resume exactly at a batch.
`ShardIndex.build` walks every tar once (tar headers only; the embedding data is skipped by seeking): it parses and
validates each sample's `json`, and records where its `emb.npy` array data and its `json` sit in the tar. Later reads
go through one read-only memory map per shard, opened lazily in the process that reads (DataLoader workers open their
own). Metadata is parsed again on demand (a small per-process cache) rather than kept, so the index stays small with
thousands of long videos and is cheap to send to workers.
"""

from __future__ import annotations

import math
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from pipeline.shards import EMB, META, ShardFormatError, VideoMeta, expected_samples, parse_meta

META_CACHE = 64  # parsed metas kept per process; a batch touches at most a few videos
OPEN_SHARDS = 64  # memory maps kept open per process (each holds a file descriptor)


@dataclass(frozen=True)
class _Sample:
    shard: int  # index into ShardIndex.shards
    dataset: str
    emb_offset: int  # byte offset of the array data (after the .npy header) in the tar
    shape: tuple[int, int, int]
    meta_offset: int
    meta_size: int


def _npy_header(f, offset: int, where: str) -> tuple[int, tuple, np.dtype]:
    """(data offset, shape, dtype) of the .npy member whose bytes start at `offset`; reads only the header."""
    f.seek(offset)
    try:
        version = npy_format.read_magic(f)
        read = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f".npy format version {version} (np.save writes 1.0 or 2.0)")
        shape, fortran, dtype = read(f)
    except (ValueError, TypeError, SyntaxError, EOFError, OSError, MemoryError, RecursionError) as exc:
        # numpy parses the header with ast.literal_eval: random bytes there can raise any of these
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ShardFormatError(f"{where}: unreadable {EMB} header: {first}") from None
    if fortran:
        raise ShardFormatError(f"{where}: {EMB} is Fortran-ordered; expected C order")
    return f.tell(), shape, dtype


class ShardIndex:
    """Where every video's embeddings and metadata sit in the shards; `build` it, then `meta` and `rows`."""

    def __init__(
        self,
        shards: list[Path],
        samples: dict[str, _Sample],
        tokens_per_frame: int,
        hidden_size: int,
        model: str,
        warnings: tuple[str, ...] = (),
    ):
        self.shards = shards
        self._samples = samples
        self.tokens_per_frame = tokens_per_frame
        self.hidden_size = hidden_size
        self.model = model  # the --model the shards were prepared with
        self.warnings = warnings  # for the caller to show: e.g. no per-shard sample counts to check against
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self._metas: OrderedDict[str, VideoMeta] = OrderedDict()

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def build(cls, shard_dir: str | Path) -> ShardIndex:
        """Index every `shard-*.tar` of `shard_dir`, checking each sample; any problem raises `ShardFormatError`
        naming the shard file. With the folder's manifest.json the sample count of every shard is checked too
        (a shard cut at a sample boundary is otherwise a valid, shorter tar)."""
        shard_dir = Path(shard_dir)
        if not shard_dir.is_dir():
            raise ShardFormatError(f"shard folder {shard_dir} does not exist")
        shards = sorted(shard_dir.glob("shard-*.tar"))
        if not shards:
            raise ShardFormatError(f"no shard-*.tar in {shard_dir}")
        expected, warning = expected_samples(shard_dir)
        warnings = [warning] if warning else []
        if expected is not None:
            missing = sorted(set(expected) - {p.name for p in shards})
            if missing:
                raise ShardFormatError(
                    f"{shard_dir / missing[0]} is listed in manifest.json but missing ({len(missing)} missing shard(s))"
                )
            extra = [p.name for p in shards if p.name not in expected]
            if extra:
                warnings.append(
                    f"{shard_dir / extra[0]} is not in manifest.json ({len(extra)} such shard(s)): "
                    "its samples are used but cannot be checked"
                )
        samples: dict[str, _Sample] = {}
        shapes: dict[tuple[int, int], str] = {}
        models: dict[str, str] = {}
        for i, path in enumerate(shards):
            found = 0
            for key, sample, meta in _scan(path, i):
                where = f"{path}: sample {key}"
                if key in samples:
                    raise ShardFormatError(f"{where}: key also in {shards[samples[key].shard]}")
                if sample.shape[0] != meta.num_rows:
                    raise ShardFormatError(
                        f"{where}: {sample.shape[0]} embedding rows for {meta.num_rows} label points"
                    )
                shapes.setdefault(sample.shape[1:], where)
                models.setdefault(meta.model, where)
                samples[key] = sample
                found += 1
            if expected is not None and expected.get(path.name, found) != found:
                raise ShardFormatError(
                    f"{path}: holds {found} samples, manifest.json says {expected[path.name]} "
                    "(truncated or replaced shard: prepare it again)"
                )
        if not samples:
            raise ShardFormatError(f"{shard_dir}: the shards hold no samples")
        if len(shapes) > 1:
            raise ShardFormatError(
                "samples disagree on [tokens_per_frame, hidden]: "
                + "; ".join(f"{list(s)} in {w}" for s, w in shapes.items())
            )
        if len(models) > 1:
            raise ShardFormatError(
                "samples were prepared with different models: " + "; ".join(f"{m} in {w}" for m, w in models.items())
            )
        ((tokens, hidden),) = shapes
        return cls(shards, samples, tokens, hidden, next(iter(models)), tuple(warnings))

    # ------------------------------------------------------------------------------------------------ access

    @property
    def video_ids(self) -> list[str]:
        """Sample keys (opaque strings, unique across datasets) in shard order."""
        return list(self._samples)

    def __len__(self) -> int:
        return len(self._samples)

    def num_rows(self, video_id: str) -> int:
        return self._sample(video_id).shape[0]

    def dataset(self, video_id: str) -> str:
        return self._sample(video_id).dataset

    def shard_path(self, video_id: str) -> Path:
        return self.shards[self._sample(video_id).shard]

    def describe(self, video_id: str) -> str:
        """`shard file: sample key` for messages."""
        return f"{self.shard_path(video_id)}: sample {video_id}"

    def meta(self, video_id: str) -> VideoMeta:
        """The sample's record (shared and cached: do not modify it)."""
        if video_id in self._metas:
            self._metas.move_to_end(video_id)
            return self._metas[video_id]
        s = self._sample(video_id)
        data = self._map(s.shard)[s.meta_offset : s.meta_offset + s.meta_size].tobytes()
        if len(data) != s.meta_size:
            raise ShardFormatError(f"{self.describe(video_id)}: {META} cut short (the file shrank after indexing)")
        meta = VideoMeta.from_json(parse_meta(data, self.describe(video_id)), self.describe(video_id), checked=True)
        self._metas[video_id] = meta
        if len(self._metas) > META_CACHE:
            self._metas.popitem(last=False)
        return meta

    def rows(self, video_id: str, start: int, end: int) -> np.ndarray:
        """float16 [end - start, T, H]: embedding rows start..end-1 (row 0 = the stream's first frame), a copy."""
        s = self._sample(video_id)
        if not 0 <= start <= end <= s.shape[0]:
            raise IndexError(f"{video_id}: rows [{start}, {end}) outside [0, {s.shape[0]})")
        row_bytes = s.shape[1] * s.shape[2] * 2
        lo = s.emb_offset + start * row_bytes
        data = self._map(s.shard)[lo : lo + (end - start) * row_bytes]
        if data.size != (end - start) * row_bytes:
            raise ShardFormatError(f"{self.describe(video_id)}: {EMB} cut short (the file shrank after indexing)")
        return np.array(data.view("<f2").reshape(end - start, *s.shape[1:]), dtype=np.float16)  # plain ndarray

    def _sample(self, video_id: str) -> _Sample:
        try:
            return self._samples[video_id]
        except KeyError:
            raise KeyError(f"video {video_id!r} is not in the shards") from None

    def _map(self, shard: int) -> np.memmap:
        if shard in self._maps:
            self._maps.move_to_end(shard)
        else:
            self._maps[shard] = np.memmap(self.shards[shard], dtype=np.uint8, mode="r")
            if len(self._maps) > OPEN_SHARDS:  # callers only keep copies, so dropping a map closes it
                self._maps.popitem(last=False)
        return self._maps[shard]

    # Memory maps and the meta cache belong to one process: never pickled, reopened lazily after unpickling.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": OrderedDict(), "_metas": OrderedDict()}


def _scan(path: Path, shard: int):
    """(key, _Sample, meta) per sample of one tar, in order, checking its members; `ShardFormatError` naming the
    file for anything that is not what `dst prepare` writes (empty, truncated, corrupt headers or members)."""
    size = path.stat().st_size
    if size == 0:
        raise ShardFormatError(f"{path}: empty file (0 bytes)")
    try:
        pending, order = _members(path, size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardFormatError(f"{path}: not a readable tar ({exc})") from None
    for key in order:
        parts = pending[key]
        if EMB not in parts or META not in parts:
            raise ShardFormatError(
                f"{path}: sample {key} has members {sorted(set(parts) - {'meta'})}, expected {[EMB, META]}"
            )
        meta = VideoMeta.from_json(parts["meta"], f"{path}: sample {key}")
        yield key, _Sample(shard, meta.dataset, parts[EMB][0], parts[EMB][1], *parts[META]), meta


def _members(path: Path, size: int) -> tuple[dict[str, dict], list[str]]:
    pending: dict[str, dict] = {}
    order: list[str] = []
    with open(path, "rb") as raw, tarfile.open(path, mode="r:") as tar:
        for member in tar:
            key, _, suffix = member.name.partition(".")
            where = f"{path}: sample {key}"
            if not member.isfile() or suffix not in (EMB, META):
                raise ShardFormatError(f"{where}: unexpected member {member.name!r}")
            if member.offset_data + member.size > size:
                raise ShardFormatError(f"{where}: {suffix} runs past the end of the file (truncated shard)")
            parts = pending.setdefault(key, {})
            if not parts:
                order.append(key)
            if suffix in parts:
                raise ShardFormatError(f"{where}: member {suffix} twice")
            if suffix == META:
                parts["meta"] = parse_meta(tar.extractfile(member).read(), where)
                parts[META] = (member.offset_data, member.size)
            else:
                data, shape, dtype = _npy_header(raw, member.offset_data, where)
                if dtype != np.dtype("<f2") or len(shape) != 3 or min(shape) < 0:
                    raise ShardFormatError(
                        f"{where}: {EMB} must be float16 [frames, tokens, hidden], got {dtype} {list(shape)}"
                    )
                if data - member.offset_data + math.prod(shape) * 2 != member.size:
                    raise ShardFormatError(f"{where}: {EMB} size does not match its header")
                parts[EMB] = (data, tuple(int(x) for x in shape))
    return pending, order
