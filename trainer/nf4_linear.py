"""The policy's nf4 base layers as plain torch ops that torch.compile traces into a compiled decoder layer's graph:
exactly bitsandbytes' dequantised weight and matmul, without its custom ops and Params4bit subclass in the graph.

Why: on the H200 a compiled layer's bitsandbytes calls are opaque custom ops whose Python implementations run on
every call (`bitsandbytes::gemm_4bit`: ~107 us of host time each, 3,332 calls in one 2.1 s train phase of eight
286-token micro-batches; docs/benchmarks.md, 2026-12-04), and the Params4bit parameters go through AOTAutograd's
tensor-subclass wrappers. Traced, the dequantisation is one inductor kernel and the matmul one cuBLAS call, both
launched from the compiled graph. Off by default (trainer/policy.py NF4_TRACED): on the H200 (2026-12-05) it took the
train phase of eight 286-token micro-batches from 1.46 to 1.31 s, measured on top of the checkpoint in graph only.

Values: bitsandbytes' nf4 dequantisation is one fp32 multiply (level x block absmax) rounded to the compute dtype,
so the same ops here give the same bits (tests/test_nf4_linear.py holds forward and gradients equal to
bitsandbytes'). A double-quantised absmax is dequantised by bitsandbytes' own op (`dequantize_blockwise` + offset):
written as torch ops, inductor may contract its multiply-add into one FMA and round differently.

Memory: as bitsandbytes' MatMul4Bit, the backward dequantises the weight again and nothing but the packed inputs is
kept for it. The backward spells the same dequantisation differently on purpose: spelled alike, AOTAutograd merges
the two (CSE) and its partitioner keeps the forward's bf16 weight for the backward (it does not recompute a tensor
the backward must materialise), 2 bytes a parameter per layer, a bf16 copy of the whole base without checkpointing.
"""
from __future__ import annotations

import bitsandbytes as bnb
import torch
import torch.nn.functional as F

from trainer.kernels import standard_nf4  # bitsandbytes' levels; modules with others (fp4) keep its forward


def _absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize: int):
    """The fp32 absmax of each 64-element block (bitsandbytes' double quantisation undone by its own op)."""
    if nested_absmax is None:
        return absmax
    return torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, nested_absmax, nested_code, nested_blocksize,
                                                               torch.float32) + offset


def _weight_forward(packed, absmax, code, shape, blocksize: int, dtype):
    """[N, K] in `dtype`: element 2j of the flat weight in byte j's high nibble, 2j + 1 in its low one. Both nibbles
    come from one broadcast shift of the bytes (a [bytes, 2] pointwise op that inductor fuses into the dequantising
    kernel; torch.stack of the two nibbles made it write them to a buffer of a byte a weight first, in a second
    kernel)."""
    shift = 4 - 4 * torch.arange(2, device=packed.device, dtype=torch.uint8)  # [4, 0]: high nibble first
    codes = ((packed.view(-1, 1) >> shift) & 15).view(-1, blocksize).long()
    return (code[codes] * absmax.view(-1, 1)).to(dtype).view(shape)


def _weight_backward(packed, absmax, code, shape, blocksize: int, dtype):
    """The same values as _weight_forward, spelled otherwise so AOTAutograd cannot merge them (module docstring)."""
    divisor = 16 - 15 * torch.arange(2, device=packed.device)  # [16, 1]
    codes = packed.view(-1, 1).div(divisor, rounding_mode="floor").remainder(16).view(-1, blocksize)
    return (absmax.view(-1, 1) * code[codes.long()]).to(dtype).view(shape)


class _Nf4Linear(torch.autograd.Function):
    """x @ dequant(W).T + bias; the gradient reaches x only (the base is frozen, its bias too)."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
                nested_blocksize):
        ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
        ctx.shape, ctx.blocksize, ctx.nested_blocksize = shape, blocksize, nested_blocksize
        amax = _absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
        return F.linear(x, _weight_forward(packed, amax, code, shape, blocksize, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        packed, absmax, code, nested_absmax, nested_code, offset = ctx.saved_tensors
        amax = _absmax(absmax, nested_absmax, nested_code, offset, ctx.nested_blocksize)
        w = _weight_backward(packed, amax, code, ctx.shape, ctx.blocksize, grad.dtype)
        return (grad @ w,) + (None,) * 10


class TracedLinear4bit(bnb.nn.Linear4bit):
    """bitsandbytes' Linear4bit whose forward torch.compile traces (this module's docstring); made by `install`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = _Nf4Linear.apply(x, bias, self._nf4_packed, self._nf4_absmax, self._nf4_code, self._nf4_nested_absmax,
                               self._nf4_nested_code, self._nf4_offset, self._nf4_shape, self._nf4_blocksize,
                               self._nf4_nested_blocksize)
        return out.to(inp_dtype)


def eligible(module: torch.nn.Module) -> bool:
    """A bitsandbytes nf4 Linear4bit with the standard levels and whole blocks (every layer HF and vLLM quantise)."""
    if not isinstance(module, bnb.nn.Linear4bit):
        return False
    qs = getattr(module.weight, "quant_state", None)
    if qs is None or len(qs.shape) != 2 or (qs.shape[0] * qs.shape[1]) % qs.blocksize:
        return False
    if qs.nested and qs.state2.blocksize != 256:  # the only nested layout bitsandbytes' gemm_4bit takes either
        return False
    return standard_nf4(qs)


def install(model: torch.nn.Module) -> int:
    """Every eligible nf4 layer of `model` traced by torch.compile from now on (before the layers are compiled).
    Its packed bytes and quant state are registered as plain, non-persistent buffers that alias the weight (no copy,
    nothing new in the state dict). Returns how many layers changed."""
    n = 0
    for module in model.modules():
        if type(module) is TracedLinear4bit or not eligible(module):
            continue
        qs = module.weight.quant_state
        plain = torch.Tensor.as_subclass(module.weight.data, torch.Tensor).view(torch.uint8).reshape(-1)
        bufs = {"packed": plain, "absmax": qs.absmax, "code": qs.code.to(plain.device, torch.float32),
                "nested_absmax": qs.state2.absmax if qs.nested else None,
                "nested_code": qs.state2.code if qs.nested else None,
                "offset": qs.offset if qs.nested else None}
        for name, t in bufs.items():
            module.register_buffer(f"_nf4_{name}", t, persistent=False)
        module._nf4_shape = tuple(int(s) for s in qs.shape)
        module._nf4_blocksize, module._nf4_nested_blocksize = qs.blocksize, (qs.state2.blocksize if qs.nested else 0)
        module.__class__ = TracedLinear4bit
        n += 1
    return n
