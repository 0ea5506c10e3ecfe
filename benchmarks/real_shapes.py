"""Inputs for running the real commands on the real SmolVLM2 shapes without a download (the GPU check, the tests).

- `shape_folder(name, out, tokenizer, ...)`: a model folder `dst prepare/train/eval --model FOLDER` loads, with the
  architecture of SmolVLM2-256M/500M/2.2B (`pipeline/smolvlm.py`'s `shape_config`: real hidden sizes, heads,
  49,280-row vocabulary, untied LM head, frame geometry giving 64 or 81 tokens per frame), random weights and
  fewer decoder layers (the cost per layer is what a run measures; the layer count is reported with it).
- `real_tokenizer(path)`: SmolVLM2's tokenizer (SmolLM2's BPE with the 128 added tokens at the real ids), read
  from a folder: `--tokenizer DIR`, else the `smollm2-135m` cache (`pipeline/smollm2.py`). Where neither exists,
  `standin_tokenizer()` is the tiny BPE with SmolVLM2's special tokens (its ids differ; the shapes stay real).
- `sts_standin(out)`: a tiny random sentence-embedding model for `dst eval --sts-model`, where the packaged
  MiniLM is not installed (a GPU machine without network): scoring then runs, its text similarities mean nothing.
- `synthetic_data(out, videos, size)`: task videos in ProAssist's formats (`synthetic/tasks.py`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, SmolVLMForConditionalGeneration

from pipeline.smolvlm import (
    IMAGE,
    REAL_EOS_ID,
    REAL_IMAGE_TOKEN_ID,
    REAL_VOCAB_SIZE,
    build_tiny_tokenizer,
    shape_config,
    vision_spec,
)

SHAPES = ("256M", "500M", "2.2B")
VISION_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)
STANDIN_TOKENIZER = "stand-in: the tiny BPE with SmolVLM2's special tokens (other ids), in the real 49,280-row vocab"


def _is_real(tokenizer: PreTrainedTokenizerFast) -> bool:
    return (len(tokenizer), tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IMAGE)) == (
        REAL_VOCAB_SIZE,
        REAL_EOS_ID,
        REAL_IMAGE_TOKEN_ID,
    )


def real_tokenizer(path: str | Path | None = None) -> tuple[PreTrainedTokenizerFast | None, str]:
    """(tokenizer, where it came from), or (None, why there is none). Reads files only: nothing is converted."""
    from transformers import AutoTokenizer

    from pipeline.smollm2 import cache_folder

    folder = Path(path) if path is not None else cache_folder()
    if not (folder / "tokenizer.json").is_file():
        given = "--tokenizer" if path is not None else "the smollm2-135m cache"
        return None, f"no tokenizer.json in {folder} ({given})"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not _is_real(tokenizer):
        return None, f"{folder}: not SmolVLM2's tokenizer ({len(tokenizer)} tokens, eos {tokenizer.eos_token_id})"
    return tokenizer, f"SmolVLM2's (49,280 tokens, real ids) from {folder}"


def standin_tokenizer() -> tuple[PreTrainedTokenizerFast, str]:
    return build_tiny_tokenizer(), STANDIN_TOKENIZER


def shape_folder(
    name: str,
    out: Path,
    tokenizer: PreTrainedTokenizerFast,
    text_layers: int = 2,
    vision_layers: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    vision_of: str | None = None,
) -> dict:
    """Write a random-weight model of shape `name` with `text_layers` decoder layers (and `vision_layers` vision
    layers; None keeps the real depth) and `tokenizer` to `out`; returns what it is (for the reports).
    `vision_of` takes the vision tower and frame geometry of another shape (2.2B's 81-token grid on a small text
    model, for tests)."""
    config = shape_config(name)
    if vision_of is not None:
        other = shape_config(vision_of)
        vision = {key: getattr(other.vision_config, key) for key in VISION_KEYS}
        config = shape_config(name, vision=vision, scale_factor=other.scale_factor)
    config.text_config.num_hidden_layers = text_layers
    if vision_layers is not None:
        config.vision_config.num_hidden_layers = vision_layers
    if not _is_real(tokenizer):  # the stand-in's special ids, inside the real-sized vocabulary
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        for key, value in ids.items():
            setattr(config.text_config, key, value)
        config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):  # random init on the GPU takes seconds where the CPU takes a minute
            model = SmolVLMForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    # fp16 on disk halves the writing and reading; every command loads it in its own precision
    model.to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    spec = vision_spec(config)
    info = {
        "shape": name,
        "vision_of": vision_of or name,
        "folder": str(out),
        "text_layers": text_layers,
        "text_layers_real": shape_config(name).text_config.num_hidden_layers,
        "vision_layers": config.vision_config.num_hidden_layers,
        "vision_layers_real": shape_config(vision_of or name).vision_config.num_hidden_layers,
        "tokens_per_frame": spec.tokens_per_frame,
        "image_size": spec.image_size,
        "text_hidden_size": spec.text_hidden_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "shape.json").write_text(json.dumps(info, indent=1))
    return info


_STS_WORDS = (
    "the a to and of is it you now next step done open close turn put take hold screw bolt wheel "
    "cabin board lid pot pan egg onion water great job well what should i do"
).split()


def sts_standin(out: Path, hidden: int = 32) -> Path:
    """A random 1-layer BERT with mean pooling, saved as a sentence-transformers folder at `out`."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:  # sentence-transformers 6.2 (the pin) moved the modules; a lent machine's may be older
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer

    base = out / "bert"
    base.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *_STS_WORDS]
    (base / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(base / "vocab.txt"), do_lower_case=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bert = BertModel(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=2 * hidden,
                max_position_embeddings=512,
            )
        )
    bert.save_pretrained(base)
    tokenizer.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=128)
    SentenceTransformer(modules=[transformer, Pooling(hidden, "mean")], device="cpu").save(str(out / "st"))
    return out / "st"


