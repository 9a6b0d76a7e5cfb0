"""Predicted seconds per GRPO step for a set of planner knobs, from costs measured on an H200: the planner ranks the
plans that fit the budget by it (fastest first). Pure arithmetic, no torch; it decides nothing about memory.

Fitted to every steady row of the H200 planner grid and the long-context row (`python bench/planner.py --fit` writes
bench/results/step_fit.json: predicted vs measured seconds by phase, each row priced with the knobs it ran with):
- Rollout (vLLM): a fixed cost a call (ROLLOUT_CALL_S) and a wave (WAVE_S; max_num_seqs < G runs the completions in
  ceil(G / max_num_seqs) waves) plus decode steps: ms per token step linear in the linear parameters (nf4 through the
  fused GEMM; bitsandbytes' path BNB_OVER_FUSED slower; the bf16 mirror), growing with the sequences in flight above 8,
  plus the KV a step reads beyond the measured ~384-token contexts at DECODE_KV_BYTES_S. When every sequence in
  flight comes from one prompt (max_num_seqs <= G), the prompt's KV is read once a step, not once per sequence:
  reading it per sequence (67 GB a step at 64K tokens) would need twice the card's bandwidth; vLLM's cascade
  attention reads a prefix all requests share once. HF generate: per token step, a cost a decoder layer (host-bound
  Python dispatch of its modules), per generate call of hf_batch_size sequences.
- Train: per micro-batch, the larger of a host-bound floor per decoder layer and its FLOPs (linear layers, lm_head,
  causal attention; forward, recompute with checkpointing, 2x backward) at TRAIN_FLOPS, and LONG_TRAIN_FLOPS for
  one-sequence micro-batches of >= 4,096 tokens (plan.LONG_SEQUENCE; large GEMMs run closer to the card's peak); each
  pass without gradients (reference, old policy) a forward; a tiled MLP (trainer/tiled_mlp.py) one more forward of
  the MLPs.
The terms the grid cannot separate (one HF row, one long row, one 7B mirror row) are marked where they are defined.
Good enough to rank knobs (format, micro-batch size, checkpointing, KV release, waves) and to tell a user the price
of a small budget; not a promise of wall time: the first steps also compile.
"""
from __future__ import annotations

import functools
import math
import re

from trainer import graph_lengths

