"""GPU test (pytest -m gpu) of TRAINER_COMPILE_CUDAGRAPHS (trainer/policy.py COMPILE_CUDAGRAPHS): the nf4 + LoRA
policy's compiled layers replayed from CUDA graphs give the log-probs and LoRA gradients of the same compiled layers
without graphs, pass after pass as a GRPO step runs them (a no-grad pass, then a train pass and its backward), the
graphs are recorded once and replayed after, and a replay reads the adapter's weights as the optimizer left them."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.gpu

PASSES = 5  # warm-up, recording, then replays


def recorded_graphs() -> int:
    """CUDA graphs inductor's cudagraph trees hold on this device (every node of every tree)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    if manager is None:
        return 0
    nodes, n = [node for roots in manager.roots.values() for node in roots], 0
    while nodes:
        node = nodes.pop()
        n += 1
        nodes.extend(child for children in node.children.values() for child in children)
    return n


def run_passes(graphs: bool, monkeypatch) -> tuple[list, list[int]]:
    """Each pass's (no-grad log-probs, train log-probs, LoRA grads) and the graphs recorded after each pass; between
    passes the adapter's weights move in place, as an optimizer step moves them."""
    from trainer import policy as pol
    from trainer.plan import Device, make_plan
    from trainer.recipe import load_recipe

    torch._dynamo.reset()
    monkeypatch.setattr(pol, "COMPILE_CUDAGRAPHS", graphs)
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [
        "train.torch_compile=true", "model.gradient_checkpointing=true", "model.dtype=bfloat16"])
    plan = make_plan(pol.read_config(recipe.model), recipe, Device.detect())
    assert plan.compile_layers and plan.quantized
    policy = pol.load_policy(recipe, plan)
    lora = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A's gradients zero
        for n in sorted(lora):
            lora[n].add_(0.05 * torch.randn(lora[n].shape, generator=g, device="cuda"))
    ids = torch.randint(3, 300, (4, 48), generator=g, device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # a left-padded prompt
    comp, valid = ids[:, 32:], torch.ones(4, 16, dtype=torch.long, device="cuda")
    valid[3, 9:] = 0
    out, counts = [], []
    for _ in range(PASSES):
        with torch.no_grad():
            old, _ = pol.completion_logprobs(policy, ids, mask, comp, valid, 1.0, 4096, 8192)
        logps, _ = pol.completion_logprobs(policy, ids, mask, comp, valid, 1.0, 4096, 8192)
        (-(logps * valid).sum() / valid.sum()).backward()
        out.append((old.clone(), logps.detach().clone(), {n: p.grad.clone() for n, p in lora.items()}))
        policy.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n in sorted(lora):
                lora[n].add_(0.05 * torch.randn(lora[n].shape, generator=g, device="cuda"))
        torch.cuda.synchronize()
        counts.append(recorded_graphs())
    return out, counts


def test_cudagraph_replays_give_the_compiled_layers_logprobs_and_gradients(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch._dynamo.utils import counters

    plain, none = run_passes(False, monkeypatch)
    assert none == [0] * PASSES
    skips = counters["inductor"]["cudagraph_skips"]
    graphed, counts = run_passes(True, monkeypatch)
    assert counters["inductor"]["cudagraph_skips"] == skips, "inductor skipped CUDA graphs (TORCH_LOGS=perf_hints)"
    assert counts[-1] > 0 and counts[-1] == counts[-2] == counts[-3], counts  # recorded once, then replayed
    for p, (a, b) in enumerate(zip(plain, graphed)):
        assert torch.allclose(a[0], b[0], atol=2e-3), (p, (a[0] - b[0]).abs().max())
        assert torch.allclose(a[1], b[1], atol=2e-3), (p, (a[1] - b[1]).abs().max())
        assert a[2].keys() == b[2].keys() and len(a[2]) > 0
        for n in a[2]:
            assert torch.allclose(a[2][n], b[2][n], atol=1e-4, rtol=2e-2), (p, n, (a[2][n] - b[2][n]).abs().max())
    # the weights moved between passes, so equal log-probs in the replays mean the replays read them
    assert (plain[-1][1] - plain[0][1]).abs().max() > 0.05
