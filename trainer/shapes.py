"""Random-init models of named shapes, with a tokenizer trained locally, cached on disk: no model hub needed.

`model: {shape: tiny}` in a recipe builds (once) a Qwen2 checkpoint directory that the policy then loads exactly
like a hub checkpoint, so the 4-bit loading path is the same for both. Real shapes (qwen2.5-0.5b, qwen2.5-1.5b)
are for GPU benchmarks: their weights are random, but every tensor has the real size.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from trainer.errors import UserError

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BUILD_VERSION = 1  # bump when the corpus or the build changes: cached models are keyed by it

# Qwen2 config fields per shape. vocab_size None: the tokenizer's size rounded up to a multiple of 64. The tiny
# shape uses a wider init (0.1): with hidden 128 and the default 0.02, tied embeddings are so small that no
# change of the final hidden state can move the next-token distribution far from uniform, and nothing learns.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None, max_position_embeddings=1024, tie_word_embeddings=True,
                 dtype="float32", tokenizer_vocab=384, initializer_range=0.1),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True, dtype="bfloat16", tokenizer_vocab=4096),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True, dtype="bfloat16", tokenizer_vocab=4096),
}
# "-toy" variants: the same tensor shapes, but wider embeddings (std 0.1) and zero embedding rows beyond the tokenizer, so the
# random model samples tokens that decode to text (the rows are 97% of the vocab) and a toy reward is learnable;
# with the default init the output is near-uniform over 152k ids and no text-level reward moves in 200 steps.
for _name in ("qwen2.5-0.5b", "qwen2.5-1.5b"):
    SHAPES[f"{_name}-toy"] = dict(SHAPES[_name], embed_std=0.1, mask_unused_vocab=True)


def cache_dir() -> Path:
    return Path(os.environ.get("TRAINER_CACHE", Path.home() / ".cache" / "grpo-lora-trainer"))


def model_dir(shape: str, seed: int = 0) -> Path:
    """The checkpoint directory of a random-init shape, building it on first use (safe across processes)."""
    config_dict(shape)  # validates the name
    digest = hashlib.sha1(json.dumps([SHAPES[shape], BUILD_VERSION], sort_keys=True).encode()).hexdigest()[:8]
    return _built_once(cache_dir() / "models" / f"{shape}-seed{seed}-{digest}", lambda out: build(shape, seed, out))


def tokenizer_dir(shape: str, seed: int = 0) -> Path:
    """The tokenizer of a shape alone, trained and cached on first use: data and rewards are checked with it before
    any weights are built or loaded. The shape's model directory holds a copy of this same tokenizer."""
    config_dict(shape)
    vocab = SHAPES[shape]["tokenizer_vocab"]
    target = cache_dir() / "tokenizers" / f"bpe{vocab}-seed{seed}-v{BUILD_VERSION}"
    return _built_once(target, lambda out: build_tokenizer(vocab, seed).save_pretrained(out), "tokenizer.json")


def _built_once(target: Path, make, marker: str = "config.json") -> Path:
    """`target`, made by `make(tmp_dir)` and renamed into place on first use, once across processes."""
    done = (target / marker).is_file
    if done():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not done():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
            try:
                make(tmp)
                try:
                    os.replace(tmp, target)
                except OSError:  # another process finished first (seen once under torchrun): use its copy
                    if not done():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Synthetic text covering words, numbers, arithmetic and the markup the built-in rewards look for."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(1500)]
    words += ["the", "answer", "is", "solve", "write", "digits", "letters", "only", "count", "number", "story",
              "question", "think", "step", "total", "each", "how", "many", "what", "please", "reason"]
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.5:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))))
        elif kind < 0.75:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. #### {a + b} \\boxed{{{a - b}}}")
        elif kind < 0.9:
            lines.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(rng.randint(3, 12))))
        else:
            lines.append(f"<think> {rng.choice(words)} {rng.choice(words)} </think> <answer> {rng.randint(0, 99)} "
                         f"</answer>")
    return lines


def build_tokenizer(vocab_size: int, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed=seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def config_dict(shape: str) -> dict:
    """The config.json fields of a shape, known without building anything (the planner reads this)."""
    if shape not in SHAPES:
        raise UserError("model.shape", f"unknown shape {shape!r}", f"use one of: {', '.join(SHAPES)}")
    spec = dict(SHAPES[shape])
    tok_vocab = spec.pop("tokenizer_vocab")
    spec.pop("mask_unused_vocab", None)
    spec.pop("embed_std", None)
    spec["torch_dtype"] = spec.pop("dtype")
    spec["vocab_size"] = spec["vocab_size"] or -(-tok_vocab // 64) * 64
    return dict(spec, model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6)


def qwen2_config(shape: str, tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(**config_dict(shape), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


def build(shape: str, seed: int, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(shape, seed))
    tokenizer.save_pretrained(out)
    cfg = qwen2_config(shape, tokenizer)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, SHAPES[shape]["dtype"]))
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        if SHAPES[shape].get("embed_std"):
            emb.normal_(0, SHAPES[shape]["embed_std"])
        if SHAPES[shape].get("mask_unused_vocab"):
            emb[len(tokenizer):] = 0
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    # Not model.save_pretrained: under torchrun transformers writes on rank 0 only, and any rank may build the cache.
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
