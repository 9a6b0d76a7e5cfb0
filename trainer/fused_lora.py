"""One autograd node per LoRA-wrapped 4-bit linear, where peft's forward builds about eight (clone, casts to the
adapter's fp32, two matmuls, scale, cast back, add), so the train phase launches a fraction of the ops.

The train phase is launch-bound at small micro-batches (bench/results/small_point_probe.json: ~0.35 s of eager
overhead per micro-batch, whatever its size). Here the forward is the base layer's own bitsandbytes call plus
y += scaling * (x A^T) B^T with the adapter cast to the compute dtype (as vLLM applies it); the backward is
bitsandbytes' (dequantize, one matmul) plus the four LoRA matmuls. Layers with dropout, DoRA or other variants,
several active adapters or a disabled/merged adapter keep peft's forward, decided per call.
"""
from __future__ import annotations

import types

import torch


class _LoraLinear4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, layer, scaling):
        y = layer.base_layer(x)  # bitsandbytes' forward; no autograd node inside a Function's forward
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()
        y2 = y.reshape(-1, y.shape[-1])
        if y2.dtype != x.dtype:
            y2 = y2.to(x.dtype)
        out = torch.addmm(y2, xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.layer, ctx.scaling, ctx.x_shape = layer, scaling, x.shape
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*x.shape[:-1], -1).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        import bitsandbytes.functional as F

        x2, xa, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gxa = (g @ b).mul_(ctx.scaling)  # d(loss)/d(xA^T), [tokens, r]
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_a = (gxa.t() @ x2).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ xa).mul_(ctx.scaling).to(ctx.dtypes[1])
        if ctx.needs_input_grad[0]:
            w = ctx.layer.base_layer.weight
            dense = F.dequantize_4bit(w.view(-1, 1), w.quant_state).to(g.dtype)
            grad_x = torch.addmm(g @ dense, gxa, a).view(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = [n for n in self.active_adapters if n in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1 or names[0] in self.lora_variant
            or not isinstance(self.lora_dropout[names[0]], torch.nn.Identity) or torch.is_autocast_enabled()):
        return self._peft_forward(x, *args, **kwargs)
    n = names[0]
    return _LoraLinear4bit.apply(x, self.lora_A[n].weight, self.lora_B[n].weight, self, float(self.scaling[n]))


def install(model: torch.nn.Module) -> int:
    """Give every peft LoRA layer over a bitsandbytes 4-bit linear the fused forward; returns how many."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # peft without bitsandbytes support: nothing to fuse
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
