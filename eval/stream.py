"""Streaming a dialogue: the model watches frame by frame and its outputs become prediction records.

Modes:
- `model`: the real setting. The context holds the model's own DST updates and responses; when the cache would
  exceed `max_context`, a context strategy makes room: `dst-reseed` (system prompt with the current tracked DST and
  the last turns), `drop-all` (system prompt with the stream-start state, no turns), `drop-middle` (system prompt
  plus the most recent half of the context, re-fed).
- `teacher-forced`: the context holds the ground-truth dialogue and DST; the model's decisions (and what it would
  generate wherever a decision's probability exceeds `generate_above`) are recorded but never enter the context,
  so thresholds can be swept after one pass.
- `oracle` (references as predictions), `never` (silent, no updates), `periodic` (a fixed sentence every
  `every_s` seconds): baselines that need no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from eval.session import StreamSession
from train.sequence import SequenceFormat, format_state, frame_cost, frame_segments, state_before, system_for

MODES = ("model", "teacher-forced", "oracle", "never", "periodic")
CONTEXT_STRATEGIES = ("dst-reseed", "drop-all", "drop-middle")
PERIODIC_TEXT = "Keep going, you are doing well."


@dataclass(frozen=True)
class StreamConfig:
    mode: str = "model"
    theta_update: float = 0.5
    theta_speak: float = 0.5
    max_new_tokens: int = 48
    max_context: int = 4096
    context_strategy: str = "dst-reseed"
    recent_turns: int = 3
    every_s: float = 10.0
    generate_above: float = 0.05  # teacher-forced: generate wherever p exceeds this, for post-hoc sweeps
    use_cache: bool = True  # False recomputes the whole context every step (reference and benchmark only)


def reference_frames(meta: dict, conversation: int) -> list[dict]:
    """Per frame: the inputs and the references, with empty predictions."""
    labels, conv = meta["labels"], meta["labels"]["conversations"][conversation]
    return [{"frame": frame, "time": labels["time"][row], "user_text": conv["user_text"][row],
             "p_update": None, "p_speak": None, "pred_dst_delta": {},
             "ref_dst_delta": json.loads(labels["dst_delta"][row]) if labels["dst_delta"][row] else {},
             "pred_state": {}, "ref_state": json.loads(labels["dst_state"][row]), "pred_text": "",
             "ref_text": conv["response"][row], "pred_dst_text": ""}
            for row, frame in enumerate(labels["frame"])]


def baseline(meta: dict, conversation: int, cfg: StreamConfig) -> list[dict]:
    frames = reference_frames(meta, conversation)
    every = max(1, round(cfg.every_s * meta["fps"]))
    for row, f in enumerate(frames):
        if cfg.mode == "oracle":
            f.update(p_update=float(bool(f["ref_dst_delta"])), p_speak=float(bool(f["ref_text"])),
                     pred_dst_delta=f["ref_dst_delta"], pred_state=f["ref_state"], pred_text=f["ref_text"],
                     pred_dst_text=format_state(f["ref_dst_delta"]))
        else:  # never / periodic: no DST updates, the state stays where the stream started
            f.update(pred_state=dict(meta["initial_state"]))
            if cfg.mode == "periodic" and (row + 1) % every == 0:
                f["pred_text"] = PERIODIC_TEXT
    return frames


def generation_budget(fmt: SequenceFormat, nodes: list[tuple[str, str]], max_new_tokens: int) -> int:
    """Most tokens one frame's generated update and response can add (EOS included)."""
    clause = max(len(fmt.clause(n, v)) for n, _ in nodes for v in ("in_progress", "completed"))
    return (len(fmt.dst_prefix) + (clause + len(fmt.clause_separator)) * len(nodes) + 1
            + len(fmt.response_prefix) + max_new_tokens + 1)


