"""Streaming a dialogue: the model watches frame by frame and its outputs become prediction records.

Modes:
- `model`: the real setting. The context holds the model's own DST updates and responses; when the cache would
  exceed `max_context`, a context strategy makes room: `reseed` (the default: the system prompt with the variant's
  memory and the last turns: the tracked DST for `dst`, a progress summary the model writes on the spot for
  `summary`, nothing for `none`), `reseed-oracle` (the same, with the memory read from the references at the
  re-seed: the reference state, from which the `dst` stream goes on tracking, or the reference progress; a bound
  for what a perfect memory buys), `drop-all` (the system prompt as at the stream start, no turns),
  `drop-middle` (the system prompt plus the most recent half of the context, re-fed).
- `teacher-forced`: the context holds the ground-truth dialogue and DST; the model's decisions (and what it would
  generate wherever a decision's probability exceeds `generate_above`) are recorded but never enter the context,
  so thresholds can be swept after one pass.
- `oracle` (references as predictions), `never` (silent, no updates), `periodic` (a fixed sentence every
  `every` seconds): baselines that need no model.

Protocols (docs/design.md §8): `proassist` streams a conversation up to the decision point of its last assistant
turn, as ProAssist's evaluation does; `full-video` to the last frame.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import partial

import numpy as np
import torch

from eval.config import StreamConfig
from eval.engine import StreamEngine
from eval.protocol import protocol_rows
from eval.session import Model, StreamSession
from pipeline.shards import VideoMeta
from train.sequence import (
    RECENT_TURNS,
    SequenceFormat,
    format_state,
    frame_cost,
    frame_segments,
    progress_before,
    state_before,
    system_for,
)

PERIODIC_TEXT = "Keep going, you are doing well."
SILENT_TEXTS = ("", ".")  # ProAssist maps a generated "." (or nothing) to silence


def stream_rows(meta: VideoMeta, conversation: int, protocol: str) -> int:
    """How many frame rows of this conversation are streamed (eval/protocol.py's rule on its speaking labels)."""
    return protocol_rows(meta.conversations[conversation].speak, protocol)


def reference_frames(meta: VideoMeta, conversation: int, n_rows: int) -> list[dict]:
    """Per frame: the inputs and the references, with empty predictions."""
    conv = meta.conversations[conversation]
    return [
        {
            "frame": meta.frame[row],
            "time": meta.time[row],
            "user_text": conv.user_text[row],
            "p_update": None,
            "p_speak": None,
            "pred_dst_delta": {},
            "ref_dst_delta": json.loads(meta.dst_delta[row]) if meta.dst_delta[row] else {},
            "pred_state": {},
            "ref_state": json.loads(meta.dst_state[row]),
            "pred_text": "",
            "ref_text": conv.response[row],
            "ref_labels": conv.response_labels[row],
            "pred_dst_text": "",
        }
        for row in range(n_rows)
    ]


def baseline(meta: VideoMeta, conversation: int, cfg: StreamConfig, n_rows: int) -> list[dict]:
    frames = reference_frames(meta, conversation, n_rows)
    every = max(1, round(cfg.every * meta.fps))
    for row, f in enumerate(frames):
        if cfg.mode == "oracle":
            f.update(
                p_update=float(bool(f["ref_dst_delta"])),
                p_speak=float(bool(f["ref_text"])),
                pred_dst_delta=f["ref_dst_delta"],
                pred_state=f["ref_state"],
                pred_text=f["ref_text"],
                pred_dst_text=format_state(f["ref_dst_delta"]),
            )
        else:  # never / periodic: no DST updates, the state stays where the stream started
            f.update(pred_state=dict(meta.initial_state))
            if cfg.mode == "periodic" and (row + 1) % every == 0:
                f["pred_text"] = PERIODIC_TEXT
    return frames


def generation_budget(fmt: SequenceFormat, nodes: list[tuple[str, str]], max_new_tokens: int) -> int:
    """Most tokens one frame's generated update and response can add (EOS included)."""
    budget = len(fmt.response_prefix) + max_new_tokens + 1
    if fmt.variant.tracks_state:
        clause = max(len(fmt.clause(n, v)) for n, _ in nodes for v in ("in_progress", "completed"))
        budget += len(fmt.dst_prefix) + (clause + len(fmt.clause_separator)) * len(nodes) + 1
    return budget


def summary_budget(fmt: SequenceFormat, max_summary_tokens: int) -> int:
    """Tokens the summary variant must keep free to close its context with a summary (request, frame, summary)."""
    if not fmt.variant.writes_summary:
        return 0
    return len(fmt.summary_request) + len(fmt.frame) + len(fmt.summary_prefix) + max_summary_tokens + 1


class GroundTruth:
    """Decisions and texts from the references, for forcing through the model-mode code (the replay test)."""

    def __init__(self, fmt: SequenceFormat, meta: VideoMeta, conversation: int):
        self.fmt, self.meta, self.conversation = fmt, meta, conversation
        self.conv = meta.conversations[conversation]

    def delta(self, row: int) -> dict[str, str] | None:
        d = self.meta.dst_delta[row]
        return json.loads(d) if d else None

    def response(self, row: int) -> list[int] | None:
        return self.fmt.response_body(self.conv.response[row]) if self.conv.speak[row] else None

    def summary(self, row: int) -> list[int]:
        return self.fmt.response_body(progress_before(self.meta, self.conversation, row))


class Streamer:
    """Runs the model over dialogues (no model needed for the baseline modes). `slots` dialogues stream together
    (`dst eval --batch-dialogues`); each dialogue's code is the same generator either way."""

    def __init__(self, model, fmt: SequenceFormat | None, cfg: StreamConfig, device="cpu", slots: int = 1):
        self.fmt, self.cfg = fmt, cfg
        if cfg.mode in ("model", "teacher-forced"):
            if model is None or fmt is None:
                raise ValueError(f"mode {cfg.mode} needs a model")
            if fmt.variant.name != cfg.variant:
                raise ValueError(f"the sequence format is for variant {fmt.variant.name}, the stream for {cfg.variant}")
            self.engine = StreamEngine(
                model, fmt, device, slots, use_cache=cfg.use_cache, capacity=cfg.max_context + 64
            )
            self.session = self.engine.sessions[0]  # the one `run` uses
            self.tokenizer = fmt.tokenizer

    def run(
        self,
        meta: VideoMeta,
        emb: np.ndarray,
        conversation: int,
        thetas: tuple[float, float] | None = None,
        force: bool = False,
    ) -> dict:
        """One dialogue: `{"frames": [...], "reseeds": [...]}`; `emb` is the video's stored embeddings (row 0 =
        first frame). `force`: model mode with ground-truth decisions and texts (the replay test)."""
        if self.cfg.mode not in ("model", "teacher-forced"):
            return self._baseline(meta, conversation)
        self.session.reset()
        return self.engine.drive(self.dialogue(self.session, meta, emb, conversation, thetas, force))

    def run_many(self, jobs: Iterable[tuple]) -> Iterator[tuple[object, dict]]:
        """`jobs` yields `(key, meta, emb, conversation, thetas)`; yields `(key, result)` as dialogues finish
        (with several slots, not in job order)."""
        if self.cfg.mode not in ("model", "teacher-forced"):
            for key, meta, _, conversation, _ in jobs:
                yield key, self._baseline(meta, conversation)
            return
        yield from self.engine.run_many(
            (key, partial(self.dialogue, meta=meta, emb=emb, conversation=c, thetas=thetas))
            for key, meta, emb, c, thetas in jobs
        )

    def _baseline(self, meta: VideoMeta, conversation: int) -> dict:
        n_rows = stream_rows(meta, conversation, self.cfg.protocol)
        return {"frames": baseline(meta, conversation, self.cfg, n_rows), "reseeds": []}

    def dialogue(
        self,
        s: StreamSession,
        meta: VideoMeta,
        emb: np.ndarray,
        conversation: int,
        thetas: tuple[float, float] | None = None,
        force: bool = False,
    ) -> Model:
        """The generator of one dialogue on session `s`; returns `{"frames": [...], "reseeds": [...]}`."""
        n_rows = stream_rows(meta, conversation, self.cfg.protocol)
        theta_update, theta_speak = thetas or (self.cfg.theta_update, self.cfg.theta_speak)
        frames = reference_frames(meta, conversation, n_rows)
        embeds = torch.from_numpy(emb).to(s.dtype)
        nodes = [(n.id, n.name) for n in meta.nodes]
        if self.cfg.mode == "teacher-forced":
            reseeds = yield from self._teacher_forced(s, meta, conversation, frames, embeds, nodes)
            apply_thresholds(frames, theta_update, theta_speak)
        else:
            truth = GroundTruth(self.fmt, meta, conversation) if force else None
            reseeds = yield from self._model(
                s, meta, conversation, frames, embeds, nodes, theta_update, theta_speak, truth
            )
        return {"frames": frames, "reseeds": reseeds}

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _model(self, s, meta, conversation, frames, embeds, nodes, theta_update, theta_speak, truth) -> Model:
        fmt, cfg = self.fmt, self.cfg
        state = dict(meta.initial_state)
        history: list[tuple[str, str]] = []
        reseeds: list[dict] = []
        s.reset()
        yield from s.feed(fmt.system(meta.goal, nodes, state if fmt.variant.tracks_state else None))
        system_chunk = s.chunks[0]
        reserve = (
            len(fmt.frame)
            + generation_budget(fmt, nodes, cfg.max_new_tokens)
            + summary_budget(fmt, cfg.max_summary_tokens)
        )
        for row, f in enumerate(frames):
            user = fmt.user(f["user_text"]) if f["user_text"] else []
            if s.length + len(user) + reserve > cfg.max_context:
                record = yield from self._make_room(
                    s, meta, conversation, row, f["frame"], embeds, nodes, state, history, system_chunk, truth
                )
                reseeds.append(record)
                if s.length + len(user) + reserve > cfg.max_context:
                    raise ValueError(
                        f"{meta.video_uid}: the system prompt ({s.length} tokens) leaves no room for "
                        f"a frame within max_context {cfg.max_context}"
                    )
            if user:
                yield from s.feed(user)
                history.append(("User", f["user_text"]))
            hidden = yield from s.feed(fmt.frame, embeds[row])
            if fmt.variant.tracks_state:
                f["p_update"], _ = s.decisions(hidden)
                can_change = any(v != "completed" for v in state.values())
                fire = truth.delta(row) is not None if truth else f["p_update"] > theta_update and can_change
                if fire:
                    delta, text, hidden = yield from s.update(state, truth.delta(row) if truth else None)
                    state.update(delta)
                    f.update(pred_dst_delta=delta, pred_dst_text=text)
            _, f["p_speak"] = s.decisions(hidden)
            forced = truth.response(row) if truth else None
            if (forced is not None) if truth else f["p_speak"] > theta_speak:
                ids, hidden = yield from s.greedy(fmt.response_prefix, cfg.max_new_tokens, forced)
                text = self._text(ids)
                f["pred_text"] = "" if text in SILENT_TEXTS else text
                if f["pred_text"]:
                    history.append(("Assistant", f["pred_text"]))
            f["pred_state"] = dict(state)
        return reseeds

    def _make_room(
        self, s, meta, conversation, row, frame, embeds, nodes, state, history, system_chunk, truth
    ) -> Model:
        """Apply the context strategy before frame row `row` (absolute frame `frame`); returns the re-seed record."""
        fmt, cfg = self.fmt, self.cfg
        recent = history[-RECENT_TURNS:] if RECENT_TURNS else []  # [-0:] would be everything
        record = {
            "frame": frame,
            "row": row,
            "strategy": cfg.context_strategy,
            "ref_progress": progress_before(meta, conversation, row),
        }
        if cfg.context_strategy == "reseed-oracle":  # the bound: the memory read from the references
            record["strategy"] = f"reseed-oracle-{fmt.variant.name}"
            progress = record["summary"] = record["ref_progress"] if fmt.variant.writes_summary else ""
            if fmt.variant.tracks_state:  # the stream goes on tracking from the reference state
                state.clear()
                state.update(state_before(meta, row))
            yield from s.refeed(
                [(fmt.system(meta.goal, nodes, state if fmt.variant.tracks_state else None, recent, progress), None)]
            )
        elif cfg.context_strategy == "reseed":
            record["strategy"] = f"reseed-{fmt.variant.name}"
            progress = ""
            if fmt.variant.writes_summary:
                if row == 0:
                    raise ValueError(
                        f"{meta.video_uid}: no room for a summary before the first frame within "
                        f"max_context {cfg.max_context}"
                    )
                progress = yield from self._summarize(s, row - 1, embeds, truth.summary(row) if truth else None)
                record["summary"] = progress
            yield from s.refeed(
                [(fmt.system(meta.goal, nodes, state if fmt.variant.tracks_state else None, recent, progress), None)]
            )
        elif cfg.context_strategy == "drop-all":
            yield from s.refeed([system_chunk])
        else:  # drop-middle: the system prompt and the most recent chunks filling half the budget
            tail, used = [], len(system_chunk[0])
            for chunk in reversed(s.chunks[1:]):
                if used + len(chunk[0]) > cfg.max_context // 2:
                    break
                tail.append(chunk)
                used += len(chunk[0])
            yield from s.refeed([system_chunk] + tail[::-1])
        return record

    def _summarize(self, s, last_row: int, embeds, forced: list[int] | None) -> Model:
        """The summary variant's closing block, as in training: the request, the last frame again, and a generated
        progress summary."""
        fmt = self.fmt
        yield from s.feed(fmt.summary_request)
        yield from s.feed(fmt.frame, embeds[last_row])
        ids, _ = yield from s.greedy(fmt.summary_prefix, self.cfg.max_summary_tokens, forced)
        return self._text(ids)

    def _teacher_forced(self, s, meta, conversation, frames, embeds, nodes) -> Model:
        fmt, cfg = self.fmt, self.cfg
        conv = meta.conversations[conversation]
        s.reset()
        yield from s.feed(system_for(fmt, meta, conversation, 0))
        generation = generation_budget(fmt, nodes, cfg.max_new_tokens)
        reseeds = []
        for row, f in enumerate(frames):
            segments = frame_segments(fmt, meta, conversation, row)
            if s.length + frame_cost(fmt, segments) + generation > cfg.max_context:
                # start afresh exactly as a training window starting at this frame would
                yield from s.refeed([(system_for(fmt, meta, conversation, row), None)])
                reseeds.append(
                    {
                        "frame": f["frame"],
                        "row": row,
                        "strategy": "teacher-forced",
                        "ref_progress": progress_before(meta, conversation, row),
                    }
                )
            if segments["user"]:
                yield from s.feed(segments["user"])
            hidden = yield from s.feed(fmt.frame, embeds[row])
            # Without a tracked DST the predicted state stays where the stream started (scored like never-update).
            before = state_before(meta, row) if fmt.variant.tracks_state else dict(meta.initial_state)
            gen_delta, gen_text = {}, ""
            if fmt.variant.tracks_state:
                f["p_update"], _ = s.decisions(hidden)
                if f["p_update"] > cfg.generate_above and any(v != "completed" for v in before.values()):
                    mark = s.length
                    gen_delta, gen_text, _ = yield from s.update(before)
                    s.crop(mark)
                if meta.dst_update[row]:
                    yield from s.feed(fmt.dst_prefix)
                    hidden = yield from s.feed(segments["dst"])
            _, f["p_speak"] = s.decisions(hidden)
            gen_speech = ""
            if f["p_speak"] > cfg.generate_above:
                mark = s.length
                ids, _ = yield from s.greedy(fmt.response_prefix, cfg.max_new_tokens)
                gen_speech = self._text(ids)
                s.crop(mark)
            if conv.speak[row]:
                yield from s.feed(fmt.response_prefix)
                yield from s.feed(segments["response"])
            f.update(
                gen_dst_delta=gen_delta,
                gen_dst_text=gen_text,
                gen_text="" if gen_speech in SILENT_TEXTS else gen_speech,
                state_before=before,
            )
        return reseeds


def apply_thresholds(frames: list[dict], theta_update: float, theta_speak: float) -> list[dict]:
    """Teacher-forced records: predictions at these thresholds from what was generated above `generate_above`
    (the context never held them, so each threshold's predictions are exact)."""
    for f in frames:
        update = f["p_update"] is not None and f["p_update"] > theta_update and bool(f["gen_dst_delta"])
        f["pred_dst_delta"] = f["gen_dst_delta"] if update else {}
        f["pred_dst_text"] = f["gen_dst_text"] if update else ""
        f["pred_state"] = {**f["state_before"], **f["pred_dst_delta"]}
        f["pred_text"] = f["gen_text"] if f["p_speak"] > theta_speak else ""
    return frames
