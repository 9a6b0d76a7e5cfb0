"""Predicted seconds per GRPO step for a set of planner knobs, from costs measured on an H200 (decode) and an H100 (train:
the same GH100 compute): the planner ranks the plans that fit the budget by it (fastest first). Pure arithmetic, no
torch; it decides nothing about memory.

Measured inputs:
- vLLM decode, ms per token step at 8 sequences in flight (full CUDA graphs), fitted to the H200 planner grid's steady
  rollouts (bench/results/planner.json, 2026-12-02; rollout seconds / completion tokens): shared nf4 through the fused
  GEMM 3.9 ms (0.5B shape), 5.3 (1.5B), 12.5 (7B): 3.46 + 1.385 ms per 1e9 linear parameters; bf16 mirror 2.9 (0.5B
  at 16 sequences), 3.6 (1.5B): 2.53 + 0.84 ms per 1e9. The H100 constants this replaced (decode_profile.json,
  2026-11-26) scaled the whole step with the parameters and put the 7B at ~20 ms a step against 12.5 measured.
  Batch growth per doubling of the sequences in flight from the H100's decode profile (nf4: 7.34 vs 6.93 ms from 8 to
  64 sequences) and the H200 grid (mirror: 3.78 at 32 vs 3.63 at 8); bitsandbytes' nf4 path (fused GEMM off, or more
  rows than it takes) 1.177x the fused one (H100: 6.93 vs 5.89 ms at 8 sequences).
- Train micro-batch, forward + backward of completion log-probs: a launch-bound floor per micro-batch (eager with
  checkpointing ~0.37 s, bench/results/small_point_probe.json; compiled layers 0.22-0.29 s with checkpointing and
  0.13-0.17 s without, decode_profile.json's train_speed_probe) or its compute, whichever is larger: config B's
  17k-token micro-batches took ~1 s each (57 us per token with checkpointing for the 1.5B shape), scaled by
  parameters.
Long sequences add two terms the measurements above (contexts of 128-640 tokens) do not hold, fitted to the one long
row measured so far (bench/results/long_context.json, one H200, 2026-12-03: Llama-3.1-8B shape, G = 8, 61,440-token
prompt + 4,096-token completions, rollout 82.7 s and train 183 s a step, where the data-sheet estimates these replace
predicted 129 s and 279 s); `python bench/planner.py --fit` prints every row against them:
- the KV cache a decode step reads beyond the measured contexts, at DECODE_KV_BYTES_S. When every sequence in flight
  comes from one prompt (max_num_seqs <= G), the prompt's KV is read once a step, not once per sequence: reading it
  per sequence (67 GB a step) in the 7 ms measured would take 9.5 TB/s, twice the card's bandwidth; vLLM's cascade
  attention reads a prefix all requests share once. With sequences of several prompts in flight, each reads its own.
- the train phase of one-sequence micro-batches (>= 4,096 tokens, plan.LONG_SEQUENCE): its FLOPs, linear layers (2 per
  parameter per token forward, twice that backward, a second forward with checkpointing) plus causal attention (the
  forward's 2 T^2 heads head_dim per layer, backward 2x, recompute 1x), at LONG_TRAIN_FLOPS. The per-token constant
  above, fitted on 1-17K-token micro-batches of the 1.5B shape, put that row at 279 s: large GEMMs run closer to the
  card's peak than the small ones it was fitted on.
Both are the same for every knob but the waves (max_num_seqs < G: the rollout runs ceil(G / max_num_seqs) times), so
they change the predicted step time more than the ranking.
Good enough to rank knobs (format, micro-batch size, checkpointing, KV release, waves); not a promise of wall time.
"""
from __future__ import annotations

import math

REF_LINEAR_PARAMS = 1.31e9  # the 1.5B shape's linear parameters, where the constants were measured
# ms per decode step at 8 sequences: (fixed, per 1e9 linear parameters); nf4 through the fused GEMM (H200 grid)
DECODE_MS_AT_8 = {"shared_nf4": (3.46, 1.385), "bf16_mirror": (2.53, 0.84)}
DECODE_GROWTH = {"shared_nf4": 0.059, "bf16_mirror": 0.10}  # the step's growth from 8 to 64 sequences
BNB_OVER_FUSED = 1.177  # bitsandbytes' nf4 path over the fused GEMM's (H100, 8 sequences: 6.93 vs 5.89 ms)
# Decode batches up to this many rows take the fused nf4 GEMM (the plan's nf4_gemm_max_rows); larger ones (prefill)
# keep bitsandbytes' path: at 32-64 rows the kernel alone is no faster (bench/results/nf4_bench.json).
NF4_GEMM_MAX_ROWS = 16
MICRO_BATCH_FLOOR_S = {(False, True): 0.37, (False, False): 0.26, (True, True): 0.24, (True, False): 0.15}
TRAIN_S_PER_TOKEN = 57e-6  # 1.5B shape, checkpointing on, GPU-bound micro-batches
RECOMPUTE_FACTOR = 1.33  # checkpointing runs the forward twice
KV_RELEASE_S = 0.015  # release + re-map of the KV pool per step (measured 6-14 ms)
# Fitted to the long row (above): 28.9 s of its rollout beyond 4,096 base decode steps, for (61,440 + 8 x 2,048 - 8 x
# 384) tokens x 131,072 bytes of KV read a step; its train phase's 6.53e16 FLOPs in 183.1 s.
DECODE_KV_BYTES_S = 1.39e12
LONG_TRAIN_FLOPS = 357e12
MEASURED_CONTEXT = 384  # the decode constants above were measured at about this many tokens of context
# Activation offload: each checkpointed layer input goes to the host and back over PCIe. Charged in full, as if the
# copies were not overlapped with compute (an upper bound: they run on a side stream), so that the planner turns
# offload on only where the checkpoints do not fit on the device. Estimate (PCIe Gen5 x16, pinned), not measured.
OFFLOAD_BYTES_S = 25e9