class Streamer:
    """Runs the model over dialogues with one StreamSession (no model needed for the baseline modes)."""

    def __init__(self, model, fmt: SequenceFormat | None, cfg: StreamConfig, device="cpu"):
        self.fmt, self.cfg = fmt, cfg
        if cfg.mode in ("model", "teacher-forced"):
            if model is None or fmt is None:
                raise ValueError(f"mode {cfg.mode} needs a model")
            self.session = StreamSession(model, fmt, device, use_cache=cfg.use_cache)
            self.tokenizer = fmt.tokenizer
            self.dtype = self.session.dtype

    def run(self, meta: dict, emb: np.ndarray, conversation: int, thetas: tuple[float, float] | None = None):
        """Prediction frames for one dialogue; `emb` is the video's stored embeddings (row 0 = first frame)."""
        if self.cfg.mode not in ("model", "teacher-forced"):
            return baseline(meta, conversation, self.cfg)
        theta_update, theta_speak = thetas or (self.cfg.theta_update, self.cfg.theta_speak)
        frames = reference_frames(meta, conversation)
        embeds = torch.from_numpy(emb).to(self.dtype)
        nodes = [(n["id"], n["name"]) for n in meta["nodes"]]
        run = self._teacher_forced if self.cfg.mode == "teacher-forced" else self._model
        run(meta, conversation, frames, embeds, nodes, theta_update, theta_speak)
        return frames

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _model(self, meta, conversation, frames, embeds, nodes, theta_update, theta_speak) -> None:
        fmt, cfg, s = self.fmt, self.cfg, self.session
        state = dict(meta["initial_state"])
        history: list[tuple[str, str]] = []
        s.reset()
        s.feed(fmt.system(meta["goal"], nodes, state))
        system_chunk = s.chunks[0]
        reserve = len(fmt.frame) + generation_budget(fmt, nodes, cfg.max_new_tokens)
        for row, f in enumerate(frames):
            user = fmt.user(f["user_text"]) if f["user_text"] else []
            if s.length + len(user) + reserve > cfg.max_context:
                self._make_room(meta, nodes, state, history, system_chunk)
                if s.length + len(user) + reserve > cfg.max_context:
                    raise ValueError(f"{meta['video_uid']}: the system prompt ({s.length} tokens) leaves no room for "
                                     f"a frame within max_context {cfg.max_context}")
            if user:
                s.feed(user)
                history.append(("User", f["user_text"]))
            hidden = s.feed(fmt.frame, embeds[row])
            f["p_update"], _ = s.decisions(hidden)
            can_change = any(v != "completed" for v in state.values())
            if f["p_update"] > theta_update and can_change:
                delta, text, hidden = s.update(s.feed(fmt.dst_prefix), state)
                state.update(delta)
                f.update(pred_dst_delta=delta, pred_dst_text=text)
            _, f["p_speak"] = s.decisions(hidden)
            if f["p_speak"] > theta_speak:
                ids, hidden = s.greedy(s.feed(fmt.response_prefix), cfg.max_new_tokens)
                f["pred_text"] = self._text(ids)
                history.append(("Assistant", f["pred_text"]))
            f["pred_state"] = dict(state)

    def _make_room(self, meta, nodes, state, history, system_chunk) -> None:
        fmt, cfg, s = self.fmt, self.cfg, self.session
        if cfg.context_strategy == "dst-reseed":
            recent = history[-cfg.recent_turns:] if cfg.recent_turns else []  # [-0:] would be everything
            s.refeed([(fmt.system(meta["goal"], nodes, state, recent), None)])
        elif cfg.context_strategy == "drop-all":
            s.refeed([(fmt.system(meta["goal"], nodes, meta["initial_state"]), None)])
        else:  # drop-middle: the system prompt and the most recent chunks filling half the budget
            tail, used = [], len(system_chunk[0])
            for chunk in reversed(s.chunks[1:]):
                if used + len(chunk[0]) > cfg.max_context // 2:
                    break
                tail.append(chunk)
                used += len(chunk[0])
            s.refeed([system_chunk] + tail[::-1])

    def _teacher_forced(self, meta, conversation, frames, embeds, nodes, theta_update, theta_speak) -> None:
        fmt, cfg, s = self.fmt, self.cfg, self.session
        labels, conv = meta["labels"], meta["labels"]["conversations"][conversation]
        s.reset()
        s.feed(system_for(fmt, meta, conversation, 0))
        generation = generation_budget(fmt, nodes, cfg.max_new_tokens)
        for row, f in enumerate(frames):
            segments = frame_segments(fmt, meta, conversation, row)
            if s.length + frame_cost(fmt, segments) + generation > cfg.max_context:
                # start afresh exactly as a training window starting at this frame would
                s.refeed([(system_for(fmt, meta, conversation, row), None)])
            if segments["user"]:
                s.feed(segments["user"])
            hidden = s.feed(fmt.frame, embeds[row])
            before = state_before(meta, row)
            f["p_update"], _ = s.decisions(hidden)
            gen_delta, gen_text = {}, ""
            if f["p_update"] > cfg.generate_above and any(v != "completed" for v in before.values()):
                mark = s.length
                gen_delta, gen_text, _ = s.update(s.feed(fmt.dst_prefix), before)
                s.crop(mark)
            if labels["dst_update"][row]:
                s.feed(fmt.dst_prefix)
                hidden = s.feed(segments["dst"])
            _, f["p_speak"] = s.decisions(hidden)
            gen_speech = ""
            if f["p_speak"] > cfg.generate_above:
                mark = s.length
                ids, _ = s.greedy(s.feed(fmt.response_prefix), cfg.max_new_tokens)
                gen_speech = self._text(ids)
                s.crop(mark)
            if conv["speak"][row]:
                s.feed(fmt.response_prefix)
                s.feed(segments["response"])
            f.update(gen_dst_delta=gen_delta, gen_dst_text=gen_text, gen_text=gen_speech, state_before=before)
        apply_thresholds(frames, theta_update, theta_speak)


def apply_thresholds(frames: list[dict], theta_update: float, theta_speak: float) -> list[dict]:
    """Teacher-forced records: predictions at these thresholds from what was generated above `generate_above`
    (the context never held them, so each threshold's predictions are exact)."""
    for f in frames:
        update = f["p_update"] > theta_update and bool(f["gen_dst_delta"])
        f["pred_dst_delta"] = f["gen_dst_delta"] if update else {}
        f["pred_dst_text"] = f["gen_dst_text"] if update else ""
        f["pred_state"] = {**f["state_before"], **f["pred_dst_delta"]}
        f["pred_text"] = f["gen_text"] if f["p_speak"] > theta_speak else ""
    return frames
