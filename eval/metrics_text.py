"""Text quality of the TP pairs, as ProAssist computes it (its NLGEval): PTB tokenization (lowercased, punctuation
dropped), pairs whose tokenized reference is empty dropped, then corpus-level BLEU-1..4 (`Bleu(4)`), CIDEr and
METEOR 1.5's aggregate score, all from `pycocoevalcap`; plus `semantic_score`, the mean |cos| over the predictions
matched to a reference with |cos| >= 0.5 (ProAssist's `>=`, while a TP needs `> 0.5`).

No pairs: every number is 0.0 (ProAssist), except METEOR, which is None whenever it is unavailable.
Without Java: METEOR is None (a warning names the reason) and tokenization falls back to FALLBACK_TOKENIZER, which
the result names: those numbers are not comparable with ProAssist's.
"""

from __future__ import annotations

import logging
import re
import shutil
import string
import threading
from collections.abc import Callable

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from eval.metrics_speak import MATCH_THRESHOLD

log = logging.getLogger(__name__)

METEOR_NAME = "pycocoevalcap METEOR 1.5"
PTB_TOKENIZER = "PTB (pycocoevalcap, stanford-corenlp 3.4.1)"
FALLBACK_TOKENIZER = "fallback: lowercase, ASCII punctuation removed, whitespace split (no PTB: {reason})"
# Deadline of one METEOR call: a base (JVM start-up, loading the paraphrase tables) plus a share per pair.
METEOR_TIMEOUT_S = 120.0
METEOR_PER_PAIR_S = 0.02
TEXT_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "METEOR", "semantic_score")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def java_missing_reason() -> str | None:
    return None if shutil.which("java") else "java not found on PATH"


class MeteorFailure(RuntimeError):
    """The METEOR process timed out, died or answered something that is not a number."""