# vLLM decode, ms per token step at 8 sequences: (fixed, per 1e9 linear parameters), and the step's growth per unit of
# t = (log2(sequences) - 3) / 3 (0 at 8, 1 at 64; no speed-up below 8: the H200 grid's 1- and 4-sequence rollouts ran
# at 8's step time). Fitted to the H200 grid's steady rollouts with ROLLOUT_CALL_S and WAVE_S taken out first
# (bench/results/step_fit.json): shared nf4 through the fused GEMM 3.8-4.2 ms (0.5B shape), 4.3 (1.5B), 8.4-9.3 (7B),
# 10.4 (8B); bf16 mirror 2.6 (0.5B at 16 sequences, 1.5B at 8). The mirror's slope, 2 bytes a parameter read each
# step, from the first 7B mirror row on the H200 (2026-12-06, bench/results/queue_2026-12-06/a: 8 x 512 with the
# adapter merged, 4.73 ms a token step) and config A's 1.5B (1.72 ms) with the fixed term kept: 0.55 ms per 1e9 (~3.6
# TB/s achieved; 0.42 before, the data sheet's 4.8, under-priced the 7B's rollout by 18%). Checked on rows not fitted
# on: the two 7B mirror rows of one H100 (bandwidth-scaled) 0.99x, the H100's 1.5B mirror rows 0.90-1.21x.
DECODE_MS_AT_8 = {"shared_nf4": (3.33, 0.93), "bf16_mirror": (2.2, 0.55)}
DECODE_GROWTH = {"shared_nf4": 0.059, "bf16_mirror": 0.2}
BNB_OVER_FUSED = 1.177  # bitsandbytes' nf4 path over the fused GEMM's (H100, 8 sequences: 6.93 vs 5.89 ms)
# Decode batches up to this many rows take the fused nf4 GEMM (the plan's nf4_gemm_max_rows); larger ones (prefill)
# keep bitsandbytes' path: at 32-64 rows the kernel alone is no faster (bench/results/nf4_bench.json).
NF4_GEMM_MAX_ROWS = 16
# a rollout's fixed cost (the engine call, scheduling, prefill): the 7B's 8 x 64 took 0.80 s, its 8 x 512 9.8 s
ROLLOUT_CALL_S = 0.2
WAVE_S = 0.06  # each wave of sequences in flight (1.5B mirror, 16 waves of one 64-token sequence: 4.2 s)
# HF generate (shared nf4 base, peft LoRA), ms per token step and decoder layer: the step is host-bound (Python
# dispatch of each layer's modules), flat in the parameters and the batch. The H200 grid's three HF rows, steady:
# 0.5B shape (24 layers) at 32 sequences 46.6 ms a step, 1.5B r64 (28 layers, 1.3e9 linear parameters) at 8 72.3 ms,
# 7B (28 layers, 6.5e9) at 8 72.5 ms: 1.9-2.6 ms a layer, one constant keeps each row's step within 18%. A fit
# with a per-parameter term on the first two rows (1.64 ms a layer + 20.1 ms per 1e9) predicted the third, unseen,
# at 2.4x its rollout (45.3 s against 18.6); the 10.4x vLLM's decode before it was fitted on the 0.5B row alone.
# The compiled decode step (rollout.hf_compile, trainer/rollout/hf.py) is priced the same until it is measured.
HF_MS_PER_LAYER = 2.4
# Train micro-batch, forward + backward of completion log-probs: the larger of a host-bound floor and its FLOPs at
# TRAIN_FLOPS. The floor is per decoder layer (s; keyed by (compiled layers, checkpointing)): the profile of a 1.5B
# step on the H200 (TRAINER_PROFILE_STEP=5, eight 286-token micro-batches, bench/results/planner_2026-12-04/h/) had
# the GPU busy ~0.3 s of the train phase's 2.1-2.9 s; the host ran each layer's compiled forward (~2.2 ms), its
# recompute (~2.2) and its backward (~2.3 + autograd), bitsandbytes' and peft's Python around the GEMMs, for every
# micro-batch. The grid's host-bound rows (compute under half their time) took 5.5-12.8 ms a layer and micro-batch
# compiled with checkpointing, one config 6.7 and 10.1 in two sittings; 7.0 ms keeps every steady row's step but
# one within 25% (the flat 0.13 s floor before missed the 8B's eight 286-token micro-batches by -49% in train and
# two 1.5B rows by -36% and -49% in the step). Rows of one micro-batch (and the 1.5B mirror's 94-token ones with a
# reference pass) ran at 3-4 ms a layer: STEP_MODEL_MISSES in tests/test_plan.py. Eager with checkpointing (the
# three HF rows, whose layers do not compile): 9.0-15.2 ms. Without checkpointing: the profile's share without the
# recompute (0.77).
LAYER_FLOOR_S = {(True, True): 7.0e-3, (True, False): 5.4e-3, (False, True): 12e-3, (False, False): 9.2e-3}
# The checkpoint inside the compiled layers' graphs (plan.checkpoint_in_graph): one compiled forward and one backward
# a layer from Python, as without checkpointing, so that floor (5.4 ms); and the backward recomputes the pointwise ops
# only (the matmul outputs are kept: memory.CKPT_IN_GRAPH_BYTES), 3 forwards' FLOPs as without checkpointing. Measured
# on the H200 against HF's checkpoint (2026-12-05, eight 286-token micro-batches): train phase 0.60x and 0.78x on the
# 1.5B in two sittings, 0.76x on the 0.5B (5.4 / 7.0 = 0.77x). Priced the same as no checkpointing, the planner takes
# no checkpointing where both fit (an in-graph candidate comes after it, trainer/plan.py).
# The compiled layers replayed from CUDA graphs (plan.train_cudagraphs, with the checkpoint inside them or none): one
# replay a layer call instead of its Python and Triton launches. Measured on one H100 (2026-12-07, compile_ab
# train_cudagraphs, bench/results/queue_2026-12-07/g; eight 286-token micro-batches of the 1.5B in float16, the
# checkpoint in graph): the train phase 0.38-0.42 s against 1.23-1.75 s, ~40 ms a micro-batch beside the plain
# layers' ~180: 1.4 ms a layer. One config on one card, not yet on the H200 grid.
GRAPHED_LAYER_FLOOR_S = 1.4e-3
# FLOPs of a micro-batch: 2 per parameter per token through the linear layers and lm_head plus causal attention's
# 2 T^2 heads head_dim per layer, for the forward; x4 with checkpointing (forward, recompute, 2x backward), x3
# without. Rates fitted on the H200: 300e12 across the grid's compute-bound micro-batches (1.5B 8,064 tokens 357,
# 8B 1,054 230, 0.5B 8,252 157: GEMM shapes differ; one rate keeps each steady row's step within 16%), and for
# one-sequence micro-batches of >= 4,096 tokens the long row's 165.8 s train phase (Llama-3.1-8B shape, 8 x 65,536
# tokens, step 2, LoRA in bf16; H200 2026-12-04). Its fp32-LoRA run of 2026-12-03 took 183.1 s (369e12 then); the
# offloaded, tiled 24 GB and 15 GB rows come out 3% and 18% above their measured train phases at this rate.
TRAIN_FLOPS = 300e12
LONG_TRAIN_FLOPS = 407e12
KV_RELEASE_S = 0.015  # release + re-map of the KV pool per step (measured 6-14 ms)
# The step's cost outside the rollout beyond the micro-batches' (the optimizer, the LoRA sync, rewards, the loss's
# statistics; not separated): fitted on the H200 grid (2026-12-03), where config A's one 2,288-token micro-batch
# took 0.29 s in steady steps against its 0.13 s floor; 0.1 s keeps every steady row's train phase within 37%.
TRAIN_STEP_S = 0.1
# Fitted to the long row (above): 42.2 s of its rollout beyond ROLLOUT_CALL_S + WAVE_S + 4,096 base decode steps, for
# (61,440 + 8 x 2,048 - 8 x 384) tokens x 131,072 bytes of KV read a step.
DECODE_KV_BYTES_S = 0.95e12
MEASURED_CONTEXT = 384  # the decode constants above were measured at about this many tokens of context
# ... but never less than this per token of context and decoder layer: a small model's attention does not read its few
# KV bytes at the long row's rate. The H200 grid's 0.5B rows (2 KV heads x 64: 512 bytes a token and layer, 0.54 ns at
# DECODE_KV_BYTES_S) ran their long decodes at 1.9-3.7 ns a token-layer beyond MEASURED_CONTEXT (8 x 4,096 on the
# shared nf4 base, 16 x 2,048 on the mirror: predicted 9-28% under their rollouts on bytes alone); 2.2 ns, what the
# 7B's 2,048 bytes cost at that rate, brings them within 13% and leaves the 7B and 8B rows where they were (the long
# Qwen-7B row +1%). Checked on a row not fitted on: the 16 x 2,048 row on one H100 (2026-12-06), measured over
# predicted +61% -> +26% (tests/test_plan.py H100_ROLLOUT_MISSES: its slower host, recompiling steps).
DECODE_ATTN_S_PER_TOKEN_LAYER = 2.2e-9
# The bf16 mirror's two trainer-side paths (plan.trainer_linears), measured on one H100 against the slots with the
# trainer on its nf4 (2026-12-05, bench/results/ladder_lora_merge+mirror_views_ab.json and mirror_views_ab.json, the
# 1.5B shape, config A 8 x 256 and B 64 x 512, medians of steps 3-6), not yet on the H200 grid:
# - rollout.sync merge (no LoRA kernels in vLLM's decode step): the step less its train phase fell 1.04 -> 0.74 s (A,
#   256 token steps at 8 sequences) and 3.16 -> 2.88 s (B, 512 at 64), 1.16 and 0.55 ms a token step, here per
#   decoder layer (the LoRA kernels are launched per layer) at 8 and 64 sequences, interpolated in t as DECODE_GROWTH;
#   each merge (sync.MergedSync.push) took 31-47 ms: priced per decoder layer (its ~40 launches) plus the bytes it
#   moves (dequantise, fp32 block, add, round: ~22 a parameter) at the card's bandwidth (an estimate beyond the 1.5B).
LORA_DECODE_MS_PER_LAYER = (1.16 / 28, 0.55 / 28)
MERGE_S_PER_LAYER, MERGE_BYTES_PER_PARAM, MERGE_BYTES_S = 1.0e-3, 22, 3e12
# - the trainer's linears in bf16 (views of the mirror, or the merged rows): no bitsandbytes dequantisation or its
#   Python around each GEMM; the train phase fell 0.40-0.43 -> 0.22-0.26 s (A) and 2.31-2.54 -> 1.46 s (B): 0.48-0.58
#   of its micro-batches' share (the phase less TRAIN_STEP_S). The reference pass under the merged rows (peft's
#   adapter disabled) keeps the nf4 path.
BF16_LINEARS_TRAIN = 0.55
# Activation offload: each checkpointed layer input goes to the host and back over PCIe. Charged in full, as if the
# copies were not overlapped with compute (an upper bound: they run on a side stream), so that the planner turns
# offload on only where the checkpoints do not fit on the device. Estimate (PCIe Gen5 x16, pinned), not measured.
OFFLOAD_BYTES_S = 25e9


