"""vLLM's LoRA kernels under configs tuned for this card and this model's exact shapes, vLLM's defaults elsewhere.

vLLM 0.26's LoRA shrink/expand Triton kernels take one default config whatever the shape (the shrink splits K 64
ways with 256-wide tiles at every decode batch), and read tuned ones from VLLM_TUNED_CONFIG_FOLDER: one file per card
and kernel ({card}_SHRINK.json, {card}_EXPAND_TRUE.json), keyed max_loras -> slices -> batch -> K -> N.
bench/lora_tune.py writes them; lora_configs/ beside this file ships those measured to win. Where a file lacks the
run's K or N, vLLM takes the nearest (another model's config, never timed on this one) and where it lacks the slice
count it raises, so a folder is used only where it holds every shape the run's layers look up, at every batch it lists.

Measured on one H100 (2026-12-07, bench/results/queue_2026-12-07/g): for the 1.5B shape at r16 the tuned kernels of a
decode step at 8 sequences took 0.759 ms against 1.037 (0.73x), and config A's rollout (256 token steps, 8 sequences)
1.287-1.312 s against 1.354-1.363 s (shared nf4), 0.67-0.86 s against 0.77-1.58 s (bf16 mirror). On one H100
(2026-12-07 21:30, queue_2026-12-07/h, `lora_tune qwen2.5-7b:16 llama-3.1-8b:16`), the kernels of a decode step at 8
sequences: 7B 0.830 ms against 1.180 (0.70x), 8B 0.918 against 1.287 (0.71x); 0.57-0.79x at every batch from 1 to
2,048. The A/B of their rollouts is not yet measured.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SHIPPED = Path(__file__).with_name("lora_configs")
FILES = {"shrink": "SHRINK", "expand": "EXPAND_TRUE"}  # the engine's expand adds into the base layer's output
ENV = "VLLM_TUNED_CONFIG_FOLDER"


def card_file_prefix(card: str) -> str:
    """The card's name as vLLM spells it in the files' names (utils.load_lora_op_config)."""
    return card.replace(" ", "_").replace("-", "_")


def packed_layers(config: dict) -> dict[str, tuple[int, list[int]]]:
    """vLLM's packed LoRA layers of a model config: name -> (input width K, output widths of its slices)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    return {"qkv_proj": (hidden, [q, kv, kv]), "o_proj": (q, [hidden]), "gate_up_proj": (hidden, [inter, inter]),
            "down_proj": (inter, [hidden])}


def lookups(config: dict, rank: int) -> dict[str, set[tuple[int, int, int]]]:
    """The (slices, K, N) each kernel looks its config up by for this model; `rank`: the engine's max_lora_rank (the
    adapter's stacks are padded to it)."""
    out: dict[str, set] = {"shrink": set(), "expand": set()}
    for k, outs in packed_layers(config).values():
        out["shrink"].add((len(outs), k, rank))
        out["expand"].add((len(outs), rank, max(outs)))
    return out


def covers(data: dict, keys: set[tuple[int, int, int]]) -> bool:
    """Whether a config file holds each (slices, K, N) exactly at every slot count and batch it lists."""
    if not data:
        return False
    for by_slices in data.values():
        for slices, k, n in keys:
            by_batch = by_slices.get(str(slices))
            if not by_batch or any(str(n) not in by_k.get(str(k), {}) for by_k in by_batch.values()):
                return False
    return True


def tuned_folder(config: dict, rank: int, card: str, folder: Path = SHIPPED) -> Path | None:
    """`folder` where both of its files for `card` cover this model's lookups, else None (vLLM's defaults)."""
    need = lookups(config, rank)
    for kernel, suffix in FILES.items():
        path = folder / f"{card_file_prefix(card)}_{suffix}.json"
        if not path.is_file() or not covers(json.loads(path.read_text()), need[kernel]):
            return None
    return folder


def use_tuned(config: dict, rank: int, card: str) -> str:
    """Points vLLM at the shipped configs where they cover this card and model (before the engine's first LoRA
    kernel: vLLM caches the file it read); a folder the user set is left as it is. Returns what was decided, for
    the log and engine.json."""
    if os.environ.get(ENV) and os.environ[ENV] != str(SHIPPED):  # not an earlier engine's choice in this process
        return f"{ENV}={os.environ[ENV]} (set by the user)"
    folder = tuned_folder(config, rank, card)
    if folder is None:
        os.environ.pop(ENV, None)
        return f"vLLM's default LoRA kernel configs (none tuned for {card} at this model's shapes, rank {rank})"
    os.environ[ENV] = str(folder)
    return f"LoRA kernel configs tuned for {card} at this model's shapes (rank {rank}): {folder}"
