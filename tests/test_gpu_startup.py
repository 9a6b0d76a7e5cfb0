"""GPU tests (pytest -m gpu on the device machine): what start-up and export hold on the device beyond the nf4 base.
Writing the bf16 mirror for vLLM and merging the adapter for export each dequantise every linear layer; both used to
keep every result on the GPU until the end (a bf16 copy of the whole base beside the nf4 one: 13 GB for a 7B at
start-up, unplanned). Each now moves a tensor to the host as it is made, so the device's peak grows by about one
tensor. The 0.5B shape: its largest linear is 9 MB in bf16, its linears 0.72 GB together."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.gpu


def setup_module():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module")
def policy():
    from trainer.plan import Device, make_plan
    from trainer.policy import load_policy, read_config
    from trainer.recipe import load_recipe

    recipe = load_recipe(ROOT / "bench" / "recipes" / "toy-digits-1.5b-vllm.yaml",
                         ["model.shape=qwen2.5-0.5b", "rollout.engine=hf", "budget.vram_gb="])
    pol = load_policy(recipe, make_plan(read_config(recipe.model), recipe, Device.detect()))
    with torch.no_grad():  # an adapter that is not zero, so the merge has work to do
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.01)
    return pol


def _linears(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _grown(fn) -> tuple[int, object]:
    """Bytes the device's allocated peak grew by while fn ran, and fn's result."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, out


def test_the_mirror_is_written_holding_one_layer_on_the_device(policy, tmp_path):
    from trainer import sync

    lins = _linears(policy.model)
    largest = max(m.out_features * m.in_features for m in lins) * 2  # bf16
    total = sum(m.out_features * m.in_features for m in lins) * 2
    grew, out = _grown(lambda: sync.write_mirror_checkpoint(policy.model, policy.path, tmp_path / "mirror",
                                                            torch.bfloat16))
    assert grew <= 4 * largest and grew < total / 10, (grew, largest, total)
    assert len(list(out.glob("*.safetensors"))) >= 1 and (out / "model.safetensors.index.json").is_file()


def test_the_export_merge_holds_one_layer_on_the_device(policy):
    from trainer.export import merged_state_dict

    lins = _linears(policy.model)
    largest = max(m.out_features * m.in_features for m in lins) * 4  # the merge is in float32
    total = sum(m.out_features * m.in_features for m in lins) * 2
    grew, state = _grown(lambda: merged_state_dict(policy.model, torch.bfloat16))
    assert all(t.device.type == "cpu" for t in state.values())
    assert grew <= 4 * largest and grew < total / 10, (grew, largest, total)


def test_vllms_weight_load_scope_leaves_torchs_split_limit_alone():
    """vLLM's Worker sets max_split_size_mb:20 around its weight load; torch then will not carve a large request out of
    a larger cached block, and under the run's allocator cap it cudaFrees oversize free blocks that head split segments,
    under live tensors (the 7B mirror at 21.3 GB, 2026-12-06). With vllm_internals.keep_allocator_split_limit the scope
    leaves torch's default: a 100 MB request is carved from a cached 200 MB block (same address), as outside it."""
    from conftest import vllm_split_scope
    from vllm.v1.worker import gpu_worker

    from trainer.rollout import vllm_internals as vi

    def carved(scope) -> bool:
        torch.cuda.empty_cache()
        x = torch.empty(200 * 2**20, dtype=torch.uint8, device="cuda")
        at = x.data_ptr()
        del x  # cached: one free 200 MB segment
        with scope:
            y = torch.empty(100 * 2**20, dtype=torch.uint8, device="cuda")
        same = y.data_ptr() == at
        del y
        torch.cuda.empty_cache()
        return same

    worker = object.__new__(gpu_worker.Worker)
    assert not carved(vllm_split_scope()(worker, max_split_size_mb=20))  # vLLM's own scope: a new segment
    assert vi.keep_allocator_split_limit()
    assert carved(worker._scoped_allocator_max_split(max_split_size_mb=20))