class MeteorScorer:
    """One METEOR 1.5 Java process for any number of corpora; close it (or use `with`). `label` says which METEOR
    produced the numbers, or why there are none; `failures` lists what went wrong on the way.

    The Java process can die (it does on very long matched pairs) or stall, and pycocoevalcap then blocks on a pipe
    forever. So each corpus is scored in a worker thread with a deadline (`timeout_s` plus `per_pair_s` per pair);
    on a timeout or error the process is killed and restarted once (for this and later corpora); a second failure
    turns METEOR off for the rest of the run (null from then on). `factory` makes the scorer object (a
    pycocoevalcap `Meteor` by default; tests pass a fake that hangs or dies)."""

    def __init__(
        self,
        factory: Callable[[], object] | None = None,
        timeout_s: float = METEOR_TIMEOUT_S,
        per_pair_s: float = METEOR_PER_PAIR_S,
    ):
        self.factory, self.timeout_s, self.per_pair_s = factory or Meteor, timeout_s, per_pair_s
        self.failures: list[str] = []
        self.restarted = False
        self._meteor = None
        self.reason = java_missing_reason() if factory is None else None
        if self.reason is None:
            self._start()
        if self.reason:
            log.warning("METEOR unavailable (%s): reporting METEOR as null", self.reason)

    def _start(self) -> None:
        try:
            self._meteor = self.factory()
        except OSError as e:
            self.reason = f"could not start METEOR 1.5: {e}"

    @property
    def label(self) -> str:
        if self.reason is not None:
            return f"unavailable: {self.reason}"
        return METEOR_NAME + (" (restarted once after a failure)" if self.restarted else "")

    def _call(self, gts: dict, res: dict) -> float:
        """compute_score with a deadline; MeteorFailure on a timeout, a dead process or a non-number."""
        result: dict = {}

        def work():
            try:
                result["score"] = float(self._meteor.compute_score(gts, res)[0])
            except (OSError, ValueError) as e:  # a broken pipe, or "" read from a dead process
                result["error"] = e

        worker = threading.Thread(target=work, name="meteor", daemon=True)  # daemon: a stuck one never blocks exit
        worker.start()
        deadline = self.timeout_s + self.per_pair_s * len(gts)
        worker.join(deadline)
        if worker.is_alive():
            self._kill(worker)
            raise MeteorFailure(f"no answer within {deadline:.0f} s ({len(gts)} pairs)")
        if "error" in result:
            self._kill(worker)
            raise MeteorFailure(f"the METEOR process failed: {result['error']!r}")
        return result["score"]

    def score(self, gts: dict, res: dict, corpus: str = "") -> float | None:
        """METEOR 1.5's aggregate score of one corpus, or None when METEOR is unavailable or gave up."""
        while self._meteor is not None:
            try:
                return self._call(gts, res)
            except MeteorFailure as e:
                self.failures.append(f"{corpus or 'corpus'}: {e}")
                log.warning("METEOR on %s: %s", corpus or "a corpus", e)
                if self.restarted:
                    self.reason = f"METEOR 1.5 failed again after a restart ({e}); METEOR is null from here on"
                    log.warning("METEOR unavailable (%s)", self.reason)
                    return None
                self.restarted = True
                self._start()
        return None

    def _kill(self, worker: threading.Thread | None = None) -> None:
        """Kill the process, let a blocked worker see the closed pipe, and free pycocoevalcap's lock (a failed call
        leaves it held, and `Meteor.__del__` would then wait on it forever)."""
        meteor, self._meteor = self._meteor, None
        process = getattr(meteor, "meteor_p", None)
        if process is not None:
            process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                if pipe is not None:
                    try:
                        pipe.close()
                    except BrokenPipeError:  # unflushed input to the process just killed: nothing to save
                        pass
        if worker is not None:
            worker.join(5.0)
        lock = getattr(meteor, "lock", None)
        if lock is not None and lock.locked():
            lock.release()

    def close(self) -> None:
        if self._meteor is not None:
            self._kill()

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def simple_tokenize(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def tokenize(texts: list[str]) -> tuple[list[str], str]:
    """Tokenized texts (space-joined) and the tokenizer's label: PTB through Java, else the documented fallback."""
    # One text per line for PTB's -preserveLines: fold every whitespace run (\r would start a new line in Java).
    texts = [" ".join(t.split()) for t in texts]
    reason = java_missing_reason()
    if reason is None:
        try:
            out = PTBTokenizer().tokenize({k: [{"caption": t}] for k, t in enumerate(texts)})
            lost = sum(1 for k, t in enumerate(texts) if t and k not in out)
            if not lost:  # PTB drops trailing empty lines: a missing key of an empty text is fine
                return [out.get(k, [""])[0] for k in range(len(texts))], PTB_TOKENIZER
            reason = f"PTB tokenizer returned no line for {lost} of {len(texts)} texts"
        except OSError as e:  # e.g. the package folder (PTB writes its temp file there) is read-only
            reason = f"PTB tokenizer failed: {e}"
    log.warning("PTB tokenizer unavailable (%s): using the simple fallback tokenizer", reason)
    return [simple_tokenize(t) for t in texts], FALLBACK_TOKENIZER.format(reason=reason)


def nlg_scores(hyps: list[str], refs: list[str], meteor: MeteorScorer, corpus: str = "") -> dict:
    """BLEU-1..4, CIDEr, METEOR on already tokenized pairs whose references are non-empty."""
    if not hyps:
        return {
            "Bleu_1": 0.0,
            "Bleu_2": 0.0,
            "Bleu_3": 0.0,
            "Bleu_4": 0.0,
            "CIDEr": 0.0,
            "METEOR": None if meteor.reason else 0.0,
        }
    gts = {k: [ref] for k, ref in enumerate(refs)}
    res = {k: [hyp] for k, hyp in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["CIDEr"] = float(cider)
    out["METEOR"] = meteor.score(gts, res, corpus)
    return out


def text_metrics(
    tp_pairs: list[tuple[str, str, float]],
    matched_scores: list[float],
    meteor: MeteorScorer | None = None,
    corpus: str = "",
) -> tuple[dict, str]:
    """The text metrics of one dataset's TP pairs `(generated, reference, |cos|)` and the tokenizer label.
    `matched_scores`: |cos| of every prediction matched to a reference. Without `meteor`, one is opened and closed.
    `corpus` names the dataset in METEOR's failure notes."""
    if meteor is None:
        with MeteorScorer() as own:
            return text_metrics(tp_pairs, matched_scores, own, corpus)
    if tp_pairs:
        tokens, tokenizer = tokenize([g for g, _, _ in tp_pairs] + [r for _, r, _ in tp_pairs])
        hyps, refs = tokens[: len(tp_pairs)], tokens[len(tp_pairs) :]
        kept = [(h, r) for h, r in zip(hyps, refs) if r]  # ProAssist drops pairs with an empty tokenized reference
        out = nlg_scores([h for h, _ in kept], [r for _, r in kept], meteor, corpus)
    else:
        out = nlg_scores([], [], meteor)
        reason = java_missing_reason()
        tokenizer = PTB_TOKENIZER if reason is None else FALLBACK_TOKENIZER.format(reason=reason)
    semantic = [s for s in matched_scores if s >= MATCH_THRESHOLD]
    out["semantic_score"] = float(np.mean(semantic)) if semantic else 0.0
    return out, tokenizer
