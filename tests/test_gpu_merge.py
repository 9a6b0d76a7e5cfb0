"""GPU tests (pytest -m gpu on the device machine): rollout.sync merge on vLLM 0.26 with CUDA graphs. vLLM starts on
the bf16 mirror without LoRA; each sync writes base + adapter into the weights its captured decode graphs read by
address (trainer/sync.py MergedSync). The graphs sample from what was written: another adapter, other samples; B = 0
again, the base's samples to the token; the weights are bitsandbytes' dequantised nf4 plus peft's delta, rounded once.
And TRAINER_MIRROR_VIEWS with the LoRA slots: the trainer's linears view the mirror (one copy of the base), and vLLM
still samples the trainer's policy."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT
from tests.test_gpu import _gap, _randomize_lora, _sample

pytestmark = pytest.mark.gpu


def setup_module():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def mirror_stack(sync: str):
    from trainer.plan import Device, make_plan
    from trainer.policy import load_policy, read_config, resolve_model_path
    from trainer.recipe import load_recipe
    from trainer.rollout import make_engine

    recipe = load_recipe(ROOT / "bench" / "recipes" / "toy-digits-1.5b-vllm.yaml",
                         ["model.shape=qwen2.5-0.5b", "rollout.cudagraph_capture_sizes=[1,2,4,8,16]",
                          "rollout.weight_format=bf16_mirror", f"rollout.sync={sync}", "rollout.kv_release=false"])
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    engine = make_engine(recipe, plan, resolve_model_path(recipe.model))
    policy = load_policy(recipe, plan, engine)
    engine.attach(policy)
    yield plan, engine, policy
    engine.close()


def synced_samples_match(engine, policy):
    """Another adapter synced: vLLM samples other tokens with the same seed, and the trainer's log-probs of them stay
    within 0.02 of vLLM's on average (bf16 rounding; a wrong weight is tenths off). Returns the prompts and samples."""
    prompts, g0 = _sample(engine, policy)
    _randomize_lora(policy, 0.02, seed=1)
    engine.sync(policy)
    _, g1 = _sample(engine, policy)
    gap = _gap(policy, prompts, g1)
    assert g1.completion_ids != g0.completion_ids and gap[0] < 0.02, gap
    return prompts, g1


@pytest.fixture
def merged():  # closed after its test: the next one starts an engine of its own (one vLLM at a time)
    yield from mirror_stack("merge")


def test_merged_weights_reach_the_captured_decode_graphs(merged):
    import bitsandbytes.functional as F

    from trainer.rollout import vllm_internals as vi

    plan, engine, policy = merged
    assert plan.sync == "merge" and not plan.enforce_eager and engine.llm.llm_engine.vllm_config.lora_config is None
    prompts, g0 = _sample(engine, policy)
    _randomize_lora(policy, 0.02, seed=1)
    ms = [engine.sync(policy)["ms"] for _ in range(3)]
    _, g1 = _sample(engine, policy)
    gap = _gap(policy, prompts, g1)
    assert g1.completion_ids != g0.completion_ids, ms  # the graphs read the rewritten weights
    assert gap[0] < 0.03, (gap, ms)  # vLLM samples base + this adapter, up to bf16 rounding
    base = policy.model.get_base_model()
    rows = vi.mirror_rows(engine.vmodel, {n.removesuffix(".base_layer"): m.out_features for n, m in
                                          base.named_modules() if n.endswith("proj.base_layer")})
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.3.mlp.gate_proj", "model.layers.5.mlp.down_proj"):
        mod = base.get_submodule(name)
        w = mod.base_layer.weight
        want = F.dequantize_4bit(w.data, w.quant_state).float() + mod.get_delta_weight("default").float()
        layer, start, end = rows[name]
        got = layer.weight.data[start:end]
        # one rounding of the same fp32 sum: equal but for cuBLAS's order in B @ A (a bf16 ulp at most, rarely)
        assert (got.float() - want.to(got.dtype).float()).abs().max() <= want.abs().max() * 2 ** -7, name
        assert (got != want.to(got.dtype)).float().mean() < 1e-3, name
    _randomize_lora(policy, 0.0, seed=0)
    engine.sync(policy)
    _, g2 = _sample(engine, policy)
    assert g2.completion_ids == g0.completion_ids  # B = 0: the mirror is the dequantised base again, to the bit


def test_the_trainer_on_the_mirror_views_samples_with_vllm(monkeypatch):
    from trainer import plan as planmod, sync

    monkeypatch.setattr(planmod, "MIRROR_VIEWS", True)
    allocated = []  # torch's allocated bytes around the views (vLLM's engine already up)
    views = sync.view_mirror_linears

    def watched(*args):
        allocated.append(torch.cuda.memory_allocated())
        freed = views(*args)
        allocated.append(torch.cuda.memory_allocated())
        return freed

    monkeypatch.setattr(sync, "view_mirror_linears", watched)
    for plan, engine, policy in mirror_stack("inplace"):
        assert sync.count_base_copies(policy.model, engine.vmodel) == (1, [])  # the nf4 copy is gone
        assert engine.info["nf4_freed_bytes"] > 0.15e9  # the 0.5B shape's 4-bit linears: 0.18 GB packed
        # and its bytes left the device (a reference cycle kept them once: the 2026-12-05 H100 A/B freed nothing)
        assert allocated[0] - allocated[1] >= engine.info["nf4_freed_bytes"], allocated
        synced_samples_match(engine, policy)  # as the nf4 trainer's (test_gpu.py)


