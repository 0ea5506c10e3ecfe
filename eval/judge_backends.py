"""Where `dst judge` gets its answers: an OpenAI-compatible HTTP endpoint or a local Hugging Face causal LM, and
the resumable cache of answers both go through.

- `HttpJudge`: the `openai` client (`base_url` = `--judge-url`, e.g. vLLM's `http://HOST:8000/v1`), which retries
  connection errors, timeouts, 429 and 5xx answers with backoff (`--retries`) and gives up after `--timeout-s` per
  request. One request asks for all missing samples of a dialogue (`n`); a server that returns fewer choices than
  asked is asked again for the rest.
- `LocalJudge`: `AutoModelForCausalLM` and the tokenizer's chat template; `smollm2-135m` is the offline
  SmolLM2-135M-Instruct as pipeline/models.py loads it (pipeline/smollm2.py's converted copy: SmolLM2's language
  weights in SmolVLM2's shape, used text-only) with SmolLM2's own ChatML prompt. The prompt is read once per
  dialogue and every sample continues a copy of its KV cache. Each sample is drawn with its own seed, derived
  from its cache key (which holds `--seed`), so a sample does not depend on the order or on which samples a
  resumed run still had to draw. Top-k is off, as in vLLM's default sampling.
- `AnswerCache` (`judge_cache.jsonl` in the output folder): one line per answer, appended, flushed and synced as
  soon as it arrives, keyed by a hash of everything that determines the answer's distribution (backend, model,
  messages, temperature, top_p, max_tokens, the local seed) and the sample's index, so a killed run asks for
  nothing it already has, and a changed setting asks again. The server's URL is not part of the key (the same
  model moved to another host answers from the same distribution).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from core.errors import DataError, InputError

CACHE_NAME = "judge_cache.jsonl"
SMOKE_MODEL = "smollm2-135m"  # pipeline/smollm2.py's name for the offline SmolLM2-135M-Instruct
PLACEHOLDER_KEY = "EMPTY"  # what vLLM started without --api-key accepts; the openai client refuses an empty key


class JudgeError(InputError):
    """The judge cannot run as asked: bad predictions, an unreachable or refusing endpoint, a model that does not
    load, a damaged cache. The one-line message names the file, endpoint or model (exit 2)."""


class JudgeDataError(DataError):
    """The predictions were read but hold nothing to judge (exit 1)."""


def sample_key(identity: dict, messages: list[dict], index: int) -> str:
    text = json.dumps({"judge": identity, "messages": messages, "sample": index}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AnswerCache:
    """key -> answer text, read from `path` and appended to it (thread-safe). A last line cut short by a killed
    run is dropped (cut off the file before the next append); a damaged line elsewhere is refused."""

    def __init__(self, path: Path):
        self.path = path
        self.answers: dict[str, str] = {}
        self._good_length = 0  # bytes up to the last complete line
        self._handle = None
        self._lock = threading.Lock()
        if path.is_dir():
            raise JudgeError(f"{path}: the answer cache is a folder; remove it or choose another --out")
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise JudgeError(f"{self.path}: cannot read the answer cache ({e})") from None
        self._good_length = data.rfind(b"\n") + 1
        for n, line in enumerate(data[: self._good_length].decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not (
                isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("text"), str)
            ):
                raise JudgeError(
                    f"{self.path} line {n}: not a cached answer; the cache is damaged: delete it "
                    f"(its answers will be asked for again)"
                )
            self.answers[entry["key"]] = entry["text"]

    def __contains__(self, key: str) -> bool:
        return key in self.answers

    def add(self, key: str, text: str, dialogue: str, index: int) -> None:
        line = json.dumps({"key": key, "dialogue": dialogue, "sample": index, "text": text}, ensure_ascii=False)
        with self._lock:
            if self._handle is None:  # opened at the first answer: a run that gets none writes nothing
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = open(self.path, "ab")
                self._handle.truncate(self._good_length)
            self._handle.write(line.encode("utf-8") + b"\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self.answers[key] = text

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


# ----------------------------------------------------------------------------------------------- HTTP


class HttpJudge:
    kind = "http"
    concurrent = True

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key_env: str,
        temperature: float,
        top_p: float,
        max_tokens: int | None,
        timeout_s: float,
        retries: int,
    ):
        from openai import OpenAI  # only the HTTP judge needs it

        self.url, self.model, self.retries, self.timeout_s = url, model, retries, timeout_s
        self.sampling = {"temperature": temperature, "top_p": top_p}
        if max_tokens is not None:  # unset: the server's limit, like ProAssist's 128K cap
            self.sampling["max_tokens"] = max_tokens
        self.client = OpenAI(
            base_url=url, api_key=os.environ.get(api_key_env) or PLACEHOLDER_KEY, timeout=timeout_s, max_retries=retries
        )
        self.api_key_env = api_key_env

    def answers(self, messages: list[dict], slots: list[tuple[int, str]], where: str) -> Iterator[tuple[int, str]]:
        pending = [index for index, _ in slots]
        while pending:
            texts = self._complete(messages, len(pending), where)
            for text in texts[: len(pending)]:
                yield pending.pop(0), text

    def _complete(self, messages: list[dict], n: int, where: str) -> list[str]:
        import openai

        try:
            response = self.client.chat.completions.create(model=self.model, messages=messages, n=n, **self.sampling)
        except openai.APITimeoutError:
            raise JudgeError(
                f"the judge endpoint {self.url} gave no answer within {self.timeout_s:g} s "
                f"({self.retries} retries) for {where}"
            ) from None
        except openai.APIConnectionError as e:
            cause = f": {e.__cause__}" if e.__cause__ else ""
            raise JudgeError(
                f"cannot reach the judge endpoint {self.url} after {self.retries} retries{cause}"
            ) from None
        except openai.AuthenticationError:
            raise JudgeError(
                f"the judge endpoint {self.url} refused the API key (401); put the key in ${self.api_key_env}"
            ) from None
        except openai.NotFoundError as e:
            raise JudgeError(
                f"the judge endpoint {self.url} answered 404 ({e.message}); --judge-url is the "
                f"server's OpenAI base (e.g. http://HOST:8000/v1) and --judge-model a model it "
                f"serves"
            ) from None
        except openai.APIStatusError as e:
            raise JudgeError(
                f"the judge endpoint {self.url} answered {e.status_code} for {where}: {e.message}"
            ) from None
        except json.JSONDecodeError as e:  # the client parses the body itself and lets this through
            raise JudgeError(
                f"the judge endpoint {self.url} answered with a body that is not JSON for {where} "
                f"({e.msg}); is --judge-url an OpenAI-compatible server?"
            ) from None
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise JudgeError(
                f"the judge endpoint {self.url} did not answer with an OpenAI chat completion (no choices) for {where}"
            )
        return [(c.message.content if c.message is not None else None) or "" for c in choices]


# ----------------------------------------------------------------------------------------------- local


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
CHATML_END = "<|im_end|>"


def chatml(messages: list[dict]) -> str:
    """SmolLM2-135M-Instruct's own chat format (ChatML, as pipeline/smollm2.py's REFERENCE_PROMPT): the converted
    tokenizer carries SmolVLM2's template, which the instruction-tuned language weights never saw."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


