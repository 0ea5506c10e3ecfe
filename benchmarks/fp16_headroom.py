"""fp16 headroom of the real SmolLM2-135M weights: the largest |activation| per layer in fp32 and in fp16, before
and after a short LoRA and a short full fine-tune, against fp16's limit of 65,504.

    python benchmarks/fp16_headroom.py [--frames 40] [--steps 24] [--batch-tokens 1024] [--frame-scales 1 8]
                                       [--threads 1]

Sequences: the realistic record (synthetic/realistic_record.py: 20 steps, ProAssist-style dialogue) for its first
`--frames` frames, built by the training sequence builder; its frame tokens are random with an RMS of `scale` x the
RMS of SmolLM2's token embeddings (0.136). The RMS of SmolVLM2's real connector outputs is not available offline:
1x is what the `smollm2-135m` random connector emits; 8x stands for a connector whose outputs are much larger than
token embeddings. Measured per decoder layer: the residual stream after the layer, the attention output
(`o_proj`), the MLP's inner activation (`act(gate) * up`, the input of `down_proj`) and the MLP output. Three
numeric modes:

- `fp32`: the reference;
- `fp16 autocast`: what `dst train --precision fp16` runs (fp32 weights; linear layers compute in fp16, the residual
  stream and RMSNorm stay fp32), so the fp16-held tensors are the attention and MLP outputs and the MLP inner;
- `fp16 weights`: the whole model in fp16 (fp16 inference), where the residual stream is fp16 too.

Margin = 65,504 / the largest fp16-held |activation|. Argmax agreement: the share of positions whose LM-head argmax
equals fp32's. Fine-tunes: LoRA and full fine-tuning for `--steps` steps on synthetic demo tasks (prepared with
`smollm2-135m`), `--batch-tokens` micro-batches, LoRA lr 1e-3, full lr 1e-4. fp16 matmuls on a CPU are slow
(about 4x fp32).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pipeline import prepare
from pipeline.config import PrepareConfig
from pipeline.models import load_model
from pipeline.smollm2 import token_embedding_rms
from pipeline.smolvlm import SMOLLM2
from synthetic.realistic_record import realistic_meta
from synthetic.tasks import generate
from train import run as train_run
from train.checkpoint import load_dst_model
from train.config import TrainConfig
from train.fp16_monitor import FP16_MAX
from train.model import DSTModel
from train.sequence import SequenceFormat, build_window

KINDS = ("residual", "attn_out", "mlp_inner", "mlp_out")
FP16_HELD = {"fp32": (), "fp16 autocast": ("attn_out", "mlp_inner", "mlp_out"), "fp16 weights": KINDS}


def layer_maxima(model: DSTModel, ids, image_mask, frames, autocast) -> tuple[np.ndarray, np.ndarray, bool]:
    """([layers, 4] max |x| per layer and kind, LM argmax per position, all finite?)."""
    layers = model.text_model.layers
    peak = np.zeros((len(layers), len(KINDS)))
    finite = [True]

    def record(i, kind, tensor) -> None:  # a hook returning something would replace the module's output
        tensor = tensor.detach()
        finite[0] &= bool(torch.isfinite(tensor).all())
        peak[i, KINDS.index(kind)] = max(peak[i, KINDS.index(kind)], float(tensor.float().abs().max()))

    handles = []
    for i, layer in enumerate(layers):
        handles += [
            layer.register_forward_hook(
                lambda m, a, out, i=i: record(i, "residual", out[0] if isinstance(out, tuple) else out)
            ),
            layer.self_attn.o_proj.register_forward_hook(lambda m, a, out, i=i: record(i, "attn_out", out)),
            layer.mlp.down_proj.register_forward_hook(lambda m, a, out, i=i: record(i, "mlp_inner", a[0])),
            layer.mlp.down_proj.register_forward_hook(lambda m, a, out, i=i: record(i, "mlp_out", out)),
        ]
    try:
        with torch.no_grad(), autocast:
            hidden, _ = model.hidden_states(ids, image_mask, frames.to(model.lm_head.weight.dtype))
            argmax = model.lm_head(hidden[0]).float().argmax(-1)
    finally:
        for h in handles:
            h.remove()
    return peak, argmax.numpy(), finite[0]


def measure(model: DSTModel, ids, image_mask, frames) -> dict[str, tuple]:
    out = {
        "fp32": layer_maxima(model, ids, image_mask, frames, nullcontext()),
        "fp16 autocast": layer_maxima(model, ids, image_mask, frames, torch.autocast("cpu", dtype=torch.float16)),
    }
    out["fp16 weights"] = layer_maxima(copy.deepcopy(model).half(), ids, image_mask, frames, nullcontext())
    return out


def summary_rows(name: str, scale: float, results: dict) -> list[str]:
    rows = []
    reference = results["fp32"][1]
    for mode, (peak, argmax, finite) in results.items():
        cells = []
        for k in range(len(KINDS)):
            layer = int(peak[:, k].argmax())
            cells.append(f"{peak[layer, k]:,.0f} (L{layer})")
        held = [KINDS.index(k) for k in FP16_HELD[mode]]
        margin = f"{FP16_MAX / peak[:, held].max():.1f}x" if held else "-"
        agree = f"{100 * float((argmax == reference).mean()):.1f}%"
        rows.append(f"| {name} | {scale:g}x | {mode} | " + " | ".join(cells) + f" | {margin} | {finite} | {agree} |")
    return rows


def fine_tune(folder: Path, lora: bool, steps: int, tokens: int) -> Path:
    """A short run of `dst train` on synthetic demo shards; its checkpoint folder."""
    shards = folder / "shards"
    if not shards.exists():
        data = generate(folder / "data", 8, 1, 1, seed=0)
        prepare.run(
            PrepareConfig(
                split="train",
                dst_json=(Path(data["splits"]["train"]["json"]),),
                model=SMOLLM2,
                out=shards,
                frames_root=Path(data["frames_root"]),
                tokens_per_frame=5,
            )
        )
    out = folder / ("lora" if lora else "full")
    train_run.run(
        TrainConfig(
            shards=shards,
            model=SMOLLM2,
            out=out,
            max_steps=steps,
            lora=lora,
            lr=1e-3 if lora else 1e-4,
            batch_size=str(tokens),
            max_seq_len=tokens,
            warmup_steps=2,
            num_workers=0,
            log_every=max(steps // 4, 1),
            save_every=steps,
        )
    )
    return out / "checkpoints" / "last"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=40, help="frames of the realistic record (2 per second)")
    parser.add_argument("--steps", type=int, default=24, help="fine-tuning steps (0: the pretrained model only)")
    parser.add_argument("--frame-scales", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--batch-tokens", type=int, default=1024, help="fine-tuning micro-batch (and window) size")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="folder for the fine-tuning runs (default: temp)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    vlm, tokenizer = load_model(SMOLLM2)
    fmt = SequenceFormat(tokenizer, 5)
    meta = realistic_meta(n_frames=args.frames)
    seq = build_window(fmt, meta, 0, 0, args.frames)
    ids = torch.tensor([seq.input_ids])
    rms = token_embedding_rms(vlm)
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal((len(seq.image_positions), 576))).float()
    torch.manual_seed(0)
    models = [("pretrained", DSTModel(vlm).eval())]
    if args.steps:
        work = args.work or Path(tempfile.mkdtemp())
        for lora in (True, False):
            ckpt = fine_tune(work, lora, args.steps, args.batch_tokens)
            models.append((f"{'LoRA' if lora else 'full'} {args.steps} steps", load_dst_model(ckpt)[0]))
    print(f"sequence: {len(seq.input_ids)} tokens ({args.frames} frames, 5 tokens each); token embedding RMS {rms:.3f}")
    header = (
        "| model | frame RMS | mode | residual max (layer) | attention out max | MLP inner max | MLP out max "
        "| fp16 margin | all finite | argmax = fp32 |"
    )
    rows = [header, "|" + "---|" * 10]
    per_layer = []
    for name, model in models:
        for scale in args.frame_scales:
            results = measure(model, ids, ids == fmt.image_id, noise * rms * scale)
            rows += summary_rows(name, scale, results)
            if scale == args.frame_scales[0]:
                per_layer.append((name, results["fp32"][0][:, 0]))
            print(f"measured {name} at {scale:g}x ({time.time() - started:.0f} s)", flush=True)
    print("\n".join(rows))
    print(
        "\nresidual stream max |x| per layer, fp32, frame RMS "
        f"{args.frame_scales[0]:g}x:\n| layer | " + " | ".join(n for n, _ in per_layer) + " |"
    )
    print("|" + "---|" * (len(per_layer) + 1))
    for layer in range(len(per_layer[0][1])):
        print(f"| {layer} | " + " | ".join(f"{p[layer]:,.0f}" for _, p in per_layer) + " |")
    print(f"\ntotal {time.time() - started:.0f} s on CPU ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
