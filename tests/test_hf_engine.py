"""The HF-generate engine with the policy's compiled decoder layers and with its own compiled decode step
(rollout.hf_compile): the same tokens and log-probs as eager generate, and no graph compiled per call."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from tests.conftest import ROOT
from trainer.plan import Device, make_plan
from trainer.policy import load_policy, read_config
from trainer.recipe import load_recipe
from trainer.rollout.hf import HFEngine
from trainer.types import Sampling

PROMPTS = [list(range(5, 25)), list(range(30, 42))]


def _policy(*overrides):
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["rollout.engine=hf", *overrides])
    plan = make_plan(read_config(recipe.model), recipe, Device("cpu"))
    return load_policy(recipe, plan), plan


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_the_layers_compiled_for_training_sample_eagerly():
    # a KV cache that grows each token recompiled the compiled layers at every length: 6 graphs, 19.5 s, 32 tokens
    torch._dynamo.reset()
    compiled, plan = _policy("train.torch_compile=true")
    eager, _ = _policy("train.torch_compile=false")
    assert plan.compile_layers
    layers = compiled.model.get_base_model().model.layers
    impls = [layer._compiled_call_impl for layer in layers]
    assert all(impls)
    sampling = Sampling(n=4, max_tokens=24, temperature=1.0, seed=3)
    before = _graphs()
    got = _engine(compiled).generate(PROMPTS, sampling)
    assert _graphs() == before  # nothing compiled while sampling
    want = _engine(eager).generate(PROMPTS, sampling)
    assert got.completion_ids == want.completion_ids
    assert torch.allclose(_flat(got.logprobs), _flat(want.logprobs), atol=1e-5)
    assert [layer._compiled_call_impl for layer in layers] == impls  # compiled again for the training forward


def test_compiled_decode_samples_what_eager_generate_does_with_one_graph_and_one_cache():
    torch._dynamo.reset()
    policy, plan = _policy("rollout.hf_compile=true", "rollout.hf_batch_size=8")
    assert plan.hf_compiled_decode and plan.hf_batch_size == 8
    static = HFEngine(8, compiled_decode=True, max_len=plan.max_model_len)
    static.attach(policy)
    greedy = Sampling(n=3, max_tokens=20, temperature=0.0)  # 6 rows, padded to the engine's 8
    before = _graphs()
    first = static.generate(PROMPTS, greedy)
    compiled = _graphs() - before
    cache = static._cache
    assert compiled >= 1 and cache is not None and static._cache_shape == (8, plan.max_model_len)
    # bitsandbytes' quantisation state read at fixed addresses (not copied in before each CUDA graph replay)
    states = [m.weight.quant_state for m in policy.model.modules()
              if getattr(getattr(m, "weight", None), "quant_state", None)]
    assert len(states) >= 14 and all(getattr(qs.absmax, "_dynamo_static_input_type", None) for qs in states)
    want = _engine(policy).generate(PROMPTS, greedy)
    assert first.completion_ids == want.completion_ids and len(first.completion_ids) == 6
    assert torch.allclose(_flat(first.logprobs), _flat(want.logprobs), atol=1e-4)
    # the next calls (other rows, sampled, a shorter cap) reuse the graph and the cache
    again = static.generate(PROMPTS[::-1], Sampling(n=4, max_tokens=12, temperature=1.0, seed=1))
    assert _graphs() - before == compiled and static._cache is cache
    assert len(again.completion_ids) == 8
    assert all(len(c) == 12 if cut else len(c) <= 12 for c, cut in zip(again.completion_ids, again.truncated))
    assert all(lp <= 0 for row in again.logprobs for lp in row)
    # a call longer than the cache builds a longer one
    static.generate(PROMPTS[:1], Sampling(n=1, max_tokens=plan.max_model_len, temperature=0.0))
    assert static._cache is not cache and static._cache_shape[1] >= 20 + plan.max_model_len


def test_the_plan_holds_the_static_cache_in_both_phases():
    from trainer.plan import plan_context, plan_knobs
    from trainer import memory

    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["rollout.engine=hf", "rollout.hf_batch_size=16"])
    config = read_config(recipe.model)
    for on in (False, True):
        recipe.rollout.hf_compile = on
        plan = make_plan(config, recipe, Device("cpu"))
        comps, phases = memory.components(plan_context(config, recipe, plan, Device("cpu")), plan_knobs(plan))
        cache = memory.hf_cache_bytes(plan_context(config, recipe, plan, Device("cpu")), 16)
        assert cache > 0
        if on:
            assert comps["hf_static_cache"] == cache and comps["hf_kv_cache"] == 0
        else:
            assert "hf_static_cache" not in comps and comps["hf_kv_cache"] == cache
        if not on:
            eager = phases
    assert phases["train"] - eager["train"] >= cache  # held while training, not only while sampling


def _engine(policy) -> HFEngine:
    e = HFEngine(8)
    e.attach(policy)
    return e


def _flat(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for row in rows for x in row])


@pytest.mark.gpu
def test_compiled_decode_on_the_gpu_replays_cuda_graphs_and_samples_eager_generates_tokens():
    # mode reduce-overhead: the decode step in CUDA graphs, bitsandbytes' 4-bit kernels captured with it; a graph
    # skipped (an op it cannot capture, an input it must copy) shows in inductor's counters
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch._dynamo.reset()
    counters.clear()
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["rollout.engine=hf", "rollout.hf_compile=true",
                                                                "rollout.hf_batch_size=8", "model.dtype=float32"])
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    assert plan.hf_compiled_decode and plan.device == "cuda"
    policy = load_policy(recipe, plan)
    static = HFEngine(8, compiled_decode=True, max_len=plan.max_model_len)
    static.attach(policy)
    greedy = Sampling(n=4, max_tokens=32, temperature=0.0)
    for _ in range(3):  # cudagraph trees warm up, then record, then replay
        got = static.generate(PROMPTS, greedy)
    assert counters["stats"]["unique_graphs"] >= 1 and counters["inductor"]["cudagraph_skips"] == 0, dict(counters)
    want = _engine(policy).generate(PROMPTS, greedy)
    # fp32 both ways; a near-tie may still flip one argmax on the GPU, after which a row follows its own tokens: the
    # rows agree up to their first difference, nearly every token agrees, and their log-probs do up to there
    same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
            for x, y in zip(got.completion_ids, want.completion_ids)]
    assert sum(same) >= 0.9 * sum(len(x) for x in want.completion_ids), same
    assert torch.allclose(_flat([lp[:k] for lp, k in zip(got.logprobs, same)]),
                          _flat([lp[:k] for lp, k in zip(want.logprobs, same)]), atol=1e-3)


def test_the_decode_benchmark_times_both_engines(tmp_path):
    # bench/hf_decode.py: the device sitting's A/B of the decode step alone (sitting item hf_decode)
    import json

    from bench.hf_decode import main

    torch._dynamo.reset()
    res = main(tmp_path / "hf.json", ROOT / "recipes" / "tiny-cpu.yaml", 1,
               ["grpo.max_completion_length=8", "train.generation_batch_size=16"])
    assert json.loads((tmp_path / "hf.json").read_text()) == res
    assert res["batch"] == 16 and res["completion_tokens"] == 8 and res["layers"] == 2
    assert set(res["ms_per_token_step"]) == {"eager", "compiled"} and all(len(v) == 1 for v in res["calls_s"].values())
    assert res["greedy_tokens_equal"] == 1.0 and res["failed"] == {}  # fp32 on the CPU: eager's tokens


def test_a_checkpoints_generation_config_does_not_reshape_what_is_sampled(tmp_path, tiny_model_dir):
    # Qwen2.5-Instruct's generation_config.json carries repetition_penalty 1.1, top_k 20, top_p 0.8, temperature 0.7;
    # transformers fills every field a generate call leaves unset from it, so the HF engine sampled with a repetition
    # penalty the recipe never asked for and recorded log-probs that were not the policy's
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_p": 0.2, "top_k": 20,
         "top_p": 0.8, "temperature": 0.7}))
    policy, _ = _policy(f"model.name={model}", "model.shape=null", "model.load_in_4bit=false")
    gens = _engine(policy).generate(PROMPTS, Sampling(n=4, max_tokens=24, temperature=1.0, seed=3))
    gap = _trainer_gap(policy, gens)
    assert gap.numel() > 50 and gap.max() < 1e-4, gap.max()
    assert policy.model.get_base_model().generation_config.repetition_penalty == 1.5  # the checkpoint's, kept


def _trainer_gap(policy, gens) -> torch.Tensor:
    """|sampler log-prob - the trainer's| on every sampled token of PROMPTS x 4 completions."""
    from trainer.policy import completion_logprobs

    width, c = max(map(len, PROMPTS)), max(map(len, gens.completion_ids))
    ids = torch.zeros(8, width + c, dtype=torch.long)
    mask, valid, sampler = torch.zeros_like(ids), torch.zeros(8, c, dtype=torch.long), torch.zeros(8, c)
    for r, comp in enumerate(gens.completion_ids):
        p = PROMPTS[r // 4]
        ids[r, width - len(p):width], mask[r, width - len(p):width] = torch.tensor(p), 1
        ids[r, width:width + len(comp)], mask[r, width:width + len(comp)] = torch.tensor(comp), 1
        valid[r, :len(comp)], sampler[r, :len(comp)] = 1, torch.tensor(gens.logprobs[r])
    with torch.no_grad():
        logps, _ = completion_logprobs(policy, ids, mask, ids[:, width:], valid, 1.0, 4096, 512)
    return (logps - sampler).abs()[valid.bool()]


def test_completions_end_at_every_eos_of_the_checkpoint_as_in_vllm(tmp_path, tiny_model_dir):
    # vLLM stops at the tokenizer's EOS and at each eos_token_id of generation_config.json (Qwen2.5-Instruct:
    # <|im_end|> and <|endoftext|>); HF generate was given the tokenizer's alone and sampled on past the others
    import json
    import shutil

    from trainer.rollout.hf import stop_ids

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    policy, _ = _policy(f"model.name={model}", "model.shape=null", "model.load_in_4bit=false")
    eos = policy.tokenizer.eos_token_id
    others = [t for t in range(20, 80) if t != eos]  # many, so that several completions end at one
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, *others]}))
    policy, _ = _policy(f"model.name={model}", "model.shape=null", "model.load_in_4bit=false")
    assert stop_ids(eos, policy.model.get_base_model().generation_config) == [eos, *others]
    gens = _engine(policy).generate(PROMPTS, Sampling(n=4, max_tokens=24, temperature=1.0, seed=3))
    stops = {eos, *others}
    ended = [c for c, cut in zip(gens.completion_ids, gens.truncated) if not cut]
    assert ended and all(c[-1] in stops and not stops & set(c[:-1]) for c in ended)
    assert all(len(c) == 24 and not stops & set(c) for c, cut in zip(gens.completion_ids, gens.truncated) if cut)
    assert all(len(lp) == len(c) for lp, c in zip(gens.logprobs, gens.completion_ids))
    # ignore_eos (the worst-case first step), as vLLM's: every completion at full length, the stop tokens sampled
    # like any other and not masked out of the recorded log-probs (transformers' min_new_tokens masked them: with a
    # sixth of the vocabulary as stops the log-probs were renormalised without ~15% of the mass)
    full = _engine(policy).generate(PROMPTS, Sampling(n=4, max_tokens=24, temperature=1.0, seed=3, ignore_eos=True))
    assert all(len(c) == 24 for c in full.completion_ids) and all(full.truncated)
    assert any(stops & set(c[:-1]) for c in full.completion_ids)
    gap = _trainer_gap(policy, full)
    assert gap.numel() == 8 * 24 and gap.max() < 1e-4, gap.max()


def test_the_decode_benchmark_keeps_eager_numbers_when_the_compiled_step_fails(tmp_path, monkeypatch):
    from bench.hf_decode import main

    def broken(self, length):
        raise RuntimeError("cannot capture this kernel")

    monkeypatch.setattr(HFEngine, "_static", broken)
    res = main(tmp_path / "hf.json", ROOT / "recipes" / "tiny-cpu.yaml", 2,
               ["grpo.max_completion_length=4", "train.generation_batch_size=8"])
    assert set(res["failed"]) == {"compiled"} and "cannot capture this kernel" in res["failed"]["compiled"]
    assert len(res["calls_s"]["eager"]) == 2 and res["calls_s"]["compiled"] == [] and res["speedup"] is None
