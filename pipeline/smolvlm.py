"""The one place that builds or loads a SmolVLM2 model and its tokenizer, for every stage (prepare, train, eval).

- `build_tiny_random()` builds a seeded, offline, tiny random model and a tiny byte-level BPE tokenizer with
  SmolVLM2's special tokens (tests and demos; nothing is downloaded); pipeline/models.py loads every model by name.
- `shape_config("256M" | "500M" | "2.2B")` gives the real checkpoints' architecture for random-weight benchmarks.
- `vision_spec(model)` says what one frame turns into: the connector's token grid and the text hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

# SmolVLM2's own template (string or list content); imported, not copied, so it follows the pinned transformers.
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

TINY_RANDOM = "tiny-random"
SMOLLM2 = "smollm2-135m"  # real SmolLM2-135M-Instruct language weights, small random vision (pipeline/smollm2.py)
CHECKPOINTS = {
    "256M": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct",
    "500M": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    "2.2B": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
}

# Special tokens as the real SmolVLM2 tokenizer has them (tokenizer_config.json / added_tokens.json of the
# checkpoints): ids 0-2 inside the base vocab, the rest added after it in this order.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
GLOBAL_IMG, FAKE_IMAGE, IMAGE = "<global-img>", "<fake_token_around_image>", "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
RESERVED_TOKENS = [f"<|reserved_special_token_{i}|>" for i in range(88)]
ADDED_TOKENS = [GLOBAL_IMG, *ROW_COL_TOKENS, FAKE_IMAGE, IMAGE, *RESERVED_TOKENS, END_OF_UTTERANCE]
# Real roles: bos <|im_start|>, eos <end_of_utterance> (the end of a turn, what generation stops on),
# pad <|im_end|> (never produced by the chat template, so padding can never be confused with EOS), unk <|endoftext|>.
SPECIAL_ROLES = {"bos_token": IM_START, "eos_token": END_OF_UTTERANCE, "pad_token": IM_END, "unk_token": ENDOFTEXT}
MODEL_SPECIFIC_TOKENS = {
    "image_token": IMAGE,
    "fake_image_token": FAKE_IMAGE,
    "global_image_token": GLOBAL_IMG,
    "end_of_utterance_token": END_OF_UTTERANCE,
}  # -> tokenizer.image_token_id etc.
TINY_BPE_VOCAB = 1200  # a cap: the built-in corpus yields 990 BPE tokens (ids 0-2 and the byte alphabet included)

# --- tiny tokenizer ----------------------------------------------------------------------------------------------

_ACTIONS = [
    "attach the wheel to the chassis",
    "screw the bolt into the base",
    "place the cabin on the frame",
    "insert the axle through the hole",
    "tighten the nut with the wrench",
    "connect the arm to the body",
    "fit the roof onto the cabin",
    "remove the screw from the panel",
    "turn the toy upside down",
    "align the two pieces",
    "push the pin into the slot",
    "lift the bucket onto the arm",
    "chop the onion into small pieces",
    "boil the water in the pot",
    "crack two eggs into the bowl",
    "whisk the eggs with a fork",
    "pour the milk into the pan",
    "slice the tomato on the board",
    "add a pinch of salt",
    "stir the sauce slowly",
    "heat the oil in the pan",
    "wash the lettuce",
    "peel the potatoes",
    "grate the cheese over the pasta",
    "put the lid on the pot",
    "drain the noodles",
    "spread butter on the bread",
    "cut the cucumber in half",
    "mix the flour and the sugar",
    "bake the cake for twenty minutes",
    "fold the dough twice",
    "season the soup with pepper",
]
_TEMPLATES = [
    "Now {s} should {a}.",
    "Next, {a}.",
    "{S} needs to {a} before moving on.",
    "Did {s} already {a}?",
    "Great job, {s} managed to {a}.",
    "Be careful when you {a}.",
    "The next step is to {a}.",
    "It looks like {s} forgot to {a}.",
    "Remember to {a} first.",
    "Okay, {a} and then wait.",
]
_SUBJECTS = ["you", "we", "the user", "the person", "I"]
_OBJECTS = (
    "screwdriver hammer wrench bolt screw nut washer panel bracket hinge spring gear motor battery cable switch "
    "ladder bucket crane truck trailer tractor wheel tire axle seat cabin roof door window mirror light lever "
    "knife spoon fork plate bowl cup glass kettle oven stove fridge sink towel sponge cutting board pan pot lid "
    "carrot garlic pepper rice pasta noodles chicken beef tofu mushroom spinach lemon apple banana orange yogurt "
    "honey vinegar flour sugar butter cream cheese bread toast coffee tea water juice soup salad sandwich omelette"
).split()
_VERBS = "pick up|put down|hold|rotate|check|clean|open|close|move|find|grab|hand me|look at|measure|rinse".split("|")
_PHRASES = [
    "The task goal is to assemble a toy excavator.",
    "The task goal is to cook a simple breakfast.",
    "Here are the steps of the task, each with an id and a state.",
    "The current state of every step:",
    "User: what should I do now?",
    "Assistant: you have finished this step, well done.",
    "The states are not_started, in_progress and completed.",
    "Update: S1=completed; S2=in_progress",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 30 45 60 90 100.",
    "Hello! Yes, no, maybe. Thanks, that's right. Don't worry; it's fine (really).",
    "Could you tell me where the instructions are? Which part comes after this one?",
    "You're doing great. Keep going, almost there. Let me know when you are ready.",
    "Is it supposed to look like this? Not quite, try turning it the other way around.",
]


def _tiny_corpus() -> list[str]:
    """A fixed built-in corpus (~500 lines) so the BPE merges, hence the vocab, are the same on every call."""
    lines = []
    for i, action in enumerate(_ACTIONS):
        for j, template in enumerate(_TEMPLATES):
            subject = _SUBJECTS[(i + j) % len(_SUBJECTS)]
            lines.append(template.format(s=subject, S=subject[0].upper() + subject[1:], a=action))
    states = ["not_started", "in_progress", "completed"]
    for i in range(1, 21):
        lines.append("; ".join(f"S{k}={states[(i + k) % 3]}" for k in range(i, min(i + 4, 21))))
        lines.append(f"S{i}: step {i} of the task is {states[i % 3]}")
    for i, obj in enumerate(_OBJECTS):
        verb = _VERBS[i % len(_VERBS)]
        lines.append(f"Please {verb} the {obj}, then {_VERBS[(i * 7 + 3) % len(_VERBS)]} the {_OBJECTS[i - 5]}.")
    return lines + _PHRASES


@lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],  # ids 0, 1, 2 as in the real tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    return tok.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny, deterministic byte-level BPE with SmolVLM2's special tokens, roles and chat template (offline)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        chat_template=DEFAULT_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # exact decode(encode(text)) round trips
        model_max_length=8192,
        **SPECIAL_ROLES,
        **MODEL_SPECIFIC_TOKENS,
    )


# --- configs -----------------------------------------------------------------------------------------------------


def _smolvlm_config(text: dict, vision: dict, scale_factor: int, image_token_id: int) -> SmolVLMConfig:
    return SmolVLMConfig(
        text_config=LlamaConfig(**text),
        vision_config=SmolVLMVisionConfig(**vision),
        scale_factor=scale_factor,
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> SmolVLMConfig:
    """Tiny shapes: 64 px frames, 8 px patches -> 8x8 patches; pixel shuffle 2 -> a 4x4 = 16-token grid per frame,
    the smallest grid on which every pooling option (1, 5, 17, all) is defined."""
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL_ROLES.items()}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        bos_token_id=ids["bos_token"],
        eos_token_id=ids["eos_token"],
        pad_token_id=ids["pad_token"],
        tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
    )
    return _smolvlm_config(text, vision, 2, tokenizer.convert_tokens_to_ids(IMAGE))


# Real checkpoint shapes, from the checkpoints' config.json (HuggingFaceTB/<name> on the hub, as quoted by public
# mirrors). Keys a config.json omits (vision layers/intermediate of 256M/500M, text heads of 2.2B) take the
# SmolVLMVisionConfig / LlamaConfig defaults, as from_pretrained does. Cross-check: the parameter counts equal the
# hub's fp32 model.safetensors sizes (1.03, 2.03, 4.96 + 4.03 GB). rope_theta escapes that check: 100000
# (SmolLM2-135M/360M) and 273768 (SmolVLM-Instruct 2.2B, the same SmolLM2-1.7B backbone). Shared: vocab 49280
# (49152 BPE + 128 added), <image> = 49190, untied lm_head, rms_norm_eps 1e-5, max_position_embeddings 8192.
# SmolVLM2-256M and -500M share one vision tower (SigLIP base, 512 px, 16 px patches)
_VISION_512 = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=512, patch_size=16
)
_REAL_SHAPES = {
    "256M": dict(  # SmolVLM2-256M-Video-Instruct: SmolLM2-135M text, 8x8 = 64 tokens per frame
        text=dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            rope_theta=100000.0,
        ),
        vision=_VISION_512,
        scale_factor=4,
    ),
    "500M": dict(  # SmolVLM2-500M-Video-Instruct: SmolLM2-360M text, 8x8 = 64 tokens per frame
        text=dict(
            hidden_size=960,
            intermediate_size=2560,
            num_hidden_layers=32,
            num_attention_heads=15,
            num_key_value_heads=5,
            rope_theta=100000.0,
        ),
        vision=_VISION_512,
        scale_factor=4,
    ),
    "2.2B": dict(  # SmolVLM2-2.2B-Instruct: SmolLM2-1.7B text, 27x27 patches / 3 -> 9x9 = 81 tokens per frame
        text=dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=32,
            num_key_value_heads=32,
            rope_theta=273768.0,
        ),
        vision=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
        ),
        scale_factor=3,
    ),
}
REAL_VOCAB_SIZE, REAL_IMAGE_TOKEN_ID = 49280, 49190
REAL_BOS_ID, REAL_PAD_ID, REAL_EOS_ID = 1, 2, 49279


def shape_config(name: str, vision: dict | None = None, scale_factor: int | None = None) -> SmolVLMConfig:
    """A `SmolVLMConfig` with the real checkpoint's shapes (`"256M"`, `"500M"`, `"2.2B"`), for random weights.
    `vision` and `scale_factor` replace the vision tower's shape (the text half stays the real one)."""
    if name not in _REAL_SHAPES:
        raise ValueError(f"unknown SmolVLM2 size {name!r}; choose one of {sorted(_REAL_SHAPES)}")
    shape = _REAL_SHAPES[name]
    text = dict(shape["text"])
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    text.update(
        vocab_size=REAL_VOCAB_SIZE,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=REAL_BOS_ID,
        eos_token_id=REAL_EOS_ID,
        pad_token_id=REAL_PAD_ID,
        tie_word_embeddings=False,
    )
    return _smolvlm_config(text, vision or shape["vision"], scale_factor or shape["scale_factor"], REAL_IMAGE_TOKEN_ID)


