"""Predicted seconds per GRPO step for a set of planner knobs, from costs measured on an H100: the planner ranks the
plans that fit the budget by it (fastest first). Pure arithmetic, no torch; it decides nothing about memory.

Measured inputs (bench/results/decode_profile.json, Qwen2.5-1.5B shape, LoRA r16, 2026-11-26 H100 sitting):
- vLLM decode, ms per token step (B sequences, full CUDA graphs): shared nf4 through bitsandbytes 6.93 (B=8) and
  7.34 (B=64); bf16 mirror 4.08 and 5.37. Between and beyond the two batch sizes the time is interpolated in
  log2(B); the weight-reading share scales with the model's linear parameters.
- Train micro-batch, forward + backward of completion log-probs: a launch-bound floor per micro-batch (eager with
  checkpointing ~0.37 s, bench/results/small_point_probe.json; compiled layers 0.22-0.29 s with checkpointing and
  0.13-0.17 s without, decode_profile.json's train_speed_probe) or its compute, whichever is larger: config B's
  17k-token micro-batches took ~1 s each (57 us per token with checkpointing for the 1.5B shape), scaled by
  parameters.
Good enough to rank knobs (format, micro-batch size, checkpointing, KV release); not a promise of wall time.
"""
from __future__ import annotations

import math

REF_LINEAR_PARAMS = 1.31e9  # the 1.5B shape's linear parameters, where the constants were measured
DECODE_MS = {"shared_nf4": {8: 6.93, 64: 7.34}, "bf16_mirror": {8: 4.08, 64: 5.37}}
# With the fused nf4 GEMM (batches <= 16 rows): config A's rollout of 256 tokens at 8 sequences took 1.509 s against
# 1.771 s through bitsandbytes in the same sitting (bench/results/vs_peers_h100.json): 5.89 ms per step.
FUSED_NF4_MS_AT_8 = 5.89
MICRO_BATCH_FLOOR_S = {(False, True): 0.37, (False, False): 0.26, (True, True): 0.24, (True, False): 0.15}
TRAIN_S_PER_TOKEN = 57e-6  # 1.5B shape, checkpointing on, GPU-bound micro-batches
RECOMPUTE_FACTOR = 1.33  # checkpointing runs the forward twice
KV_RELEASE_S = 0.015  # release + re-map of the KV pool per step (measured 6-14 ms)


def decode_ms(fmt: str, seqs: int, linear_params: int, fused_nf4: bool = False) -> float:
    """One decode step of `seqs` sequences."""
    lo, hi = DECODE_MS[fmt][8], DECODE_MS[fmt][64]
    if fmt == "shared_nf4" and fused_nf4 and seqs <= 16:
        lo = FUSED_NF4_MS_AT_8
    t = min(max((math.log2(max(seqs, 1)) - 3) / 3, -1.0), 2.0)  # 0 at 8, 1 at 64
    ms = lo + (hi - lo) * t
    return max(ms * (0.4 + 0.6 * linear_params / REF_LINEAR_PARAMS), 0.5)


def step_seconds(linear_params: int, gen: int, completion_len: int, step_tokens: int, knobs: dict,
                 engine: str, compiled: bool = False, fused_nf4: bool = False) -> float:
    """Rollout (vLLM decode; HF generate is charged 5x) + train phase for one step."""
    seqs = min(gen, knobs.get("max_num_seqs") or gen)
    waves = math.ceil(gen / max(seqs, 1))
    fmt = knobs.get("weight_format") or "shared_nf4"
    rollout = waves * completion_len * decode_ms(fmt, seqs, linear_params, fused_nf4) / 1e3
    if engine != "vllm":
        rollout *= 5.0
    gc = bool(knobs["gradient_checkpointing"])
    mbt = max(min(knobs["micro_batch_tokens"], step_tokens), 1)
    micro_batches = math.ceil(step_tokens / mbt)
    per_token = TRAIN_S_PER_TOKEN * linear_params / REF_LINEAR_PARAMS * (1.0 if gc else 1 / RECOMPUTE_FACTOR)
    # each micro-batch costs the larger of its launch-bound floor and its compute (dispatch runs ahead of the GPU)
    train = micro_batches * max(MICRO_BATCH_FLOOR_S[(compiled, gc)], mbt * per_token)
    return rollout + train + (KV_RELEASE_S if knobs.get("kv_release") else 0.0)