# Other cards: every constant above was measured on an H200 (4.8 TB/s of HBM, 989e12 dense bf16 FLOP/s on its data
# sheet). What reads memory (the bf16 mirror's per-parameter decode term: the weights each token step reads; the KV
# read) scales with a card's bandwidth, the nf4 base's per-parameter decode term (NF4_SCALES_WITH) and the train phase's
# compute (TRAIN_FLOPS, LONG_TRAIN_FLOPS) with its dense 16-bit tensor FLOP/s; the host-bound terms (the decode's fixed
# term, the layer floors, HF generate's per-layer cost, the LoRA launches) do not. On one H100 (3.35 TB/s;
# bench/results/planner_h100.json, the 7 bf16-mirror rows of 2026-12-05, none fitted on) the steady rollouts measured
# 1.06-1.55x the H200-priced ones (the 7B's 1.54-1.55x: its 13 GB of bf16 weights read 512 times), and 0.98-1.29x with
# the bandwidth scaled; since the mirror's slope was refitted on the H200's 7B row (2026-12-06), 1.00-1.32x and
# 0.90-1.21x (the 7B's 0.99x). The other rows of this table are data-sheet figures, not measured here. (name fragment as
# torch reports the card, a whole word or words of it, TB/s, dense 16-bit tensor TFLOP/s); the first fragment found in
# the card's name is taken, so the more specific come first.
REFERENCE_CARD = (4.8, 989.0)
# The nf4 base's decode term scales with the card's compute (index 1 of card_speed), not its bandwidth (index 0): on
# one H100 (2026-12-06, bench/results/queue_2026-12-06/h-i, not fitted on) the three shared-nf4 rows' steady rollouts
# ran 0.92-0.99x their H200-priced ones (the 7B's 8 x 1,024 0.99x) where the bandwidth-scaled price had them at
# 0.77-0.88x: the dequantising GEMM does not wait on its bytes. Data-sheet FLOP/s stand for the SM throughput it does
# wait on, a guess on cards other than these two.
NF4_SCALES_WITH = 1
CARDS: tuple[tuple[str, float, float], ...] = (
    ("GH200", 4.0, 989.0), ("H200", 4.8, 989.0), ("H100 PCIe", 2.0, 756.0), ("H100 NVL", 3.9, 835.0),
    ("H100", 3.35, 989.0), ("A100-SXM4-40GB", 1.56, 312.0), ("A100-PCIE-40GB", 1.56, 312.0), ("A100", 2.0, 312.0),
    ("L40S", 0.864, 362.0), ("L40", 0.864, 181.0), ("L4", 0.3, 121.0), ("A10G", 0.6, 70.0), ("A10", 0.6, 125.0),
    ("RTX 6000 Ada", 0.96, 365.0), ("A6000", 0.768, 155.0), ("RTX 4090", 1.008, 165.0), ("RTX 3090", 0.936, 71.0),
    ("V100", 0.9, 125.0), ("T4", 0.32, 65.0),
)


