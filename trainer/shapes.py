"""Random-init models of named shapes, with a tokenizer trained locally, cached on disk: no model hub needed.

`model: {shape: tiny}` in a recipe builds (once) a Qwen2 checkpoint directory that the policy then loads exactly
like a hub checkpoint, so the 4-bit loading path is the same for both. Real shapes (qwen2.5-0.5b, qwen2.5-1.5b,
qwen2.5-7b, llama-3.1-8b) are for GPU benchmarks: their weights are random, but every tensor has the real size.
Every shape shares the one locally trained tokenizer and its ChatML template (a Llama shape too: its tokenizer and
chat format do not change a single tensor shape, and nothing here may need the hub).
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

# Qwen's layout: tools (their JSON schemas) in a system turn, calls as <tool_call> JSON, results in "tool" turns.
CHAT_TEMPLATE = ("{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
                 "Call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n{% endif %}"
                 "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BUILD_VERSION = 2  # bump when the corpus or the build changes: cached models are keyed by it

# config fields per shape (Qwen2 unless `arch` says otherwise). vocab_size None: the tokenizer's size rounded up to a multiple of 64. The tiny
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
# The 7-8B shapes of issue 17 (long contexts on one GPU), with the real models' config.json values (tests/data/models).
# `direct_init`: parameters are created in bf16 on the GPU when there is one (an fp32 model first would take 32 GB),
# and the checkpoint is written in shards of SHARD_BYTES, so the host never holds more than one shard beside it.
# The smaller shapes keep their fp32-then-cast build: their cached random weights stay those of the measured runs.
SHAPES["qwen2.5-7b"] = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                            tie_word_embeddings=False, dtype="bfloat16", tokenizer_vocab=4096, direct_init=True)
SHAPES["llama-3.1-8b"] = dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              max_position_embeddings=131072, tie_word_embeddings=False, dtype="bfloat16",
                              tokenizer_vocab=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
                              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=8192),
                              direct_init=True)
SHARD_BYTES = 4 * 10**9
# Keys of SHAPES that describe the build, not config.json.
_BUILD_KEYS = ("tokenizer_vocab", "mask_unused_vocab", "embed_std", "direct_init", "arch")


def cache_dir() -> Path:
    return Path(os.environ.get("TRAINER_CACHE", Path.home() / ".cache" / "grpo-lora-trainer"))


def model_dir(shape: str, seed: int = 0) -> Path:
    """The checkpoint directory of a random-init shape, building it on first use (safe across processes)."""
    config_dict(shape)  # validates the name
    digest = hashlib.sha1(json.dumps([SHAPES[shape], BUILD_VERSION], sort_keys=True).encode()).hexdigest()[:8]
    return _built_once(cache_dir() / "models" / f"{shape}-seed{seed}-{digest}", lambda out: build(shape, seed, out))


def model_dir_apart(shape: str, seed: int = 0, env: dict | None = None) -> Path:
    """model_dir in a process of its own (benchmarks): a build's GPU memory (16 GB of bf16 for the 8B) goes with that
    process instead of sitting in a measured run's nvidia-smi series or eating an engine's start-up timeout."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"from trainer.shapes import model_dir; print(model_dir({shape!r}, {seed}))"],
                          check=True, stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    sys.stdout.write(done.stdout)
    return Path(done.stdout.strip().splitlines()[-1])


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
    tok_vocab, arch = spec["tokenizer_vocab"], spec.get("arch", "qwen2")
    for k in _BUILD_KEYS:
        spec.pop(k, None)
    spec["torch_dtype"] = spec.pop("dtype")
    spec["vocab_size"] = spec["vocab_size"] or -(-tok_vocab // 64) * 64
    return {"model_type": arch, "rope_theta": 1e6, "rms_norm_eps": 1e-6, **spec}


def model_config(shape: str, tokenizer):
    """The transformers config of a shape, with the local tokenizer's special tokens."""
    from transformers import AutoConfig

    fields = config_dict(shape)
    return AutoConfig.for_model(fields.pop("model_type"), **fields, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=None)




def build(shape: str, seed: int, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(shape, seed))
    tokenizer.save_pretrained(out)
    cfg = model_config(shape, tokenizer)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, SHAPES[shape]["dtype"])
    with torch.device(device):
        if SHAPES[shape].get("direct_init"):  # created in bf16: an 8B model never exists in fp32
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        if SHAPES[shape].get("embed_std"):
            emb.normal_(0, SHAPES[shape]["embed_std"])
        if SHAPES[shape].get("mask_unused_vocab"):
            emb[len(tokenizer):] = 0
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    # Not model.save_pretrained: under torchrun transformers writes on rank 0 only, and any rank may build the cache.
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    save_sharded(state, out, SHARD_BYTES)
    del state
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def save_sharded(tensors, out: Path, shard_bytes: int, always_index: bool = False) -> list[str]:
    """Write `tensors` (a dict, or (name, tensor) pairs) as shards of at most `shard_bytes` with the index file that
    transformers and vLLM read; a checkpoint that fits one shard is model.safetensors alone unless `always_index`.
    The pairs are taken one at a time and each tensor goes to the host as it is taken, so the host holds one shard
    (an 8B model built on the GPU never has all 16 GB on the host at once) and a generator may make each tensor only
    when it is taken (the bf16 mirror dequantises them on the device one by one). Returns the file names."""
    from safetensors.torch import save_file

    parts: list[tuple[str, list[str]]] = []  # shards written under temporary names until their count is known
    shard: dict = {}
    size = total = 0

    def flush():
        part = f".part-{len(parts):05d}.safetensors"
        save_file(shard, str(out / part), metadata={"format": "pt"})
        parts.append((part, list(shard)))
        shard.clear()

    for k, v in (tensors.items() if isinstance(tensors, dict) else tensors):
        v = v.detach().contiguous().cpu()
        if shard and size + v.nbytes > shard_bytes:
            flush()
            size = 0
        shard[k] = v
        size += v.nbytes
        total += v.nbytes
    if shard or not parts:
        flush()
    if len(parts) == 1 and not always_index:
        (out / parts[0][0]).rename(out / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map = {}
    for (part, keys), name in zip(parts, names):
        (out / part).rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names
