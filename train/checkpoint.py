"""Checkpoints: Hugging Face folders plus the exact training state, in safetensors and JSON (no pickle).

    RUN/checkpoints/step-000500/
        model/               save_pretrained: the full model, or the peft adapter under LoRA; and the tokenizer
        heads.safetensors    decision heads and frame adapter
        dst.json             what eval needs to rebuild the model (base model, LoRA, tokens per frame, ...)
        optimizer.safetensors + optimizer.json, trainer.json (scheduler, scaler, data position, RNG states)
    RUN/checkpoints/last -> step-000500   (a symlink, replaced atomically)

A checkpoint is written under `step-NNNNNN.tmp/` and renamed when complete, so a preemption mid-write never
leaves a half checkpoint that `--resume` would pick up. Rank 0 writes; `agree_saved` then tells every rank whether
that worked, so a failed save (a full disk) stops all ranks at once instead of leaving the others in a collective
until the NCCL watchdog's hour is up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from core.errors import DataError
from core.files import temporary
from pipeline.models import load_model
from train.model import DSTModel, quiet_peft

OPTIMIZER_TENSORS, OPTIMIZER_META, TRAINER_STATE, DST_META = (
    "optimizer.safetensors",
    "optimizer.json",
    "trainer.json",
    "dst.json",
)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    meta = {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(internal), py_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = meta["python"]
    random.setstate((version, tuple(internal), py_gauss))


def _optimizer_split(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointSaveError(DataError):
    """Rank 0 could not write a checkpoint (disk full, no permission): every rank stops with this error."""


def checkpoint_folder(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def agree_saved(runtime, folder: Path, failure: Exception | None) -> None:
    """After rank 0's save (`failure`: what it raised, None elsewhere and on success): every rank learns the outcome
    (this all-reduce is also the barrier that keeps the others from running ahead) and all raise if it failed."""
    failed = failure is not None
    if runtime.world > 1:
        flag = torch.tensor([float(failed)], device=runtime.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        failed = bool(flag.item())
    if failure is not None:
        raise CheckpointSaveError(
            f"could not save the checkpoint {folder}: {type(failure).__name__}: {failure}; "
            "the last complete checkpoint is kept"
        ) from failure
    if failed:
        raise CheckpointSaveError(
            f"rank {runtime.rank}: rank 0 could not save the checkpoint {folder} (its message "
            "says why); stopping every rank"
        )


def save_checkpoint(
    run: Path,
    step: int,
    model: DSTModel,
    tokenizer,
    optimizer,
    scheduler,
    scaler,
    position: dict,
    dst_meta: dict,
    keep: int = 3,
    counters: dict | None = None,
) -> Path:
    """`counters`: the loop's run totals (skipped steps, ...), restored on resume."""
    folder = checkpoint_folder(run, step)
    tmp = temporary(folder)  # renamed into place below, after the old folder of the same step is moved aside
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(tmp, tokenizer)
        tensors, meta = _optimizer_split(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
        (tmp / OPTIMIZER_META).write_text(json.dumps(meta))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        # GradScaler's state (scale, growth tracker) goes with it: a resumed fp16 run must not restart at 65536 and
        # skip its first steps again
        trainer = {
            "step": step,
            "position": position,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_meta,
            "monitor": counters or {},
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer))
        (tmp / DST_META).write_text(json.dumps(dst_meta, indent=1))
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder would hold the disk space a retry needs
        raise
    # The same step saved again (a resumed run): move the old folder aside first, so `last` never points at a
    # half-deleted checkpoint; it is removed once the new one is in place.
    replaced = folder.with_name(folder.name + ".old") if folder.exists() else None
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
        folder.rename(replaced)
    tmp.rename(folder)
    link = run / "checkpoints" / "last"
    tmp_link = temporary(link)
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(folder.name)
    os.replace(tmp_link, link)
    if replaced is not None:
        shutil.rmtree(replaced)
    _prune(run / "checkpoints", keep, folder)
    return folder


def _prune(folder: Path, keep: int, current: Path) -> None:
    steps = sorted(p for p in folder.glob("step-??????") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old != current:
            shutil.rmtree(old)


def load_weights(model: DSTModel, folder: Path) -> None:
    """Load the model weights of a checkpoint into an already built model (same LoRA setting)."""
    weights = folder / "model"
    if (weights / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.vlm, load_file(str(weights / "adapter_model.safetensors")))
    else:
        state = {}
        for shard in sorted(weights.glob("*.safetensors")):
            state |= load_file(str(shard))
        missing, unexpected = model.vlm.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head may be tied to embeddings
            raise ValueError(
                f"{weights}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
    model.load_extra_state(folder)


def load_training_state(folder: Path, optimizer, scheduler, scaler) -> dict:
    """Restore optimizer, scheduler, scaler and RNG; return the trainer state (step, data position)."""
    optimizer.load_state_dict(
        _optimizer_join(load_file(str(folder / OPTIMIZER_TENSORS)), json.loads((folder / OPTIMIZER_META).read_text()))
    )
    trainer = json.loads((folder / TRAINER_STATE).read_text())
    scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None and trainer["scaler"]:
        scaler.load_state_dict(trainer["scaler"])
    set_rng_state(load_file(str(folder / "rng.safetensors")), trainer["rng"])
    return trainer


def dst_meta(cfg, index) -> dict:
    """dst.json: what eval needs to rebuild the model of a run of `cfg` (a TrainConfig) on shards `index`."""
    return {
        "base_model": cfg.model,
        "variant": cfg.variant,
        "lora": cfg.lora,
        "load_in_4bit": cfg.load_in_4bit,
        "frame_adapter": cfg.frame_adapter,
        "tokens_per_frame": index.tokens_per_frame,
        "hidden_size": index.hidden_size,
        "max_seq_len": cfg.max_seq_len,
    }


def load_dst_model(folder: str | Path, device: str | torch.device = "cpu", dtype=torch.float32):
    """A trained model for inference from a checkpoint folder: (DSTModel in eval mode, tokenizer, dst meta).

    LoRA adapters are merged into the base weights (one matmul per projection instead of three small ones: the
    streamed frames are short, so the adapters' extra kernels would dominate). A 4-bit base is loaded in 4 bits, as
    it was trained, and keeps its adapters unmerged: merging would round the adapter deltas to the 4-bit grid."""
    folder = Path(folder).resolve()
    meta = json.loads((folder / DST_META).read_text())
    in_4bit = meta.get("load_in_4bit", False)  # absent from checkpoints written before 4-bit was recorded
    if meta["lora"]:
        from peft import PeftModel

        # a 4-bit base is quantized as it lands on the GPU; a full one is merged on the CPU, then moved
        base, tokenizer = load_model(
            meta["base_model"], dtype=dtype, device=device if in_4bit else None, load_in_4bit=in_4bit
        )
        with quiet_peft():
            vlm = PeftModel.from_pretrained(base, str(folder / "model"))
        if not in_4bit:
            vlm = vlm.merge_and_unload()
    else:
        vlm, tokenizer = load_model(str(folder / "model"), dtype=dtype)
    model = DSTModel(vlm, frame_adapter=meta["frame_adapter"])
    model.load_extra_state(folder)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, meta
