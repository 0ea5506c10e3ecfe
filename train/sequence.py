"""The prompt and sequence format: the one builder that training and streaming inference both use.

A sequence is a window of one video for one conversation, built from token-id segments that are tokenized
separately and concatenated (never re-tokenized as a whole), so a streaming replay appends exactly the same ids:

    system:   <|im_start|>System: {instructions}\nGoal: ...\nSteps:\nS1: ...\nState: S1=...; ...   (dst only)
              [\nProgress: {summary}]                                    (summary only, window starts mid-video)
              [\nRecent dialogue:\nUser: ...\nAssistant: ...]<end_of_utterance>
    per frame k:
      user      \nUser: {text}<end_of_utterance>                   (if a user turn sits before frame k)
      frame     <fake_token_around_image><global-img><image>*T<fake_token_around_image>
                                      -> decision A (DST update?) reads the hidden state of the last token here
      dst       \nDST: + [ S2=completed; S3=in_progress]<end_of_utterance>   (if updated; [...] is the target)
                                      -> decision B (speak?) reads the last token before the response slot
      response  \nAssistant: + [ {text}]<end_of_utterance>                 (if speaking; [...] is the target)
    summary variant, a window that stops before the video's end closes with:
      \nSystem: Please summarize the progress.<end_of_utterance>  [the window's last frame block again]
      \nSummary: + [ {progress}]<end_of_utterance>

The `<image>` positions carry the stored frame embeddings (through `inputs_embeds`), T per frame. Prefixes
(`\nDST:`, `\nAssistant:`, `\nSummary:`) are forced once the decision fires, so only the text after them and its
EOS are LM targets: EOS is always learned, and pad (`<|im_end|>`) is never EOS.

Variants (docs/design.md §5): `dst` tracks the state (State line, decision A, DST text); `summary` is ProAssist's
iterative progress summarization (no DST anywhere; the progress summary is the memory across windows); `none` has
neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipeline.shards import VideoMeta
from pipeline.timeline import STATE_RANK
from train.variants import Variant, get_variant

SUMMARY_REQUEST = "Please summarize the progress."
RECENT_TURNS = 3  # dialogue turns carried into a window that starts mid-video (training and every re-seed)


# ----------------------------------------------------------------------------------------------- DST update grammar


def format_state(state: dict[str, str]) -> str:
    """The one writer of the DST grammar: `S1=completed; S2=in_progress` (used for states and updates)."""
    return "; ".join(f"{node}={value}" for node, value in state.items())


def parse_update(text: str, current: dict[str, str]) -> dict[str, str] | None:
    """The one parser: the update `text` against the `current` state, or None when it is not a valid update
    (unknown node, unknown state, a node twice, a state going backwards or not changing, empty)."""
    delta: dict[str, str] = {}
    for clause in text.split(";"):
        node, sep, value = clause.strip().partition("=")
        if not sep or node not in current or value not in STATE_RANK or node in delta:
            return None
        if STATE_RANK[value] <= STATE_RANK[current[node]]:
            return None
        delta[node] = value
    return delta or None


# ----------------------------------------------------------------------------------------------- token segments


class SequenceFormat:
    """Token-id segments for one tokenizer and one number of tokens per frame."""

    def __init__(self, tokenizer, tokens_per_frame: int, variant: str | Variant = "dst"):
        self.tokenizer = tokenizer
        self.tokens_per_frame = tokens_per_frame
        self.variant = get_variant(variant)
        ids = tokenizer.convert_tokens_to_ids
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id == self.eos_id:
            raise ValueError("the tokenizer's pad token must exist and differ from EOS (EOS must be learnable)")
        self.image_id = ids("<image>")
        fake, global_img = ids("<fake_token_around_image>"), ids("<global-img>")
        self.bos = [ids("<|im_start|>")]
        self.frame = [fake, global_img] + [self.image_id] * tokens_per_frame + [fake]
        self.dst_prefix = self.text("\nDST:")
        self.response_prefix = self.text("\nAssistant:")
        self.clause_separator = self.text(";")
        self.summary_request = self.text(f"\nSystem: {SUMMARY_REQUEST}") + [self.eos_id]
        self.summary_prefix = self.text("\nSummary:")

    def text(self, s: str) -> list[int]:
        # split_special_tokens: a literal "<image>" or "<end_of_utterance>" typed in a dialogue stays text, so
        # special ids only ever come from this builder.
        return self.tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def system(
        self,
        goal: str,
        nodes: list[tuple[str, str]],
        state: dict[str, str] | None = None,
        recent: list[tuple[str, str]] = (),
        progress: str = "",
    ) -> list[int]:
        """System segment: instructions, goal, steps with ids, the variant's memory (the DST state for `dst`, a
        progress summary for `summary` when there is one), and recent turns (role, text)."""
        lines = [f"System: {self.variant.instructions}", f"Goal: {goal}", "Steps:"]
        lines += [f"{node_id}: {name}" for node_id, name in nodes]
        if self.variant.tracks_state:
            if state is None:
                raise ValueError("the dst variant's system prompt needs the DST state")
            lines.append(f"State: {format_state(state)}")
        if progress:
            if not self.variant.writes_summary:
                raise ValueError(f"a progress summary belongs to the summary variant, not {self.variant.name!r}")
            lines.append(f"Progress: {progress}")
        if recent:
            lines.append("Recent dialogue:")
            lines += [f"{role}: {text}" for role, text in recent]
        return self.bos + self.text("\n".join(lines)) + [self.eos_id]

    def user(self, text: str) -> list[int]:
        return self.text(f"\nUser: {text}") + [self.eos_id]

    def clause(self, node: str, state: str) -> list[int]:
        return self.text(f" {node}={state}")

    def dst_body(self, delta: dict[str, str]) -> list[int]:
        """The update's target ids: clauses joined by `;`, then EOS (clause by clause, as constrained decoding
        produces them)."""
        body: list[int] = []
        for i, (node, state) in enumerate(delta.items()):
            body += (self.clause_separator if i else []) + self.clause(node, state)
        return body + [self.eos_id]

    def response_body(self, text: str) -> list[int]:
        """Generated text after a forced prefix (a response, or a progress summary): ` {text}` + EOS."""
        return self.text(f" {text}") + [self.eos_id]


# ----------------------------------------------------------------------------------------------- windows


@dataclass
class Sequence:
    """A built window. Positions index `input_ids`. `frame_rows[i]` is the stored-embedding row (relative to the
    video's first frame) of the i-th frame block; its T `<image>` positions are in `image_positions`."""

    input_ids: list[int] = field(default_factory=list)
    image_positions: list[int] = field(default_factory=list)
    frame_rows: list[int] = field(default_factory=list)
    update_positions: list[int] = field(default_factory=list)  # decision A read positions, one per frame
    update_labels: list[int] = field(default_factory=list)
    speak_positions: list[int] = field(default_factory=list)  # decision B read positions, one per frame
    speak_labels: list[int] = field(default_factory=list)
    dst_targets: list[int] = field(default_factory=list)  # positions of DST text target tokens
    response_targets: list[int] = field(default_factory=list)  # positions of response target tokens
    summary_targets: list[int] = field(default_factory=list)  # positions of progress-summary target tokens

    def extend(self, ids: list[int]) -> int:
        """Append ids; return the position of the last one."""
        self.input_ids += ids
        return len(self.input_ids) - 1

    def extend_target(self, ids: list[int], targets: list[int]) -> int:
        start = len(self.input_ids)
        targets += range(start, start + len(ids))
        return self.extend(ids)


def state_before(meta: VideoMeta, row: int) -> dict[str, str]:
    """The model's input state at frame row `row` (relative): the state after the previous point."""
    return meta.initial_state if row == 0 else json.loads(meta.dst_state[row - 1])


def progress_before(meta: VideoMeta, conversation: int, row: int) -> str:
    """The progress summary of the latest assistant turn with one before frame row `row` ("" if none): what a
    window starting at `row` carries, and the target of the summary that closes a window ending at `row`."""
    progress = meta.conversations[conversation].progress
    return next((progress[i] for i in range(min(row, len(progress)) - 1, -1, -1) if progress[i]), "")


def recent_turns(meta: VideoMeta, conversation: int, row: int, limit: int = RECENT_TURNS) -> list[tuple[str, str]]:
    """The last `limit` dialogue turns placed before frame row `row` of this conversation, oldest first."""
    conv = meta.conversations[conversation]
    turns = []
    for i in range(row):
        if conv.user_text[i]:
            turns.append(("User", conv.user_text[i]))
        if conv.response[i]:
            turns.append(("Assistant", conv.response[i]))
    return turns[-limit:] if limit else []


def system_for(fmt: SequenceFormat, meta: VideoMeta, conversation: int, row: int) -> list[int]:
    """The system segment of a window starting at frame row `row`, from the references."""
    nodes = [(n.id, n.name) for n in meta.nodes]
    state = state_before(meta, row) if fmt.variant.tracks_state else None
    progress = progress_before(meta, conversation, row) if fmt.variant.writes_summary else ""
    return fmt.system(meta.goal, nodes, state, recent_turns(meta, conversation, row), progress)


def frame_segments(fmt: SequenceFormat, meta: VideoMeta, conversation: int, row: int) -> dict[str, list[int]]:
    """The segments of frame row `row`, by name, for costing and building (absent ones are empty)."""
    conv = meta.conversations[conversation]
    user = conv.user_text[row]
    delta = meta.dst_delta[row]
    response = conv.response[row]
    return {
        "user": fmt.user(user) if user else [],
        "dst": fmt.dst_body(json.loads(delta)) if delta and fmt.variant.tracks_state else [],
        "response": fmt.response_body(response) if response else [],
    }


def frame_cost(fmt: SequenceFormat, segments: dict[str, list[int]]) -> int:
    """Tokens one frame adds to a sequence."""
    return (
        len(segments["user"])
        + len(fmt.frame)
        + (len(fmt.dst_prefix) + len(segments["dst"]) if segments["dst"] else 0)
        + (len(fmt.response_prefix) + len(segments["response"]) if segments["response"] else 0)
    )


def closing_cost(fmt: SequenceFormat, meta: VideoMeta, conversation: int, end: int) -> int:
    """Tokens of the block that closes a window ending before frame row `end` (summary variant only)."""
    if not fmt.variant.writes_summary or end >= meta.num_rows:
        return 0
    return (
        len(fmt.summary_request)
        + len(fmt.frame)
        + len(fmt.summary_prefix)
        + len(fmt.response_body(progress_before(meta, conversation, end)))
    )


def append_frame_block(fmt: SequenceFormat, seq: Sequence, row: int) -> int:
    """The frame's tokens (its `<image>` positions carry embedding row `row`); returns the last position."""
    start = len(seq.input_ids)
    last = seq.extend(fmt.frame)
    seq.image_positions += range(start + 2, start + 2 + fmt.tokens_per_frame)
    seq.frame_rows.append(row)
    return last


def append_frame(
    fmt: SequenceFormat, seq: Sequence, row: int, segments: dict[str, list[int]], update: bool, speak: bool
) -> None:
    """Append one frame with its decisions; `update`/`speak` are the labels (ground truth in training)."""
    if segments["user"]:
        seq.extend(segments["user"])
    read = append_frame_block(fmt, seq, row)
    if fmt.variant.tracks_state:
        seq.update_positions.append(read)
        seq.update_labels.append(int(update))
    if update and fmt.variant.tracks_state:
        seq.extend(fmt.dst_prefix)
        read = seq.extend_target(segments["dst"], seq.dst_targets)
    seq.speak_positions.append(read)
    seq.speak_labels.append(int(speak))
    if speak:
        seq.extend(fmt.response_prefix)
        seq.extend_target(segments["response"], seq.response_targets)


def append_summary(fmt: SequenceFormat, seq: Sequence, last_row: int, summary: list[int]) -> None:
    """The summary variant's closing block: the request, frame `last_row` again, `\nSummary:` + `summary` (target
    ids: ` {progress}` + EOS)."""
    seq.extend(fmt.summary_request)
    append_frame_block(fmt, seq, last_row)
    seq.extend(fmt.summary_prefix)
    seq.extend_target(summary, seq.summary_targets)


def build_window(fmt: SequenceFormat, meta: VideoMeta, conversation: int, start: int, end: int) -> Sequence:
    """The training sequence of frame rows [start, end) of one conversation (with the summary variant's closing
    block when it stops before the video's end)."""
    seq = Sequence()
    seq.extend(system_for(fmt, meta, conversation, start))
    conv = meta.conversations[conversation]
    for row in range(start, end):
        append_frame(fmt, seq, row, frame_segments(fmt, meta, conversation, row), meta.dst_update[row], conv.speak[row])
    if closing_cost(fmt, meta, conversation, end):
        append_summary(fmt, seq, end - 1, fmt.response_body(progress_before(meta, conversation, end)))
    return seq