def test_the_trainer_on_the_merged_rows_samples_with_vllm(monkeypatch):
    """TRAINER_MIRROR_VIEWS with merge: the trainer's compiled layers compute on the merged rows (trainer/merged_linear.py)
    and their log-probs of vLLM's samples stay within the slots' bound; a backward reaches the adapter."""
    from trainer import plan as planmod

    monkeypatch.setattr(planmod, "MIRROR_VIEWS", True)
    for plan, engine, policy in mirror_stack("merge"):
        assert engine.info["merged_rows_layers"] == 7 * policy.model.get_base_model().config.num_hidden_layers
        prompts, g1 = synced_samples_match(engine, policy)
        from trainer.batch import build_batch
        from trainer.policy import completion_logprobs

        b = build_batch(prompts, ["p"] * len(prompts), g1, 4, policy.tokenizer.pad_token_id,
                        lambda ids: ["" for _ in ids], False, False)
        dev = policy.device
        lp, _ = completion_logprobs(policy, torch.cat([b.prompt_ids, b.completion_ids], 1).to(dev),
                                    torch.cat([b.prompt_mask, b.completion_valid], 1).to(dev),
                                    b.completion_ids.to(dev), b.completion_valid.to(dev), 1.0, 4096, 32768)
        (lp * b.completion_valid.to(dev)).sum().backward()  # through the compiled layers' merged-rows backward
        grads = [p.grad for n, p in policy.model.named_parameters() if "lora_A" in n]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_vllm_on_the_written_mirror_samples_the_trainers_policy(monkeypatch):
    """TRAINER_MIRROR_DIRECT: vLLM 0.26 starts on dummy weights (its CUDA graphs captured on them) and the trainer's
    dequantised base is written into those weights in place: the graphs then sample the trainer's policy."""
    from trainer import sync

    monkeypatch.setattr(sync, "MIRROR_DIRECT", True)
    for plan, engine, policy in mirror_stack("inplace"):
        assert engine.info["mirror_shards"] == 0 and engine.info["mirror_written_bytes"] > 0.5e9, engine.info
        prompts, g0 = _sample(engine, policy)
        assert _gap(policy, prompts, g0)[0] < 0.02  # random dummy weights would give a gap of several nats
        _randomize_lora(policy, 0.02, seed=1)
        engine.sync(policy)
        _, g1 = _sample(engine, policy)
        gap = _gap(policy, prompts, g1)
        assert g1.completion_ids != g0.completion_ids and gap[0] < 0.02, gap



@pytest.mark.parametrize("sync", ["inplace", "merge"])
def test_the_parked_base_is_off_the_device_while_vllm_starts(sync, monkeypatch):
    """plan.park_base (TRAINER_PARK_BASE=1): the trainer's nf4 linears wait in host memory while vLLM starts on the
    mirror: torch holds less than their bytes beside vLLM's weights then; with the views they never come back, with
    merge they return for the merge and the reference pass; either way vLLM samples the trainer's policy."""
    import bitsandbytes as bnb

    from trainer import plan as planmod
    from trainer.rollout.vllm import VLLMEngine

    monkeypatch.setattr(planmod, "MIRROR_VIEWS", True)
    monkeypatch.setattr(planmod, "PARK_BASE", True)
    seen = {}
    start = VLLMEngine._start

    def watched(self, *args, **kwargs):  # torch's allocated bytes as vLLM starts, and the nf4 on the device then
        seen["before"] = torch.cuda.memory_allocated()
        seen["nf4_on_device"] = sum(m.weight.data.nbytes for m in self._policy_base.modules()
                                    if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cuda")
        return start(self, *args, **kwargs)

    monkeypatch.setattr(VLLMEngine, "_start", watched)
    attach = VLLMEngine.attach

    def remember(self, policy):
        self._policy_base = policy.model.get_base_model()
        return attach(self, policy)

    monkeypatch.setattr(VLLMEngine, "attach", remember)
    for plan, engine, policy in mirror_stack(sync):
        layers = policy.model.get_base_model().config.num_hidden_layers
        assert plan.park_base and engine.info["parked_linears"] == 7 * layers
        assert seen["nf4_on_device"] == 0, seen  # every 4-bit layer was in host memory while vLLM started
        base = policy.model.get_base_model()
        left = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
        if sync == "inplace":  # the views replaced them
            assert plan.trainer_linears == "views" and not left
        else:  # back on the device for the merge
            assert plan.trainer_linears == "rows" and left and all(m.weight.device.type == "cuda" for m in left)
            assert all(m.weight.quant_state.absmax.device.type == "cuda" for m in left)
        synced_samples_match(engine, policy)