def _build(config: SmolVLMConfig, seed: int) -> SmolVLMForConditionalGeneration:
    # fork_rng: building must not move the caller's global RNG, and the same seed must give the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config._attn_implementation = "sdpa"
        model = SmolVLMForConditionalGeneration(config)
    return model.to(torch.float32).eval()


def build_tiny_random(seed: int = 0) -> tuple[SmolVLMForConditionalGeneration, PreTrainedTokenizerFast]:
    """A seeded tiny random SmolVLM (fp32) and the tiny tokenizer; same seed -> identical weights."""
    tokenizer = build_tiny_tokenizer()
    model = _build(tiny_config(tokenizer), seed)
    gen, tok = model.generation_config, tokenizer
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    return model, tokenizer


def build_random(name: str, seed: int = 0) -> SmolVLMForConditionalGeneration:
    """A randomly initialised model with a real checkpoint's shapes (benchmarks without downloads)."""
    return _build(shape_config(name), seed)


# --- what a frame becomes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSpec:
    image_size: int  # frames are resized to image_size x image_size (unsplit)
    patch_size: int
    scale_factor: int  # pixel-shuffle factor of the connector
    grid: int  # the connector's token grid is grid x grid
    text_hidden_size: int  # width of one frame token (the language model's hidden size)
    vision_hidden_size: int

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid


def vision_spec(model_or_config: SmolVLMForConditionalGeneration | SmolVLMConfig) -> VisionSpec:
    """The frame geometry of a model (or config), checked: patches per side must divide by the scale factor."""
    config = model_or_config if isinstance(model_or_config, SmolVLMConfig) else model_or_config.config
    vc = config.vision_config
    patches = vc.image_size // vc.patch_size  # the stride-patch conv floors: 384 px / 14 -> 27 (2.2B)
    if patches % config.scale_factor:
        raise ValueError(
            f"{patches} patches per side (image_size {vc.image_size} // patch_size {vc.patch_size}) do not divide "
            f"by scale_factor {config.scale_factor}: no whole token grid"
        )
    return VisionSpec(
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        scale_factor=config.scale_factor,
        grid=patches // config.scale_factor,
        text_hidden_size=config.text_config.hidden_size,
        vision_hidden_size=vc.hidden_size,
    )
