"""With rollout.sync merge, the trainer's adapted linear layers compute with the very rows vLLM samples from (base +
adapter, rounded once into its bf16 mirror by sync.MergedSync) while their gradients reach the LoRA factors as peft's.

Merging alone widened the sampler/trainer logprob gap by 26-31% on an H100 (2026-12-05, docs/benchmarks.md): vLLM
multiplied round(W + s·B·A) and the trainer W + s·B·A in two terms. Here the trainer's forward is F.linear(x, merged
rows), the function vLLM computes; the backward is the exact gradient of x·(W + s·B·A)ᵀ in A and B (the LoRA branch's,
in the adapter's dtype, or the compute dtype under the trainer's LoRA autocast, as peft's) and the merged rows' product
for x. Installed wherever rollout.sync is merge (auto's choice on the bf16 mirror since 2026-12-05: 0.733x / 0.763x the
slots' step on an H100, the gap 2-4% below theirs), unless TRAINER_MIRROR_VIEWS=0 or LoRA dropout (which acts on the
adapter's branch alone, trainer/plan.py merged_rows_refusal); every optimizer step is followed by a merge, so each
forward sees the adapter it trains. The reference pass (peft's adapter disabled) keeps the trainer's nf4 path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _MergedLoRA(torch.autograd.Function):
    """y = x·Wmᵀ + bias, Wm = round(W + s·B·A); dA, dB as of y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ; dx = g·Wm.

    dA and dB are computed as peft's branch computes them where it runs: under the trainer's LoRA autocast
    (trainer/policy.py lora_autocast) in the compute dtype, with the scaling applied to the branch's output gradient
    first (peft's `lora_B(lora_A(x)) * scaling`); outside autocast in the adapter's dtype. (In the adapter's fp32 under
    autocast they would also cost an fp32 copy of x and of the output gradient per layer in the backward: 1.2 GB for
    a 7B down projection at 8,192 tokens, which the plan does not count.)"""

    @staticmethod
    def forward(ctx, x, merged, bias, lora_a, lora_b, scaling: float):
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scaling = scaling
        autocast = torch.is_autocast_enabled(x.device.type)
        ctx.lora_dtype = torch.get_autocast_dtype(x.device.type) if autocast else lora_a.dtype
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, grad):
        x, merged, a, b = ctx.saved_tensors
        gx = grad @ merged if ctx.needs_input_grad[0] else None
        dt = ctx.lora_dtype
        gs = grad.reshape(-1, grad.shape[-1]).to(dt) * ctx.scaling  # the branch's output gradient, scaled as peft's
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        a2, b2 = a.to(dt), b.to(dt)
        ga = gb = None
        if ctx.needs_input_grad[4]:
            gb = (gs.t() @ (x2 @ a2.t())).to(b.dtype)
        if ctx.needs_input_grad[3]:
            ga = ((gs @ b2).t() @ x2).to(a.dtype)
        return gx, None, None, ga, gb, None


class MergedRowsLoRA:
    """Mixed into a peft LoRA linear layer (its class swapped in place): the merged-rows forward while the layer's one
    adapter is active, peft's own forward otherwise (adapter disabled for the reference, or several adapters)."""

    merged_rows: torch.Tensor

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.active_adapters
        if (self.disable_adapters or self.merged or args or kwargs or len(names) != 1 or names[0] not in self.lora_A
                or names[0] in self.lora_variant):
            return super().forward(x, *args, **kwargs)
        name = names[0]
        base = self.get_base_layer()
        return _MergedLoRA.apply(x, self.merged_rows, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                 self.scaling[name])


_CLASSES: dict[type, type] = {}


def install(layers: list[tuple[torch.nn.Module, torch.Tensor]]) -> int:
    """(peft LoRA layer, its merged rows in vLLM's mirror) pairs: each layer computes with its rows from now on.
    Returns how many layers were switched."""
    for layer, rows in layers:
        cls = type(layer)
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"MergedRows{cls.__name__}", (MergedRowsLoRA, cls), {})
        layer.__class__ = _CLASSES[cls]
        layer.merged_rows = rows
    return len(layers)

