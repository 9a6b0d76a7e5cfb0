"""Tiled MLP for long sequences: each decoder layer's MLP runs over the sequence in tiles of plan.mlp_tile_tokens
tokens, and its backward recomputes it tile by tile, so the MLP's [tokens, intermediate] tensors (gate, up, their
product, their gradients) exist for one tile at a time instead of the whole sequence.

Why: at 60,928 tokens one Llama-3.1-8B MLP holds [60,928, 14,336] tensors of 1.75 GB each in bf16, four of them saved
for the backward and about three more as gradients: most of a layer's ~12 GB, the part of a 24 GB long-context run
the offloaded checkpoints cannot move. The MLP is position-wise, so a tile's outputs and gradients are the untiled
ones' (tests/test_long_context.py), for one more MLP forward per layer in the backward (trainer/cost.py charges it).
Arctic Long Sequence Training's TiledMLP and Unsloth's tiled MLP do the same.
It decides nothing: the plan turns it on (memory.py prices one tile) only for one-sequence micro-batches that need it,
or the budget loop between steps (a runtime knob, as offload is).
A reentrant function like trainer/offload.py's checkpoint: the tiles' recompute runs inside the backward, replays the
forward's RNG (LoRA dropout draws) and autocast (offload.ForwardState), and accumulates the LoRA gradients itself.
Dynamo does not trace it (a backward that calls autograd): the compiled layer runs it between two graphs.
"""
from __future__ import annotations

from functools import partial

import torch

from trainer.offload import ForwardState


def _by_tile(fn, x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """fn over x's tiles along the sequence (tile_tokens each, the last shorter), written into one output (no list of
    tiles and a cat: one copy less)."""
    out = None
    for i, xt in enumerate(x.split(tile_tokens, dim=-2)):
        yt = fn(xt)
        if out is None:
            out = yt.new_empty((*x.shape[:-1], yt.shape[-1]))
        out[..., i * tile_tokens:i * tile_tokens + xt.shape[-2], :] = yt
    return out


class TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp, tile_tokens: int, x: torch.Tensor):
        ctx.mlp, ctx.tile_tokens, ctx.state = mlp, tile_tokens, ForwardState(x)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _by_tile(mlp, x, tile_tokens)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        grads = iter(grad.split(ctx.tile_tokens, dim=-2))

        def tile_backward(xt):  # the tile's forward again, with grad, and its backward: the input's gradient
            xt = xt.detach().requires_grad_(True)
            torch.autograd.backward(ctx.mlp(xt), next(grads))
            return xt.grad

        with ctx.state.replay():  # the tiles draw, in order, what the forward's tiles drew
            return None, None, _by_tile(tile_backward, x, ctx.tile_tokens)


@torch._dynamo.disable
def tiled_forward(forward, tile_tokens: int, x: torch.Tensor) -> torch.Tensor:
    """The MLP module's forward: tiled for sequences longer than one tile, as before otherwise (decode, short ones)."""
    if x.shape[-2] <= tile_tokens:
        return forward(x)
    if not torch.is_grad_enabled():  # reference / old-policy passes: tiles, nothing kept
        return _by_tile(forward, x, tile_tokens)
    if not x.requires_grad:  # the LoRA weights inside still need their gradients
        x = x.detach().requires_grad_(True)
    return TiledMLP.apply(forward, tile_tokens, x)


def install(model: torch.nn.Module, tile_tokens: int) -> int:
    """Tile the MLP of every decoder layer of `model` (tile_tokens 0: untiled again; the budget loop turns tiles on
    or off between steps); returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        mlp = layer.mlp
        untiled = mlp.__dict__.get("_untiled_forward") or mlp.forward
        mlp._untiled_forward = untiled
        mlp.forward = partial(tiled_forward, untiled, tile_tokens) if tile_tokens else untiled
    return len(layers)