def decode_ms(fmt: str, seqs: int, linear_params: int, fused_nf4: bool = False) -> float:
    """One decode step of `seqs` sequences."""
    fixed, per_billion = DECODE_MS_AT_8[fmt]
    ms = fixed + per_billion * linear_params / 1e9
    if fmt == "shared_nf4" and not (fused_nf4 and seqs <= NF4_GEMM_MAX_ROWS):
        ms *= BNB_OVER_FUSED
    t = min(max((math.log2(max(seqs, 1)) - 3) / 3, -1.0), 2.0)  # 0 at 8, 1 at 64
    return max(ms * (1 + DECODE_GROWTH[fmt] * t), 0.5)


def step_seconds(*args, **kwargs) -> float:
    """Predicted seconds of one step: the sum of step_breakdown's phases."""
    return sum(step_breakdown(*args, **kwargs).values())


def step_breakdown(linear_params: int, gen: int, completion_len: int, step_tokens: int, knobs: dict,
                   engine: str, compiled: bool = False, fused_nf4: bool = False, dims=None, prompt_len: int = 0,
                   num_iterations: int = 1, forward_passes: int = 0, group: int = 1) -> dict[str, float]:
    """Seconds by phase: rollout (vLLM decode; HF generate is charged 5x) and train (`num_iterations` forward +
    backward passes over the batch and `forward_passes` log-prob passes without gradients: the reference model's
    when beta > 0, the old policy's when num_iterations > 1). `dims` (memory.ModelDims) adds the long-sequence terms;
    `group`: completions per prompt (G)."""
    seqs = min(gen, knobs.get("max_num_seqs") or gen)
    waves = math.ceil(gen / max(seqs, 1))
    fmt = knobs.get("weight_format") or "shared_nf4"
    step_ms = decode_ms(fmt, seqs, linear_params, fused_nf4)
    if dims is not None:  # the KV a decode step reads beyond the measured context
        prompts_read = prompt_len if seqs <= group else seqs * prompt_len  # one prompt in flight: read once
        extra = max(0.0, prompts_read + seqs * (completion_len / 2 - MEASURED_CONTEXT))
        step_ms += 1e3 * extra * dims.kv_bytes_per_token() / DECODE_KV_BYTES_S
    rollout = waves * completion_len * step_ms / 1e3
    if engine != "vllm":
        rollout *= 5.0
    gc = bool(knobs["gradient_checkpointing"])
    mbt = max(min(knobs["micro_batch_tokens"], step_tokens), 1)
    micro_batches = math.ceil(step_tokens / mbt)
    # causal attention's forward FLOPs, quadratic in each sequence
    seq = step_tokens / max(gen, 1)
    attn = 2 * seq * seq * dims.heads * dims.head_dim * dims.layers * gen if dims is not None else 0.0
    if dims is not None and knobs.get("micro_batch_seqs") == 1:  # long sequences, one a micro-batch: their FLOPs
        linear = 2 * linear_params * step_tokens
        passes = num_iterations * ((4 if gc else 3) * (linear + attn)) + forward_passes * (linear + attn)
        floor = (num_iterations + forward_passes / 2) * micro_batches * MICRO_BATCH_FLOOR_S[(compiled, gc)]
        train = max(floor, passes / LONG_TRAIN_FLOPS)
    else:
        per_token = TRAIN_S_PER_TOKEN * linear_params / REF_LINEAR_PARAMS * (1.0 if gc else 1 / RECOMPUTE_FACTOR)
        # each micro-batch costs the larger of its launch-bound floor and its compute (dispatch runs ahead of the GPU)
        train = num_iterations * micro_batches * max(MICRO_BATCH_FLOOR_S[(compiled, gc)], mbt * per_token)
        # a pass without gradients: a third of a forward + backward without checkpointing, over half the launches (an
        # estimate, not measured alone: without it, 32 x 1024 with num_iterations 2 and beta 0.04 was predicted at
        # 7.1 s a step and took 11.6 s once compiled, on one H200 on 2026-12-02; with it, 10.2 s)
        fwd_per_token = TRAIN_S_PER_TOKEN * linear_params / REF_LINEAR_PARAMS / RECOMPUTE_FACTOR / 3
        train += forward_passes * micro_batches * max(MICRO_BATCH_FLOOR_S[(compiled, False)] / 2, mbt * fwd_per_token)
        # attention: forward, recompute, 2x backward per iteration; a forward per gradient-free pass
        train += attn * (num_iterations * (4 if gc else 3) + forward_passes) / LONG_TRAIN_FLOPS
    if dims is not None and knobs.get("activation_offload"):  # the copies, charged in full (OFFLOAD_BYTES_S)
        train += micro_batches * 2 * dims.layers * mbt * dims.hidden * 2 / OFFLOAD_BYTES_S
    return {"rollout": rollout, "train": train + (KV_RELEASE_S if knobs.get("kv_release") else 0.0)}
