"""Whether a float16 run's checkpoint fits float16's range: before the first step, the trainer's policy reads a few of
the recipe's own prompts in float16 and each decoder layer's largest activation is checked against 65,504.

Why: real checkpoints trained in bfloat16 can carry activations float16 cannot hold (Qwen2-family reports: QwenLM/Qwen3
issues 761, 826, 868 in HF's eager paths, vLLM issue 14126 in vLLM's). Random-init shapes never show it, and a run
that overflows samples "!!!!" completions and skips non-finite steps until train.max_nonfinite_steps stops it. Here
it stops at start-up, before any step, naming the layer and the dtype to use instead; where `model.dtype: auto` chose
float16 on a card with bfloat16, `train` starts itself again in bfloat16 (trainer/cli.py). The check costs a few
forwards of one prompt each, cut to its first 256 tokens (no padding, no cache, the compiled layers bypassed as in
generation): a 32k-token prompt's untiled MLP would not fit a long-context plan, 256 tokens of a 7B's take ~10 MB. It
runs only where the plan's compute dtype is float16.
"""
from __future__ import annotations

import math

import torch

from trainer.errors import UserError

FP16_MAX = 65504.0
PROMPTS = 4  # the dataset's first prompts: activation outliers sit at fixed positions (the first token, delimiters)
TOKENS = 256  # of each
HEADROOM = 4.0  # a largest activation within 4x of the range: a note, since longer inputs or training may cross it


class Float16Overflow(UserError):
    """The check's stop. `restart`: the overrides a run whose dtype `auto` chose starts again with (bfloat16, the
    same run otherwise), or None where the recipe named float16 or the card has no bfloat16 (float32 changes the
    engine and the memory plan: the user decides)."""

    def __init__(self, problem: str, fix: str, restart: list[str] | None, resume: str | None = None):
        super().__init__("model.dtype", problem, fix)
        self.restart, self.resume = restart, resume


def overflowed_in_training(run_dir) -> Float16Overflow | None:
    """After a run stopped on its non-finite steps: where auto chose float16 on a card with bfloat16 (the run's
    plan.json and recipe.json say), the stop as a Float16Overflow whose restart resumes the run in bfloat16 from its
    last checkpoint (`--resume auto`: from the start where none was written); else None. Float16's range is the
    likely cause where bfloat16 ran the same recipe; where it is not, the bfloat16 run stops the same way."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from trainer.plan import run_plan

    ran, recipe = run_plan(run_dir), Path(run_dir) / "recipe.json"
    if ran is None or not recipe.is_file():
        return None
    plan = SimpleNamespace(**ran)
    plan.device_capability = tuple(plan.device_capability or ()) or None  # a JSON list: fallback compares tuples
    restart = restart_in_bfloat16(plan, json.loads(recipe.read_text())["model"]["dtype"] == "auto")
    if plan.compute_dtype != "float16" or restart is None:
        return None
    return Float16Overflow("the run's steps turned non-finite in float16 (a forward past 65,504 gives this)",
                           f"set {fallback(plan)}", restart, resume="auto")


def has_bfloat16(plan) -> bool:
    """Whether the plan's card computes in bfloat16 (sm80 and later; no capability recorded: the CPU)."""
    return (plan.device_capability or (8, 0)) >= (8, 0)


def restart_in_bfloat16(plan, auto: bool) -> list[str] | None:
    """Float16Overflow.restart: the override `train` starts again with where the recipe left model.dtype to auto and
    the card has bfloat16, else None (the user's call)."""
    return ["model.dtype=bfloat16"] if auto and has_bfloat16(plan) else None


def fallback(plan) -> str:
    """The dtype a float16 run goes back to: bfloat16 where the card has it, else float32 (with the HF engine where the
    run used vLLM: its LoRA kernels take 16-bit activations only, and the plan refuses float32 with vLLM)."""
    if has_bfloat16(plan):
        return "model.dtype: bfloat16"
    return ("model.dtype: float32" + (" with rollout.engine: hf (vLLM's LoRA kernels take 16-bit only)"
                                      if plan.rollout_engine == "vllm" else "") + "; this card has no bfloat16")


def stop_hint(plan) -> str:
    """What the non-finite-steps stop adds in a float16 run: the range as a cause, and the dtype to go back to."""
    if plan.compute_dtype != "float16":
        return ""
    return f"; in float16 a forward whose activations pass 65,504 gives this too: try {fallback(plan)}"


def check(plan, policy, prompt_ids: list[list[int]], note=None, auto: bool = False) -> dict | None:
    """In a float16 plan: raise Float16Overflow when a layer's output is non-finite (`auto`: the recipe left
    model.dtype to the planner, so a restart in bfloat16 is offered where the card has it); returns the largest
    |activation| and the layer it was in (None in other dtypes: nothing to check)."""
    from trainer.policy import eval_mode

    if plan.compute_dtype != "float16":
        return None

    layers = list(policy.backbone.layers)
    worst = {"max_abs": 0.0, "layer": None, "finite": True}

    def hook(i):
        def record(_module, _inputs, out):
            h = out[0] if isinstance(out, tuple) else out
            m = float(h.detach().abs().amax().float())
            if not math.isfinite(m) and worst["finite"]:
                worst.update(finite=False, layer=i, max_abs=m)
            elif worst["finite"] and m > worst["max_abs"]:
                worst.update(max_abs=m, layer=i)
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with eval_mode(policy.model), torch.no_grad():
            for ids in prompt_ids[:PROMPTS]:
                x = torch.tensor([ids[:TOKENS]], device=policy.device)
                policy.hidden_states(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
                if not worst["finite"]:
                    break
    finally:
        for h in handles:
            h.remove()
    if not worst["finite"]:
        raise Float16Overflow(f"in float16 decoder layer {worst['layer']} of {len(layers)} overflows on the recipe's "
                              f"own prompts (an activation past 65,504, float16's largest value): this checkpoint does "
                              f"not fit float16's range", f"set {fallback(plan)}", restart_in_bfloat16(plan, auto))
    if note is not None and worst["max_abs"] > FP16_MAX / HEADROOM:
        note(f"float16: the largest activation on the first prompts is {worst['max_abs']:,.0f} (layer "
             f"{worst['layer']}), within {FP16_MAX / worst['max_abs']:.1f}x of float16's 65,504; if steps turn "
             f"non-finite, set {fallback(plan)}")
    return worst