@functools.cache  # the planner prices every candidate on one card
def card_speed(name: str | None) -> tuple[float, float] | None:
    """(bandwidth, compute) relative to the H200 for a card torch names `name`; None for a card not in CARDS (priced
    at the H200's speed)."""
    for fragment, tb_s, tflops in CARDS:
        if name and re.search(rf"\b{re.escape(fragment)}\b", name, re.IGNORECASE):
            return tb_s / REFERENCE_CARD[0], tflops / REFERENCE_CARD[1]
    return None


def seqs_scale(seqs: int, top: float) -> float:
    """t = (log2(sequences) - 3) / 3: 0 at 8 sequences (and below), 1 at 64, at most `top`."""
    return min(max((math.log2(max(seqs, 1)) - 3) / 3, 0.0), top)


def decode_ms(fmt: str, seqs: int, linear_params: int, fused_nf4: bool = False,
              speed: tuple[float, float] = (1.0, 1.0)) -> float:
    """One decode step of `seqs` sequences; `speed`: the card's (bandwidth, compute) relative to the H200's. The bf16
    mirror's per-parameter term is its weights' bytes, at the card's bandwidth; the nf4 base's is its dequantising
    GEMM's arithmetic (0.93 ms per 1e9 parameters is 0.54 TB/s of nf4 bytes, a ninth of the H200's bandwidth), at the
    card's compute (NF4_SCALES_WITH)."""
    fixed, per_billion = DECODE_MS_AT_8[fmt]
    ms = fixed + per_billion * linear_params / 1e9 / speed[NF4_SCALES_WITH if fmt == "shared_nf4" else 0]
    if fmt == "shared_nf4" and not (fused_nf4 and seqs <= NF4_GEMM_MAX_ROWS):
        ms *= BNB_OVER_FUSED
    return max(ms * (1 + DECODE_GROWTH[fmt] * seqs_scale(seqs, 2.0)), 0.5)


