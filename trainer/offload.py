"""Activation offload: under gradient checkpointing, each decoder layer's input (its checkpoint) goes to pinned host
memory as the forward passes the layer, and comes back, one layer ahead, for the backward's recompute. The device
then holds about two layers' checkpoints instead of all of them (memory.OFFLOAD_RESIDENT_LAYERS). It decides nothing:
the Plan says whether (plan.activation_offload), and the host bytes it takes were checked before anything loaded.

How: HF's GradientCheckpointingLayer calls `layer._gradient_checkpointing_func(partial(layer_call, **kwargs), hidden)`;
we put `OffloadedCheckpoint` there. It is a reentrant checkpoint (the layer runs without grad in the forward, again
with grad in the backward, whose inner `autograd.backward` accumulates the LoRA gradients), as Unsloth's offloaded
checkpointing is. Not `torch.autograd.graph.save_on_cpu`: with the non-reentrant checkpoint HF uses the layer input
is held by the checkpoint's closure, not saved through the saved-tensor hooks, so it would stay on the device, and
around the whole forward the hooks would also copy the lm_head weight and the logits tiles to the host.
Copies run on a side CUDA stream (device -> host after each layer's forward; host -> device of layer i-1 while layer
i recomputes); on the CPU the "host copy" is the tensor itself, so the same code runs in the CPU tests.
Passes without grad (the reference and old-log-prob passes) run the layer directly: nothing is kept for them.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch


class _Handle:
    """One layer input on the host, and its way back."""

    def __init__(self, host: torch.Tensor, device: torch.device, ready, prev: "_Handle | None"):
        self.host, self.device, self.ready, self.prev = host, device, ready, prev
        self.back: torch.Tensor | None = None  # the device copy, once fetched
        self.back_ready = None


class Offloader:
    """Per model: the side stream and the chain of handles of the forward in progress."""

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None
        self.last: _Handle | None = None

    def put(self, x: torch.Tensor, first: bool) -> _Handle:
        prev = None if first else self.last
        if not x.is_cuda:
            h = _Handle(x.detach(), x.device, None, prev)
        else:
            if self.stream is None:
                self.stream = torch.cuda.Stream(x.device)
            host = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(self.stream):
                host.copy_(x, non_blocking=True)
                ready = self.stream.record_event()
            x.record_stream(self.stream)  # its memory is not reused before the copy is done
            h = _Handle(host, x.device, ready, prev)
        self.last = h
        return h

    def prefetch(self, h: _Handle | None) -> None:
        if h is None or h.back is not None or h.host is None:
            return
        if h.device.type != "cuda":
            h.back = h.host
            return
        current = torch.cuda.current_stream(h.device)
        back = torch.empty(h.host.shape, dtype=h.host.dtype, device=h.device)  # allocated on the compute stream
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(h.ready)
            back.copy_(h.host, non_blocking=True)
            h.back_ready = self.stream.record_event()
        h.back = back

    def take(self, h: _Handle) -> torch.Tensor:
        """The layer input back on the device (waiting for its copy), and the previous layer's on its way."""
        self.prefetch(h)
        if h.back_ready is not None:
            torch.cuda.current_stream(h.device).wait_event(h.back_ready)
        x, h.back, h.host = h.back, None, None  # the pinned block returns to torch's host cache
        self.prefetch(h.prev)
        return x


class ForwardState:
    """What a recompute inside the backward replays of its forward, as torch's checkpoint does: the RNG (LoRA dropout
    draws) and autocast (policy.lora_autocast). Taken in the forward of the offloaded checkpoint and of the tiled MLP
    (trainer/tiled_mlp.py)."""

    def __init__(self, x: torch.Tensor):
        dev = x.device.type
        self.device = x.device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        self.autocast = dict(device_type=dev, enabled=torch.is_autocast_enabled(dev), dtype=torch.get_autocast_dtype(dev))

    @contextlib.contextmanager
    def replay(self):
        """Grad on, the forward's autocast and RNG state; the caller's RNG state is back after."""
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(**self.autocast):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            yield


class OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offloader: Offloader, first: bool, hidden: torch.Tensor):
        ctx.run, ctx.offloader, ctx.state = run, offloader, ForwardState(hidden)
        ctx.handle = offloader.put(hidden, first)
        with torch.no_grad():
            out = run(hidden)
        if not isinstance(out, torch.Tensor):
            raise RuntimeError(f"activation offload expects a decoder layer that returns a tensor, got {type(out)}")
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden = ctx.offloader.take(ctx.handle).detach().requires_grad_(True)
        ctx.handle = None
        with ctx.state.replay():  # dropout in the recompute draws what the forward drew
            out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return None, None, None, hidden.grad


def offloaded_checkpoint(offloader: Offloader, first: bool, run, hidden: torch.Tensor, *rest):
    """The layer call, checkpointed with its input offloaded (HF's `_gradient_checkpointing_func` signature)."""
    if rest:
        raise RuntimeError("activation offload expects the decoder layer's hidden states as its only positional input")
    if not torch.is_grad_enabled():
        return run(hidden)
    if not hidden.requires_grad:  # the first layer's input (frozen embeddings): make the layer's output need grad
        hidden = hidden.detach().requires_grad_(True)
    return OffloadedCheckpoint.apply(run, offloader, first, hidden)


def install(model: torch.nn.Module) -> int:
    """Route every checkpointed decoder layer of `model` (checkpointing already enabled) through the offload; returns
    how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    offloader = Offloader()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer._gradient_checkpointing_func = partial(offloaded_checkpoint, offloader, i == 0)
    return len(layers)
