"""Byte formulas for every component of a GRPO + LoRA run; the planner sums them. Pure arithmetic, no torch.

Constants marked "measured" come from H100 runs (bench/results/planner.json, docs/benchmarks.md); the rest are
counted from tensor shapes. Peaks are per phase: the rollout phase (vLLM or HF generate) and the train phase
(recompute + backward + optimizer); memory held across both (weights, LoRA states, CUDA graphs, a KV pool that
is not released) is counted in each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9
MiB = 2 ** 20
CUDA_CONTEXT = 530 * MiB  # measured: nvidia-smi of a process that initialised torch + cuBLAS on H100
VLLM_NON_TORCH = 225 * MiB  # measured: vLLM's non-torch allocations (NCCL, cuBLAS workspaces)
# The HF engine's memory outside torch beyond the context: kernel modules CUDA loads lazily as generate's sampling
# ops first run, bitsandbytes' library, cuBLAS handles. Measured on one H200 (2026-12-02, 0.5B shape, HF engine,
# 32 x 256 at its smallest planned budget): nvidia-smi 1.68 GB with torch reserving 0.78 GB after the rollout, 0.90 GB
# outside torch against the 0.556 planned; it ran out of memory in the rollout (bench/results/planner.json). The
# H100's 0.5B HF row of 2026-11-26 was 0.19 GB over its plan, the same sign.
HF_NON_TORCH = 330 * MiB
GRAPH_BASE, GRAPH_PER_SIZE = 90 * MiB, 16 * MiB  # measured: LoRA + bnb graphs, 0.20 GiB for [1, 2, 4, 8]
# Train-phase activations with gradient checkpointing, bytes per token of a micro-batch per (layers x hidden) and
# per (layers x intermediate); without checkpointing, the shape count (layer_activation_bytes) times NO_CKPT_FIT.
# CKPT_BYTES_PER_LH/LI and SLACK_FRACTION (below) were searched together on one H200 (2026-12-04) over every grid and
# long row of bench/results/planner.json and long_context.json at the knobs each ran with (23 rows, 0.5B to 8B, 94 to
# 65,536 tokens a micro-batch; `python bench/planner.py --fit`), the 13 rows run since LoRA went bf16 (00efd0b) held
# to at most 2% above their plan: every row within 4.3% of nvidia-smi, the bf16 rows at most 0.7% above. The earlier
# constants (2.76, 0.69; 1.215; 0.17) came from fp32-LoRA runs (peft casts each LoRA input to fp32): with LoRA in
# bf16 the 8B's 65,536-token micro-batch holds 36.5 GB of train-phase tensors, not the 45.1 they planned (62.29 GB on
# nvidia-smi against 73.08). Leaving each row out in turn, the fit predicts it within 5% (the 8B 65K row -0.7%, the
# 1.5B num_iterations 2 row -4.7%, the 0.5B 16 x 2048 row +2.4%), except the rows without checkpointing, which fix
# NO_CKPT_FIT alone. Two such rows of two shapes (compiled layers, H200): the 1.5B at 128 x 96 (one 2,016-token
# micro-batch of 20 GB's plan) and the 7B at 8 x 1,024 (15 GB, 2026-12-05). Each plan equals nvidia-smi's peak at its
# own value, 0.82 and 0.75; 0.82, the larger, keeps both at or above what they measured: -0.1% and -3.7% (0.9, the
# 1.5B row's torch-allocated ratio before the 7B ran, had them -4.3% and -7.4%, the 7B the grid's one row past 5%).
CKPT_BYTES_PER_LH, CKPT_BYTES_PER_LI = 1.8, 0.65
NO_CKPT_FIT = 0.82
# The checkpoint inside the compiled layers' graphs (plan.checkpoint_in_graph, trainer/policy.py): each layer keeps,
# beyond HF's checkpoint, this many bytes a token per (hidden + intermediate) for its backward (AOTAutograd's
# partitioner saves what it will not recompute; with the nf4 base that is the 4-bit matmuls' outputs, not the inputs
# alone as on the CPU's fp32 layers, tests/test_cap.py). Measured on one H200 (2026-12-05, bench/results/
# ckpt_in_graph_ab.json): torch's train-phase peak over steps 3-6 with it against without, eight 286-token
# micro-batches, +0.342 GB on the 1.5B shape (4.07 bytes a token x (hidden + intermediate) x layer) and +0.164 GB on
# the 0.5B (4.15); the larger. Two bf16 tensors of each width a layer would be 4.0. The 1.5B's one 2,232-token
# micro-batch, unpriced, ran out of memory at 6.6 GB with it (and again at 1,116 tokens).
CKPT_IN_GRAPH_BYTES = 4.15
# The train phase replayed from CUDA graphs (plan.train_cudagraphs): inductor's cudagraph trees allocate the graphs'
# tensors in a private pool that stays reserved through the rollout phase. One H100 point (2026-12-07,
# bench/results/queue_2026-12-07/g, compile/train_cudagraphs_ab.json, A-mb286): torch's allocated peaks equal with and
# without graphs (2.14 / 2.17 GB), nvidia-smi's steady peak +0.077 GB in both phases (3.31 against 3.23): 6.3 bytes a
# token x hidden x layer of the 286-token micro-batches. The same A/B again (h, 21:30): graphs 3.29 GB (within 0.02
# of g's), the default run 3.16 (0.07 under g's: its allocator's cache, not the pool), so +0.134; every graphed run
# so far peaked under its plan's peak with this term (tests/test_plan.py). An estimate from one shape until the graph
# A/Bs refit it.
TRAIN_GRAPH_POOL_BYTES = 6.5
# The allocator's slack (SLACK_FRACTION) on those outputs: none. At config B's eight 4,336-token micro-batches (one
# H100, 2026-12-05, bench/results/planner_h100.json, merge + rows at 14.5 GB) torch reserved 0.15 GB beyond the 11.54 GB
# it allocated in the train phase where the plan put 1.53 GB of slack, 1.0 GB of it on the in-graph term's 5.3 GB; the
# plan was 12% over nvidia-smi (the slots with the trainer on nf4, same shape, earlier that day: 10%).
IN_GRAPH_SLACK = 0.0
# Not where the trainer's linears are views of the bf16 mirror (plan trainer_linears "views"): plain bf16 linears,
# whose outputs the partitioner recomputes. Measured on one H100 (2026-12-05, bench/results/mirror_views_ab.json,
# config B 64 x 512 at 14.5 GB, eight 4,280-token micro-batches, the KV released): torch's train-phase peak 11.92 GB
# on the nf4 layers, 6.21 GB on the views (the term is 5.2 GB there). The merged rows (trainer/merged_linear.py, "rows")
# kept it: 11.72 GB in the same sitting (their autograd function saves its input; why the partitioner does not
# recompute it is not known), so it stays counted for them.
# Activation offload (plan.activation_offload, trainer/offload.py): the checkpointed layer inputs go to pinned host
# memory as the forward passes each layer and come back one layer ahead of the backward, so the device holds at most
# this many layers' checkpoints (one being copied out or prefetched, one in use) besides the layer being recomputed.
OFFLOAD_RESIDENT_LAYERS = 2
# The backward of the one layer an offloaded plan recomputes at a time holds gradient buffers its saved-tensor count
# (layer_activation_bytes) leaves out: the residual stream's gradient into and out of the layer (2 x 2 bytes a token x
# hidden) and flash attention's fp32 dq accumulator (4 bytes a query element), less what is freed by the time they are
# live. Fitted on the two offloaded long rows measured (one H200, 2026-12-03, bench/results/long_context.json), each at
# its second step's train-phase peak on nvidia-smi: qwen-7b-15gb (32,768 tokens, MLP in tiles; 14.06 GB, 0.81 GB
# over the plan without this term) wants 6 bytes a token x hidden, llama-8b-24gb-65k (65,536 tokens, another shape;
# 20.53 GB, 1.58 GB over) wants 11; 9 held both within 3.2%. After the 2026-12-04 refit of the checkpointing constants
# above (which the two resident layers use) 9 left the 8B's train phase 5.5% under nvidia-smi (hidden there behind
# its rollout's peak); 11 puts the 8B's 2.1% under and the 7B's 3.6% over; the offloaded grid rows move <= 0.3
# points. Two rows of two shapes: what the term scales with beyond tokens x hidden is not separated yet. Nine of the
# planner grid's short rows also ran offloaded (their least budgets; bench/planner.py --fit): each stays within 5% of
# nvidia-smi with it.
OFFLOAD_BACKWARD_BYTES_PER_TH = 11
# Tiled MLP (plan.mlp_tile_tokens, trainer/tiled_mlp.py): a candidate for one-sequence micro-batches of at least two
# tiles on CUDA; 8,192 tokens keep a Llama-3.1-8B tile's MLP tensors at ~0.9 GB against 7 GB for 60,928 tokens.
MLP_TILE_TOKENS = 8192
# Host memory the planner leaves to everything else (the process, the dataset, the page cache) when it checks that
# the offloaded checkpoints fit in the host's available memory.
HOST_RESERVE = 8 * 10**9
# The caching allocator reserves more than it allocates (blocks of varying sizes across phases); measured. The
# slack is on the phases' torch allocations, not on vLLM's KV pool: one allocation at engine start, it fragments
# nothing. Counted on the pool too, the 8B's 24 GB long row (12.38 GB of KV) planned its rollout 2.1 GB above what
# nvidia-smi saw (23.59 against 21.03 and 21.54, step 1 and 2); without it 21.48, and every grid row within 5%.
# SLACK_FRACTION is fitted with the activation constants above.
SLACK_FIXED, SLACK_FRACTION = 250 * 10**6, 0.19
# With expandable segments (Plan.expandable_segments: the bf16 mirror with the KV released) torch maps pages into one
# growing segment and unmaps freed ones, so little of that slack appears: the two rows that ran with them planned it
# whole and came out over-planned, 1.5B 8 x 256 at 6.6 GB by 0.36 GB (-5.7%, one H200) and the 7B mirror 8 x 512 at
# 22 GB by 0.75 (-3.5%, one H100; 2026-12-06). Half of it keeps both on the safe side, -2.6% each.
EXPANDABLE_SLACK = 0.5
# On CUDA a plan must leave this much of the budget unused: the allocator cap keeps trainer/cap.py's MARGIN (96 MiB)
# above the memory measured outside torch, and torch's cache fragments further over a run's steps. Four runs that the
# planner accepted at their least budget, plan within 0.06 GB of it, ran out of memory inside the cap with nvidia-smi
# 0.10-0.42 GB under the budget (one H200, 2026-12-03, bench/results/planner.json: 7B 8 x 512 at 8.3 GB in step 2's
# backward; 0.5B 8 x 4096 r128 at 3.6 GB in step 3's, asking for 256 MiB at 3.48 GB seen; the bf16 mirror 16 x 64 at
# 5.4 GB in the optimizer; 8B 8 x 256 at 8.4 GB in vLLM's graph capture). The largest shortfall (the 0.5B: 3.48 GB
# seen + 0.27 requested + MARGIN = 3.85 against 3.60 planned) sets it. Not yet re-measured at the new least budgets.
BUDGET_HEADROOM = 300 * 10**6
KV_BLOCK = 16  # vLLM's default block size (tokens)
# Per GPU under torchrun: NCCL buffers of the trainer's group and of vLLM's world group, and the peers' contexts,
# modelled as DISTRIBUTED_FIXED + DISTRIBUTED_PER_PEER x (world_size - 2).
# Measured: world size 2 only, on 2x H200 (bench/results/multigpu.json: 7.44 GB seen, 5.96 GB planned without it),
# which fixes the sum at two ranks and nothing else. Not measured: how it grows with more peers (NCCL allocates
# per-peer channel buffers, so it may). DISTRIBUTED_PER_PEER stays 0 until bench/multigpu.py has run at 4 ranks:
# it prints the measured overhead per GPU at each N (nvidia-smi peak in training minus the plan without this term,
# less the same at N = 1 with the same per-GPU batch) and writes the fit as "distributed_fit" in multigpu_x4.json:
# DISTRIBUTED_FIXED = the cost at 2, DISTRIBUTED_PER_PEER = (the cost at 4 - the cost at 2) / 2.
DISTRIBUTED_FIXED, DISTRIBUTED_PER_PEER = 1450 * 10**6, 0
DISTRIBUTED = DISTRIBUTED_FIXED  # the two-rank value (kept for readers of the two-GPU result)


def distributed_bytes(world_size: int) -> int:
    """Per-GPU cost of data parallelism at `world_size` ranks (0 for one process)."""
    if world_size <= 1:
        return 0
    return DISTRIBUTED_FIXED + DISTRIBUTED_PER_PEER * (world_size - 2)


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_position: int

    @classmethod
    def from_config(cls, c: dict) -> "ModelDims":
        c = c.get("text_config", c)
        h, heads = c["hidden_size"], c["num_attention_heads"]
        return cls(hidden=h, layers=c["num_hidden_layers"], heads=heads,
                   kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or h // heads,
                   intermediate=c["intermediate_size"], vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)),
                   max_position=c.get("max_position_embeddings", 1 << 30))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of one decoder layer, by peft module name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(o * i for o, i in self.linears().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, r: int, targets) -> int:
        names = self.linears() if targets == "all-linear" else {k: v for k, v in self.linears().items()
                                                                if k in set(targets)}
        return self.layers * sum(r * (o + i) for o, i in names.values())

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Context:
    dims: ModelDims
    dtype_bytes: int
    quantized: bool
    lora_r: int
    lora_targets: object
    optim: str
    cuda: bool
    engine: str
    max_len: int
    gen: int  # completions per step on this process
    prompt_len: int
    completion_len: int
    ref_pass: bool
    world_size: int = 1


def kv_pool_bytes(dims: ModelDims, seqs: int, max_len: int, shared_prompt: int = 0, prompts: int = 0) -> int:
    """A KV pool holding `seqs` full-length sequences (whole blocks), plus one spare block per sequence.

    shared_prompt > 0: the G completions of a prompt share its KV blocks (vLLM's prefix caching: with a long prompt
    the first request's chunked prefill fills the budget of each engine step, so its siblings are admitted after its
    blocks are cached and find them there). The pool then holds `prompts` prompts of `shared_prompt` tokens once,
    plus the completion side of each sequence. If sharing did not happen, vLLM would preempt and recompute (slower):
    the pool is fixed in bytes, so never more memory."""
    if shared_prompt > 0:
        blocks = prompts * math.ceil(shared_prompt / KV_BLOCK) + seqs * (
            math.ceil((max_len - shared_prompt) / KV_BLOCK) + 2)
    else:
        blocks = seqs * (math.ceil(max_len / KV_BLOCK) + 1)
    return blocks * KV_BLOCK * dims.kv_bytes_per_token()


def base_bytes(ctx: Context, vllm_layout: bool) -> int:
    """The frozen base: 4-bit linear layers (+ absmax) and bf16 embeddings, norms and biases."""
    d = ctx.dims
    small = d.layers * (2 * d.hidden + d.heads * d.head_dim + 2 * d.kv_heads * d.head_dim) + d.hidden
    return linear_base_bytes(ctx, vllm_layout) + (d.embed_params + small) * ctx.dtype_bytes


def linear_base_bytes(ctx: Context, vllm_layout: bool) -> int:
    """The base's linear layers alone (what the trainer lets go when its linears become views of the bf16 mirror)."""
    n = ctx.dims.linear_params
    if ctx.quantized:
        # vLLM's in-flight bnb: fp32 absmax per 64 weights. HF double quant: uint8 absmax + fp32 per 256 blocks.
        return n // 2 + (n // 64 * 4 if vllm_layout else n // 64 + n // 64 // 256 * 4)
    return n * ctx.dtype_bytes