def step_seconds(*args, **kwargs) -> float:
    """Predicted seconds of one step: the sum of step_breakdown's phases."""
    return sum(step_breakdown(*args, **kwargs).values())


def step_breakdown(linear_params: int, gen: int, completion_len: int, step_tokens: int, knobs: dict,
                   engine: str, compiled: bool = False, fused_nf4: bool = False, *, dims, prompt_len: int = 0,
                   num_iterations: int = 1, forward_passes: int = 0, group: int = 1,
                   reference_pass: bool = False, speed: tuple[float, float] | None = None) -> dict[str, float]:
    """Seconds by phase: rollout (vLLM's call, waves and decode; HF generate's calls of token steps) and train
    (`num_iterations` forward + backward passes over the batch and `forward_passes` log-prob passes without gradients:
    the reference model's when beta > 0, the old policy's when num_iterations > 1; `reference_pass`: one of them is the
    reference's). `dims` (memory.ModelDims): the layers, attention and KV shapes; `group`: completions per prompt (G);
    `speed`: the card's (bandwidth, compute) relative to the H200 (card_speed; None: the H200's)."""
    bandwidth, compute = speed or (1.0, 1.0)
    if engine == "vllm":
        seqs = min(gen, knobs.get("max_num_seqs") or gen)
        waves = math.ceil(gen / max(seqs, 1))
        step_ms = decode_ms(knobs.get("weight_format") or "shared_nf4", seqs, linear_params, fused_nf4,
                            (bandwidth, compute))
        # the KV a decode step reads beyond the measured context
        prompts_read = prompt_len if seqs <= group else seqs * prompt_len  # one prompt in flight: read once
        extra = max(0.0, prompts_read + seqs * (completion_len / 2 - MEASURED_CONTEXT))
        kv_s = max(dims.kv_bytes_per_token() / DECODE_KV_BYTES_S, dims.layers * DECODE_ATTN_S_PER_TOKEN_LAYER)
        step_ms += 1e3 * extra * kv_s / bandwidth
        if knobs.get("sync") == "merge":  # no LoRA kernels in the decode step (the adapter is in the weights)
            at8, at64 = LORA_DECODE_MS_PER_LAYER  # measured at 8 and 64: not extrapolated past 64
            step_ms = max(step_ms - dims.layers * (at8 + (at64 - at8) * seqs_scale(seqs, 1.0)), 0.5)
        rollout = ROLLOUT_CALL_S + waves * WAVE_S + waves * completion_len * step_ms / 1e3
    else:  # HF generate: ceil(G / hf_batch_size) calls of completion_len token steps each
        calls = math.ceil(gen / max(knobs.get("hf_batch_size") or gen, 1))
        rollout = calls * completion_len * HF_MS_PER_LAYER * dims.layers / 1e3
    gc = bool(knobs["gradient_checkpointing"]) and not knobs.get("checkpoint_in_graph")
    # the checkpoint inside the layers recomputing every op (plan.checkpoint_recompute_all): HF's FLOPs, the in-graph
    # launches (its floor). Measured once with graphs (H100, 2026-12-07 21:25, config A at 3.3 GB, 279-token
    # micro-batches): train phase 0.45 s against 0.43 predicted, step 1.78 against 1.85
    flops_gc = gc or bool(knobs["gradient_checkpointing"] and knobs.get("checkpoint_recompute_all"))
    # whole rows a micro-batch: as many of the priced length as fit the token budget (batch.pack; at least one), or
    # the fixed count (micro_batch_seqs; trainer/graph_lengths.py where graphs replay)
    seq = step_tokens / max(gen, 1)
    rows = graph_lengths.rows_per_micro_batch(min(knobs["micro_batch_tokens"], step_tokens), max(round(seq), 1),
                                              knobs.get("micro_batch_seqs"))
    micro_batches, mbt = math.ceil(gen / rows), rows * seq
    graphed = bool(knobs.get("train_cudagraphs"))
    # a micro-batch's forward FLOPs: linear layers and lm_head, and causal attention, quadratic in each sequence
    head = dims.vocab * dims.hidden
    attn = 2 * seq * seq * dims.heads * dims.head_dim * dims.layers * mbt / seq
    forward = 2 * (linear_params + head) * mbt + attn
    # long sequences, one a micro-batch: large GEMMs, closer to the card's peak than the grid's micro-batches
    rate = (LONG_TRAIN_FLOPS if knobs.get("micro_batch_seqs") == 1 else TRAIN_FLOPS) * compute
    # each micro-batch costs the larger of its host-bound floor and its compute (dispatch runs ahead of the GPU);
    # a pass without gradients (the reference model's, the old policy's) a forward over half the launches
    floor, free_floor = ((GRAPHED_LAYER_FLOOR_S, GRAPHED_LAYER_FLOOR_S) if graphed else
                         (LAYER_FLOOR_S[(compiled, gc)], LAYER_FLOOR_S[(compiled, False)]))
    grad_pass = max(floor * dims.layers, (4 if flops_gc else 3) * forward / rate)
    free_pass = max(free_floor * dims.layers / 2, forward / rate)
    linears = knobs.get("trainer_linears", "nf4")
    if linears != "nf4":  # bf16 linears (the mirror's views or merged rows): BF16_LINEARS_TRAIN
        grad_pass *= BF16_LINEARS_TRAIN
    nf4_passes = forward_passes if linears == "nf4" else int(reference_pass and linears == "rows")
    train = micro_batches * (num_iterations * grad_pass + nf4_passes * free_pass
                             + (forward_passes - nf4_passes) * free_pass * BF16_LINEARS_TRAIN)
    if knobs.get("sync") == "merge":  # the merge after each optimizer step
        train += dims.layers * MERGE_S_PER_LAYER + MERGE_BYTES_PER_PARAM * linear_params / MERGE_BYTES_S
    if knobs.get("mlp_tile_tokens"):  # a tiled MLP's backward runs the MLPs' forward once more
        mlp_forward = 2 * dims.layers * 3 * dims.hidden * dims.intermediate * mbt
        train += micro_batches * num_iterations * mlp_forward / rate
    if knobs.get("activation_offload"):  # the copies, charged in full (OFFLOAD_BYTES_S)
        train += micro_batches * 2 * dims.layers * mbt * dims.hidden * 2 / OFFLOAD_BYTES_S
    return {"rollout": rollout, "train": train + TRAIN_STEP_S + (KV_RELEASE_S if knobs.get("kv_release") else 0.0)}