def synthetic_data(out: Path, videos: int, size: int, seed: int = 0) -> dict:
    """`videos` synthetic task videos (3 conversations each) as DST records and frames files under `out`."""
    from synthetic.tasks import generate

    summary = generate(out, videos, 0, 0, seed=seed, size=size)
    return {
        "dst_json": summary["splits"]["train"]["json"],
        "frames_root": summary["frames_root"],
        "videos": videos,
        "frames": summary["splits"]["train"]["frames"],
        "size": size,
    }


def short_video(out: Path, frames: int, size: int = 384) -> tuple[Path, Path]:
    """One `frames`-frame video (2 fps) with two conversations, for CPU runs: (DST json, frames root)."""
    from pipeline.frames_files import frames_file_candidates, synthetic_jpegs, write_frames_file

    write_frames_file(frames_file_candidates(out / "frames", "wtag", "short")[0], synthetic_jpegs(frames, size))
    seconds = frames / 2
    turns = [
        {"role": "user", "time": 0.2, "content": "what should I do now?"},
        {
            "role": "assistant",
            "time": seconds * 0.6,
            "content": "open the lid of the box",
            "labels": "initiative|instruction",
            "progress": "The user has just started.",
        },
    ]
    record = {
        "video_uid": "short",
        "inferred_goal": "assemble the toy",
        "inferred_knowledge": "1. open\n2. screw",
        "parsed_video_anns": {"dataset": "wtag", "video_start_time": 0.0, "duration": seconds},
        "dst": [
            {"type": "step", "id": "S1", "start_ts": 0.0, "end_ts": seconds * 0.5, "name": "open"},
            {"type": "step", "id": "S2", "start_ts": seconds * 0.5, "end_ts": seconds, "name": "screw"},
        ],
        "conversations": [
            {"user_type": "talk_some", "conversation": turns},
            {"user_type": "no_talk", "conversation": turns[1:]},
        ],
    }
    (out / "short.json").write_text(json.dumps([record]))
    return out / "short.json", out / "frames"


def setup(
    out: Path, shapes: list[str], text_layers: int, device: str, tokenizer_dir: Path | None, videos: int, size: int
) -> dict:
    """The GPU check's setup step: data, model folders (`tiny` means the built-in `tiny-random`), the STS model."""
    report: dict = {"data": synthetic_data(out / "data", videos, size), "models": {}}
    if any(shape != "tiny" for shape in shapes):
        tokenizer, report["tokenizer"] = real_tokenizer(tokenizer_dir)
        if tokenizer is None:
            report["tokenizer_missing"] = report["tokenizer"]
            tokenizer, report["tokenizer"] = standin_tokenizer()
    for shape in shapes:
        if shape == "tiny":
            report["models"][shape] = {"shape": shape, "folder": "tiny-random", "tokens_per_frame": 16}
            continue
        started = time.perf_counter()
        info = shape_folder(shape, out / "models" / shape, tokenizer, text_layers=text_layers, device=device)
        report["models"][shape] = {**info, "build_s": time.perf_counter() - started}
    report["sts_model"] = str(sts_standin(out / "sts"))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="the GPU check's setup step (see the module doc)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="256M,500M,2.2B", help="comma-separated; tiny: the tiny-random model")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a folder with SmolVLM2's tokenizer.json")
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--size", type=int, default=384)
    args = parser.parse_args()
    report = setup(
        args.out, args.shapes.split(","), args.text_layers, args.device, args.tokenizer, args.videos, args.size
    )
    (args.out / "setup.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