def layer_activation_bytes(ctx: Context, tokens: int, mlp_tokens: int | None = None) -> int:
    """Live activations of one decoder layer's forward+backward for `tokens` tokens (sdpa/flash attention), its MLP's
    [tokens, intermediate] tensors for `mlp_tokens` of them at a time (a tiled MLP's tile; all by default)."""
    d = ctx.dims
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    per_token = 4 * d.hidden + 2 * q + 2 * kv  # norms, qkv, attn out
    mlp = 4 * d.intermediate  # gate / up / act / down in
    lora = 7 * ctx.lora_r * ctx.dtype_bytes  # LoRA intermediates, in the compute dtype (policy.lora_autocast)
    mlp_tokens = tokens if mlp_tokens is None else min(tokens, mlp_tokens)
    return tokens * (per_token * ctx.dtype_bytes + lora) + mlp_tokens * mlp * ctx.dtype_bytes


def dequant_scratch(ctx: Context, k: dict | None = None) -> int:
    """bitsandbytes dequantises the largest weight for each matmul (twice in backward); none where the trainer's
    linears are views of the bf16 mirror (no 4-bit weight left to dequantise)."""
    if not ctx.quantized or (k or {}).get("trainer_linears") == "views":
        return 0
    return 2 * max(o * i for o, i in ctx.dims.linears().values()) * ctx.dtype_bytes


