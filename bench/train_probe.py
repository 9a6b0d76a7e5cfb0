"""What one training micro-batch costs (issues 15 and 16): forward + backward of completion log-probs through the
policy as the train phase runs it.

- `speed(policy, plan)`: eager vs torch.compile'd decoder layers, one sequence (the smallest budget) to sixteen,
  with and without gradient checkpointing: median ms of 5, the first call (compile included), peak allocated.
- `memory(policy, plan)`: torch's allocated and reserved peak above the resting state for a grid of sequence lengths
  (280 to 8192 tokens) and micro-batch sizes, for the gradient pass (checkpointing on and off) and the no-grad
  log-prob pass (reference / old policy): the data the planner's activation terms are fitted on.
Called by bench/decode_profile.py inside its engine process (TRAIN_PROBE=<variant>) so the policy is the real
shared base, and standalone for other shapes: python bench/train_probe.py SHAPE OUT.json (own nf4 base, no vLLM).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = (1, 2, 4, 8, 16)
PROMPT = 24
LENGTHS = (280, 1024, 2048, 4096, 8192)
MAX_TOKENS = 32768


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(rows: int, length: int, vocab: int, device):
    g = torch.Generator().manual_seed(rows * 7919 + length)
    ids = torch.randint(10, min(vocab, 4000), (rows, length), generator=g).to(device)
    mask = torch.ones_like(ids)
    comp = ids[:, PROMPT:]
    return ids, mask, comp, torch.ones_like(comp)


def _pass(policy, batch, plan, grad: bool) -> None:
    """One micro-batch with the logits tile the planner picks for it: min(4096, micro-batch tokens) rows."""
    from trainer.policy import completion_logprobs

    ids, mask, comp, valid = batch
    with torch.set_grad_enabled(grad):
        logps, _ = completion_logprobs(policy, ids, mask, comp, valid, 1.0, min(4096, ids.numel()), plan.vocab_chunk)
        if grad:
            (-(logps * valid).sum() / valid.sum()).backward()


def _clear_grads(policy) -> None:
    for p in policy.trainable_parameters():
        p.grad = None


def _set_checkpointing(policy, on: bool) -> None:
    if on:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.model.gradient_checkpointing_disable()
    policy.model.train()


def speed(policy, plan, log=print) -> list[dict]:
    out = []
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            for layer in policy.backbone.layers:
                layer.compile()
        for ckpt in (True, False):
            _set_checkpointing(policy, ckpt)
            for rows in ROWS:
                batch = _batch(rows, PROMPT + 256, policy.lm_head_weight.shape[0], policy.device)
                try:
                    _sync(policy.device)
                    t = time.perf_counter()
                    _pass(policy, batch, plan, True)
                    _sync(policy.device)
                    first = time.perf_counter() - t
                    times = []
                    for _ in range(5):
                        t = time.perf_counter()
                        _pass(policy, batch, plan, True)
                        _sync(policy.device)
                        times.append(time.perf_counter() - t)
                except torch.cuda.OutOfMemoryError:
                    _clear_grads(policy)
                    torch.cuda.empty_cache()
                    continue
                _clear_grads(policy)
                row = dict(mode=mode, checkpointing=ckpt, rows=rows, tokens=rows * (PROMPT + 256),
                           ms=round(statistics.median(times) * 1e3, 1), first_call_s=round(first, 2))
                out.append(row)
                log(row)
    import torch._dynamo.utils as du

    log({"dynamo": dict(du.counters["stats"]), "graph_breaks": {k: dict(v) for k, v in du.counters.items()
                                                               if "break" in k}})
    for layer in policy.backbone.layers:  # back to eager for whatever runs next in this process
        layer._compiled_call_impl = None
    return out


def memory(policy, plan, log=print) -> list[dict]:
    """Peak bytes above the resting state per (pass, checkpointing, sequence length, rows)."""
    cuda = policy.device.type == "cuda"
    out = []
    for grad, ckpt in ((True, True), (True, False), (False, True)):
        _set_checkpointing(policy, ckpt)
        for length in LENGTHS:
            rows = 1
            while rows * length <= MAX_TOKENS:
                batch = _batch(rows, length, policy.lm_head_weight.shape[0], policy.device)
                if cuda:
                    torch.cuda.empty_cache()
                    _sync(policy.device)
                    base_alloc, base_res = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    _pass(policy, batch, plan, grad)
                    _sync(policy.device)
                except torch.cuda.OutOfMemoryError:
                    _clear_grads(policy)
                    break
                _clear_grads(policy)
                row = dict(grad=grad, checkpointing=ckpt, length=length, rows=rows, tokens=rows * length,
                           completion_tokens=rows * (length - PROMPT))
                if cuda:
                    row.update(peak_alloc_gb=round((torch.cuda.max_memory_allocated() - base_alloc) / 1e9, 4),
                               peak_reserved_gb=round((torch.cuda.max_memory_reserved() - base_res) / 1e9, 4))
                out.append(row)
                log(row)
                if not ckpt and rows * length >= 8192:
                    break
                rows *= 2
    _set_checkpointing(policy, True)
    return out


def standalone(shape: str, out: Path) -> None:
    """A shape's own nf4 base (no vLLM): the memory grid, for fitting the activation terms across shapes."""
    from trainer.plan import Device, make_plan
    from trainer.policy import load_policy, read_config
    from trainer.recipe import load_recipe

    recipe = load_recipe("bench/peers/ours.yaml", [f"model.shape={shape}", "rollout.engine=hf",
                                                   "grpo.max_completion_length=8192"])
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    policy = load_policy(recipe, plan)
    rows = memory(policy, plan, log=lambda r: print("memory", json.dumps(r), flush=True))
    out.write_text(json.dumps({"shape": shape, "device": torch.cuda.get_device_name(), "plan_token_chunk":
                               plan.token_chunk, "plan_vocab_chunk": plan.vocab_chunk, "memory": rows}, indent=1))


if __name__ == "__main__":
    standalone(sys.argv[1], Path(sys.argv[2]))
