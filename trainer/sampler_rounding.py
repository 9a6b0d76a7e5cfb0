"""The trainer's decoder rounds to bf16 where vLLM 0.26's CUDA kernels round, so that the sampler/trainer log-prob gap
keeps only what the kernels' reduction orders make (issue 27).

Read from transformers 5.17's Qwen2/Llama code and vLLM 0.26.0's own sm_90 machine code (2026-12-05; the table is
in docs/benchmarks.md, "Sampler/trainer fidelity"), three places round differently with the same weights:
- RMSNorm (two a layer and the final one): HF rounds x * rsqrt(mean(x^2) + eps) to bf16 and then multiplies by the
  weight in bf16, two roundings; vLLM's rms_norm / fused_add_rms_norm multiply by the weight in fp32 and round once.
  (The residual add is one bf16 rounding on both sides.)
- rotary: HF applies q * cos + rotate_half(q) * sin as three bf16 ops; vLLM's rotary kernel computes it in fp32 from
  the same bf16 cos/sin and rounds once.
- the q/k/v bias on the shared nf4 base: bitsandbytes adds it in the GEMM's epilogue (one rounding); vLLM's 4-bit
  layer rounds the product and adds the bias in bf16 (vLLM's bf16 mirror fuses it, as HF does: left alone there).
SiLU * up, the LoRA branch (alpha / r a power of two, vLLM folds the scale into B), the lm_head and the fp32
log-softmax already round alike. What this does not touch is the kernels themselves (cuBLAS against bitsandbytes'
and our 4-bit GEMMs, SDPA against FlashAttention 3): vLLM scoring its own samples in one prefill disagrees with its
decode by 0.020 / 0.045 (1.5B / 7B, H100), which bounds what matching rounding points can remove.
This matches vLLM's custom CUDA ops, which it runs without `rollout.compile` (the default); compiled, vLLM runs its
torch-native versions (HF's roundings, and the norm over the unrounded residual sum).

install(model, bias=...) patches a model in place (before LoRA wraps its layers and before they compile, or on
uncompiled layers); remove(model) undoes it. The plan turns it on where the trainer computes on vLLM's bf16 mirror
(Plan.sampler_rounding; TRAINER_SAMPLER_ROUNDING=0/1 overrides, trainer/policy.py): on H100s (2026-12-06/07) it removed
7-23% of the gap (the most on the 7B shape), at no step cost above the runs' noise on the mirror's rows and 6-8% a step
on the trainer's nf4 (plan.SAMPLER_ROUNDING_LINEARS).
"""
from __future__ import annotations

import sys
import types

import torch


def rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """vLLM's rms_norm: (x * rsqrt(mean(x^2) + eps)) * weight in fp32, one rounding to the input's dtype."""
    x = hidden_states.float()
    variance = x.pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + self.variance_epsilon) * self.weight.float()).to(hidden_states.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """vLLM's rotary kernel: q * cos + rotate_half(q) * sin in fp32 from the bf16 cos/sin, one rounding."""
    cos, sin = cos.unsqueeze(unsqueeze_dim).float(), sin.unsqueeze(unsqueeze_dim).float()
    q32, k32 = q.float(), k.float()
    return ((q32 * cos + rotate_half(q32) * sin).to(q.dtype), (k32 * cos + rotate_half(k32) * sin).to(k.dtype))


def _add_bias(module, args, out):
    return out + module._sampler_bias.to(out.dtype)


def _modeling_modules(model: torch.nn.Module) -> list:
    """The modeling modules (transformers.models.<arch>.modeling_<arch>) whose attention calls apply_rotary_pos_emb."""
    mods = {type(m).__module__ for m in model.modules()}
    return [sys.modules[n] for n in sorted(mods) if n.startswith("transformers.models.")
            and hasattr(sys.modules[n], "apply_rotary_pos_emb")]


def install(model: torch.nn.Module, bias: bool) -> int:
    """Patch `model` (an HF causal LM, before peft wraps it, or a peft model): its RMSNorms, its modeling module's
    rotary, and with `bias` (the shared nf4 base) the bias of every 4-bit linear layer that has one, added after the
    product's rounding. Returns how many modules and functions were patched."""
    import bitsandbytes as bnb

    count = 0
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and "forward" not in m.__dict__:
            m.forward = types.MethodType(rms_norm, m)
            count += 1
        elif bias and isinstance(m, bnb.nn.Linear4bit) and m.bias is not None:
            m.__dict__["_sampler_bias"] = m.bias  # a plain attribute: not registered as a second parameter
            m.bias = None
            m._sampler_hook = m.register_forward_hook(_add_bias)
            count += 1
    for mod in _modeling_modules(model):
        if not hasattr(mod, "_hf_apply_rotary_pos_emb"):
            mod._hf_apply_rotary_pos_emb = mod.apply_rotary_pos_emb
            mod.apply_rotary_pos_emb = apply_rotary_pos_emb
            count += 1
    return count


def remove(model: torch.nn.Module) -> None:
    for m in model.modules():
        if m.__dict__.get("forward") is not None and getattr(m.forward, "__func__", None) is rms_norm:
            del m.forward
        if "_sampler_hook" in m.__dict__:
            m._sampler_hook.remove()
            m.bias = m.__dict__.pop("_sampler_bias")
            del m._sampler_hook
    for mod in _modeling_modules(model):
        if hasattr(mod, "_hf_apply_rotary_pos_emb"):
            mod.apply_rotary_pos_emb = mod._hf_apply_rotary_pos_emb
            del mod._hf_apply_rotary_pos_emb