def offload_host_bytes(ctx: Context, k: dict) -> int:
    """Pinned host memory for the offloaded checkpoints of one micro-batch: every layer's input, [tokens, hidden]."""
    if not k.get("activation_offload"):
        return 0
    return ctx.dims.layers * k["micro_batch_tokens"] * ctx.dims.hidden * ctx.dtype_bytes


def in_graph_applies(c: dict) -> bool:
    """The checkpoint can go inside the compiled layers: checkpointing, without offload or the tiled MLP (which bring
    their own checkpoint). `c`: a candidate, or plan.plan_knobs(plan)."""
    return bool(c["gradient_checkpointing"] and not c["activation_offload"] and not c["mlp_tile_tokens"])


def in_graph_bytes(ctx: Context, k: dict) -> int:
    """What the checkpoint inside the compiled layers keeps beyond HF's (CKPT_IN_GRAPH_BYTES): the 4-bit matmuls'
    outputs of every layer for the micro-batch; none under the views (plain linears', recomputed) or where offload or
    the tiled MLP bring their own checkpoint (in_graph_applies)."""
    if not (ctx.cuda and k.get("checkpoint_in_graph") and in_graph_applies(k)
            and k.get("trainer_linears", "nf4") != "views" and not k.get("checkpoint_recompute_all")):
        return 0  # (checkpoint_recompute_all: the matmuls recomputed too, HF's checkpoint's bytes; by design)
    d = ctx.dims
    return int(CKPT_IN_GRAPH_BYTES * d.layers * k["micro_batch_tokens"] * (d.hidden + d.intermediate))


