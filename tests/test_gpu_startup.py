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
