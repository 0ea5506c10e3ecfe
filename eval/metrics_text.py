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
TEXT_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "METEOR", "semantic_score")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def java_missing_reason() -> str | None:
    return None if shutil.which("java") else "java not found on PATH"


class MeteorScorer:
    """One METEOR 1.5 Java process for any number of corpora; close it (or use `with`). `label` says which METEOR
    produced the numbers, or why there are none."""

    def __init__(self):
        self.reason = java_missing_reason()
        self._meteor: Meteor | None = None
        if self.reason is None:
            try:
                self._meteor = Meteor()
            except OSError as e:
                self.reason = f"could not start METEOR 1.5: {e}"
        if self.reason:
            log.warning("METEOR unavailable (%s): reporting METEOR as null", self.reason)

    @property
    def label(self) -> str:
        return METEOR_NAME if self.reason is None else f"unavailable: {self.reason}"

    def score(self, gts: dict, res: dict) -> float | None:
        if self._meteor is None:
            return None
        try:
            return float(self._meteor.compute_score(gts, res)[0])
        except (OSError, ValueError) as e:  # the Java process died or answered something that is not a number
            self.reason = f"METEOR 1.5 failed: {e!r}"
            log.warning("METEOR unavailable (%s): reporting METEOR as null", self.reason)
            self.close()
            return None

    def close(self) -> None:
        if self._meteor is not None:
            process, self._meteor = self._meteor.meteor_p, None
            process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout, process.stderr):
                pipe.close()

    def __enter__(self) -> "MeteorScorer":
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


def nlg_scores(hyps: list[str], refs: list[str], meteor: MeteorScorer) -> dict:
    """BLEU-1..4, CIDEr, METEOR on already tokenized pairs whose references are non-empty."""
    if not hyps:
        return {"Bleu_1": 0.0, "Bleu_2": 0.0, "Bleu_3": 0.0, "Bleu_4": 0.0, "CIDEr": 0.0,
                "METEOR": None if meteor.reason else 0.0}
    gts = {k: [ref] for k, ref in enumerate(refs)}
    res = {k: [hyp] for k, hyp in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["CIDEr"] = float(cider)
    out["METEOR"] = meteor.score(gts, res)
    return out


def text_metrics(tp_pairs: list[tuple[str, str, float]], matched_scores: list[float],
                 meteor: MeteorScorer | None = None) -> tuple[dict, str]:
    """The text metrics of one dataset's TP pairs `(generated, reference, |cos|)` and the tokenizer label.
    `matched_scores`: |cos| of every prediction matched to a reference. Without `meteor`, one is opened and closed."""
    if meteor is None:
        with MeteorScorer() as own:
            return text_metrics(tp_pairs, matched_scores, own)
    if tp_pairs:
        tokens, tokenizer = tokenize([g for g, _, _ in tp_pairs] + [r for _, r, _ in tp_pairs])
        hyps, refs = tokens[:len(tp_pairs)], tokens[len(tp_pairs):]
        kept = [(h, r) for h, r in zip(hyps, refs) if r]  # ProAssist drops pairs with an empty tokenized reference
        out = nlg_scores([h for h, _ in kept], [r for _, r in kept], meteor)
    else:
        out = nlg_scores([], [], meteor)
        reason = java_missing_reason()
        tokenizer = PTB_TOKENIZER if reason is None else FALLBACK_TOKENIZER.format(reason=reason)
    semantic = [s for s in matched_scores if s >= MATCH_THRESHOLD]
    out["semantic_score"] = float(np.mean(semantic)) if semantic else 0.0
    return out, tokenizer