def attention_mask_bytes(ctx: Context, k: dict) -> int:
    """The [rows, 1, T, T] boolean mask HF builds for sdpa when a micro-batch holds padding: rows x T <= the
    micro-batch's tokens, so at most tokens x the longest row. None is built for a micro-batch of one sequence
    (trimmed, so unpadded): sdpa then runs its causal kernels, linear in memory (tests/test_long_context.py); where
    CUDA graphs replay, padded to the longest length (trainer/graph_lengths.py), it has one."""
    if k.get("micro_batch_seqs") == 1 and not k.get("train_cudagraphs"):
        return 0
    return k["micro_batch_tokens"] * ctx.max_len


def train_phase(ctx: Context, k: dict) -> dict[str, int]:
    d, t = ctx.dims, k["micro_batch_tokens"]
    mlp_t = min(t, k.get("mlp_tile_tokens") or t)  # a tiled MLP (trainer/tiled_mlp.py) holds one tile's
    per_layer = t * CKPT_BYTES_PER_LH * d.hidden + mlp_t * CKPT_BYTES_PER_LI * d.intermediate
    if k.get("activation_offload") and k["gradient_checkpointing"]:
        # resident checkpoints + the one layer being recomputed, with its gradient buffers (the rest is on the host), + the
        # fp32 copy of the last hidden states that HF's final RMSNorm (eager: only the layers are compiled) keeps for
        # the backward, [tokens, hidden] x 4 bytes: 1.07 GB for the 8B at 65,536 tokens
        acts = (int(min(d.layers, OFFLOAD_RESIDENT_LAYERS) * per_layer) + layer_activation_bytes(ctx, t, mlp_t)
                + t * d.hidden * 4 + OFFLOAD_BACKWARD_BYTES_PER_TH * t * d.hidden)
    elif k["gradient_checkpointing"] and ctx.cuda:
        acts = int(d.layers * per_layer) + in_graph_bytes(ctx, k)
    elif k["gradient_checkpointing"]:
        acts = d.layers * t * d.hidden * ctx.dtype_bytes + layer_activation_bytes(ctx, t, mlp_t)
    elif ctx.cuda:
        acts = int(NO_CKPT_FIT * d.layers * layer_activation_bytes(ctx, t))
    else:
        acts = d.layers * layer_activation_bytes(ctx, t)
    # One [rows, vocab_chunk] logits tile at a time; rows = completion tokens of the call, at most token_chunk.
    # TRL's CPU fold makes ~16 tile-sized temporaries; the CUDA kernel folds in place.
    rows = min(k["token_chunk"], max(1, t * ctx.completion_len // ctx.max_len))
    tile = rows * k["vocab_chunk"] * max(ctx.dtype_bytes, 2) * (1 if ctx.cuda else 16)
    logits = tile + rows * d.hidden * 4
    batch = ctx.gen * ctx.max_len * 8 * 6  # ids, masks and logprob tensors of the step on the device
    out = {"activations": acts + dequant_scratch(ctx, k), "logits": logits, "batch_tensors": batch,
           "attention_mask": attention_mask_bytes(ctx, k)}
    if k.get("sync") == "merge":  # the sync at the phase's end adds the adapter to the mirror in fp32 row blocks
        out["lora_merge"] = min(LORA_MERGE_BLOCK_BYTES, 4 * d.hidden * d.intermediate)
    if fp32_logits(ctx, k):
        # policy.completion_logprobs in fp32: the tile doubles, TRL's kernel casts each [vocab_chunk, hidden] slice of
        # lm_head to fp32, and the micro-batch's completion hidden states are held in fp32 for the backward.
        completion_tokens = t * ctx.completion_len // ctx.max_len
        out["logits_fp32"] = tile + k["vocab_chunk"] * d.hidden * 4 + completion_tokens * d.hidden * 2
    return out


# rollout.sync merge (trainer/sync.py MergedSync): the fp32 rows of scaling x B @ A + the base that one block holds
# before it is rounded into vLLM's weight; a projection's whole fp32 copy where it is smaller
LORA_MERGE_BLOCK_BYTES = 64 * 2**20


def fp32_logits(ctx: Context, k: dict) -> bool:
    """rollout.logits_dtype float32 costs memory only where the compute dtype is narrower (not on the CPU's fp32)."""
    return k.get("logits_dtype", "model") == "float32" and ctx.dtype_bytes < 4


def rollout_phase(ctx: Context, k: dict) -> dict[str, int]:
    d = ctx.dims
    if ctx.engine == "vllm":
        t = k["max_num_batched_tokens"]
        acts = t * (2 * d.hidden + (d.heads + 2 * d.kv_heads) * d.head_dim + 3 * d.intermediate) * 2
        sampler = k["max_num_seqs"] * d.vocab * 4 * 3  # fp32 logits, probs, logprobs of one decode step
        out = {"vllm_activations": acts + sampler}
        if fp32_logits(ctx, k):  # the lm_head writes [max_num_seqs, vocab] in fp32, not bf16 (vllm_internals)
            out["vllm_logits_fp32"] = k["max_num_seqs"] * d.vocab * (4 - ctx.dtype_bytes)
        return out
    # HF generate: a DynamicCache for the batch (the static cache of a compiled decode step is held all run: static)
    # plus a few fp32 [batch, vocab] score tensors per step
    bs = k["hf_batch_size"]
    cache = 0 if k.get("hf_compiled_decode") else hf_cache_bytes(ctx, bs)
    step = bs * d.vocab * 4 * 4 + layer_activation_bytes(ctx, bs * ctx.prompt_len) + dequant_scratch(ctx)
    return {"hf_kv_cache": cache, "hf_generate": step}


def hf_cache_bytes(ctx: Context, batch: int) -> int:
    return batch * ctx.max_len * ctx.dims.kv_bytes_per_token(ctx.dtype_bytes)


def components(ctx: Context, k: dict) -> tuple[dict[str, int], dict[str, int]]:
    """All components in bytes, and the peak of each phase."""
    d = ctx.dims
    vllm = ctx.engine == "vllm"
    lora = d.lora_params(ctx.lora_r, ctx.lora_targets)
    states = 4 + 4 + (2 if ctx.optim == "adamw_8bit" else 8)  # fp32 param, grad, Adam moments
    static = {"cuda_context": CUDA_CONTEXT if ctx.cuda else 0,
              "base_weights": base_bytes(ctx, vllm_layout=vllm),
              "lora_and_optimizer": lora * states}
    if ctx.cuda and ctx.world_size > 1:
        static["distributed"] = distributed_bytes(ctx.world_size)
    if ctx.cuda and k.get("train_cudagraphs"):  # the cudagraph trees' private pool, held through both phases
        static["train_cuda_graphs"] = int(TRAIN_GRAPH_POOL_BYTES * d.layers * k["micro_batch_tokens"] * d.hidden)
    if ctx.cuda and not vllm:
        static["hf_non_torch"] = HF_NON_TORCH
    if not vllm and k.get("hf_compiled_decode"):  # rollout/hf.py: one cache, one captured decode graph, all run
        static["hf_static_cache"] = hf_cache_bytes(ctx, k["hf_batch_size"])
        if ctx.cuda:  # the graph's pool: its [batch, vocab] logits and scores (an estimate; not measured yet)
            static["hf_cuda_graphs"] = GRAPH_BASE + GRAPH_PER_SIZE + k["hf_batch_size"] * d.vocab * 4 * 2
    if vllm:
        static["vllm_non_torch"] = VLLM_NON_TORCH
        if k.get("sync") != "merge":  # merged into the bf16 mirror instead: vLLM runs without LoRA slots
            static["vllm_lora_slots"] = lora * 2
        static["cuda_graphs"] = 0 if k["enforce_eager"] else GRAPH_BASE + GRAPH_PER_SIZE * len(
            k["cudagraph_capture_sizes"])
        if k["weight_format"] == "bf16_mirror":
            static["bf16_mirror"] = d.linear_params * 2
    kv = {"vllm_kv_cache": k["kv_cache_memory_bytes"]} if vllm else {}
    roll, train = rollout_phase(ctx, k), train_phase(ctx, k)
    comps = {**static, **kv, **roll, **train}
    base = sum(static.values())
    share = EXPANDABLE_SLACK if k.get("expandable_segments") else 1.0
    slack = lambda dyn: int(share * (SLACK_FIXED + SLACK_FRACTION * dyn)) if ctx.cuda else 0  # noqa: E731
    kv_held = sum(kv.values())  # one allocation at engine start, no slack of its own (see SLACK_FRACTION)
    roll_dyn, train_dyn = sum(roll.values()), sum(train.values())
    # the in-graph checkpoint's outputs are the micro-batch's largest tensors, whole [tokens, width] blocks a layer: no
    # slack on them (IN_GRAPH_SLACK)
    train_slack = slack(train_dyn - in_graph_bytes(ctx, k) * (1 - IN_GRAPH_SLACK))
    # The trainer's linears as views of the bf16 mirror (trainer_linears "views", sync.view_mirror_linears): its own
    # copy of them is let go once vLLM has started on the mirror, so the train phase holds the mirror alone. The rollout
    # phase keeps both, as the engine's start-up does (KV pool, profiling run and graph capture before the views),
    # unless the nf4 waits in host memory through that start-up (park_base, sync.park_linears).
    let_go = linear_base_bytes(ctx, vllm_layout=vllm) if k.get("trainer_linears") == "views" else 0
    phases = {"rollout": base - (let_go if k.get("park_base") else 0) + kv_held + roll_dyn + slack(roll_dyn),
              "train": base - let_go + (0 if k["kv_release"] else kv_held) + train_dyn + train_slack}
    comps["allocator_slack"] = max(slack(roll_dyn), train_slack)
    return comps, phases
