"""Dynamic loss scaling for float16 compute (a T4): the loss is multiplied by a power of two before the backward, so
the gradients the float16 activations carry stay above float16's underflow, and divided out of the fp32 LoRA gradients
before clipping; an overflow skips the update and halves the scale, a run of finite steps doubles it.

The rule and its defaults are torch.amp.GradScaler's (init 2**16, x2 after 2000 finite steps, x0.5 on an overflow;
tests/test_loss_scale.py holds the two to the same sequence of scales). GradScaler would do the same arithmetic; it is
not used so that one check decides a skipped step, the one the step already had (a non-finite norm at the clip, after
the sum over ranks), where GradScaler keeps its own found-inf per optimizer and skips inside its step(); the state
is a scale and a counter, written to each checkpoint's state.json.

Why (bench/fp16_grad.py on the CPU, 2026-12-05): the GRPO loss weighs each token by 1/tokens,
so the gradient entering the float16 backward shrinks with the batch; with vocab 151,936, hidden 256, 32 x 256
completion tokens, the LoRA gradient under float16 autocast was 1.9% off the float32 one unscaled and 0.11% off
with the scale; at 64 x 512 tokens 8.4% unscaled, 0.12% scaled (bench/results/fp16_grad/).
"""
from __future__ import annotations

import torch

INIT, GROWTH, BACKOFF, INTERVAL = 2.0 ** 16, 2.0, 0.5, 2000  # torch.amp.GradScaler's defaults


class LossScale:
    def __init__(self, enabled: bool, init: float = INIT, growth_interval: int = INTERVAL):
        self.enabled, self.scale, self.interval, self.good_steps = enabled, float(init), growth_interval, 0
        self.overflowed = False  # the last update's: a non-finite gradient at a scale above 1

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale if self.enabled else loss).backward()

    def unscale(self, params) -> None:
        """Divide the scale out of the gradients (a power of two: exact), before their norm is taken."""
        if self.enabled:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        """After the step's norm: grow or back off. A non-finite gradient at a scale above 1 is an overflow (the
        scale, not the model, made it so): the update was skipped, the scale halves and the run goes on."""
        if not self.enabled:
            return
        self.overflowed = not finite and self.scale > 1.0
        if finite:
            self.good_steps += 1
            if self.good_steps == self.interval:
                self.scale, self.good_steps = self.scale * GROWTH, 0
        else:
            self.scale, self.good_steps = self.scale * BACKOFF, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict | None) -> None:
        if state and self.enabled:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