class LocalJudge:
    kind = "local"
    concurrent = False  # one model in this process: samples are drawn one after another

    def __init__(self, model: str, *, temperature: float, top_p: float, max_tokens: int | None, seed: int, device: str):
        import torch

        self.model_name, self.seed = model, seed
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if model == SMOKE_MODEL:
            from pipeline.models import load_model

            self.model, self.tokenizer = load_model(SMOKE_MODEL, device=self.device)  # InputError when missing
            self.stop = [self.tokenizer.convert_tokens_to_ids(CHATML_END), self.tokenizer.eos_token_id]
        else:
            self.model, self.tokenizer = self._load_causal_lm(model)
            self.stop = None  # the model's generation_config says where it stops
        self.context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def _load_causal_lm(self, model: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(model).expanduser()
        if model.startswith((".", "/", "~")) or folder.exists():  # a path, not a hub name: say what is wrong with it
            if not (folder / "config.json").is_file():
                raise JudgeError(
                    f"--judge-model {model!r} is not a model folder (no config.json); pass a folder "
                    f"written by save_pretrained, a hub name, or {SMOKE_MODEL}"
                )
            model = str(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
            lm = AutoModelForCausalLM.from_pretrained(model, dtype="auto").to(self.device).eval()
        except (OSError, ValueError) as e:  # hub/network errors are OSError; a folder of another kind ValueError
            raise JudgeError(f"cannot load the judge model {model!r} ({e})") from None
        if not tokenizer.chat_template:
            raise JudgeError(f"the judge model {model!r} has no chat template; the judge needs a chat model")
        return lm, tokenizer

    def _prompt(self, messages: list[dict]):
        if self.model_name == SMOKE_MODEL:
            return self.tokenizer(chatml(messages), add_special_tokens=False, return_tensors="pt")
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )

    def answers(self, messages: list[dict], slots: list[tuple[int, str]], where: str) -> Iterator[tuple[int, str]]:
        import torch
        from transformers import DynamicCache

        inputs = self._prompt(messages).to(self.device)
        length = inputs["input_ids"].shape[1]
        room = None if self.context is None else self.context - length
        if room is not None and room < 1:
            raise JudgeError(
                f"{where}: the judge prompt has {length} tokens, more than {self.model_name!r} reads ({self.context})"
            )
        new_tokens = min(x for x in (self.max_tokens, room, 1 << 30) if x is not None)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        sampling = (
            {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
            if self.temperature > 0
            else {"do_sample": False}
        )
        if self.stop is not None:
            sampling["eos_token_id"] = self.stop
        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        with torch.no_grad():  # the prompt is read once per dialogue; each sample continues a copy of its cache
            prefix = DynamicCache()
            self.model(
                input_ids=inputs["input_ids"][:, :-1],
                attention_mask=inputs["attention_mask"][:, :-1],
                cache=prefix,
                use_cache=True,
            )
            for index, key in slots:
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(int(key[:15], 16))  # the sample's own seed (see the module docstring)
                    out = self.model.generate(
                        **inputs, cache=copy.deepcopy(prefix), max_new_tokens=new_tokens, pad_token_id=pad, **sampling
                    )
                yield index, self.tokenizer.decode(out[0, length:], skip_special_tokens=True)


def identity(cfg) -> dict:
    """What determines the distribution of a judge's answers (the cache key's part that is not the prompt)."""
    common = {
        "model": cfg.judge_model,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_tokens,
    }
    if cfg.judge_url:
        return {"backend": HttpJudge.kind, **common}
    return {"backend": LocalJudge.kind, **common, "seed": cfg.seed}


def make_backend(cfg) -> HttpJudge | LocalJudge:
    if cfg.judge_url:
        return HttpJudge(
            cfg.judge_url,
            cfg.judge_model,
            api_key_env=cfg.api_key_env,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_tokens,
            timeout_s=cfg.timeout_s,
            retries=cfg.retries,
        )
    return LocalJudge(
        cfg.judge_model,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_tokens=cfg.max_tokens,
        seed=cfg.seed,
        device=cfg.device,
    )
