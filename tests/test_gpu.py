"""GPU tests (run on the device machine: pytest -m gpu): the shared 4-bit base is one copy, LoRA-only sync reaches
vLLM's sampling with a small logprob gap, the KV pool alone is released and restored, an allocation history recorded
over the start-up names vLLM's and the trainer's allocations (TRAINER_MEMORY_HISTORY). Numbers measured here are
written to $GPU_TESTS_JSON (bench/results/sync.json embeds them)."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.gpu
RESULTS: dict = {}


def setup_module():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def teardown_module():
    path = os.environ.get("GPU_TESTS_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=2)


def used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


HISTORY: dict = {}  # the allocation history recorded over the stack's start-up (trainer/oom.py)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from trainer import oom
    from trainer.memory import ModelDims, base_bytes, Context
    from trainer.plan import Device, make_plan
    from trainer.policy import load_policy, read_config, resolve_model_path
    from trainer.recipe import load_recipe
    from trainer.rollout import make_engine

    recipe = load_recipe(ROOT / "bench" / "recipes" / "toy-digits-1.5b-vllm.yaml",
                         ["model.shape=qwen2.5-0.5b", "rollout.cudagraph_capture_sizes=[1,2,4,8,16]",
                          *os.environ.get("GPU_SETS", "").split()])
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    path = resolve_model_path(recipe.model)
    os.environ["TRAINER_MEMORY_HISTORY"] = "start"  # as a user diagnosing a start-up OOM sets it
    HISTORY["recording"] = oom.record_history(tmp_path_factory.mktemp("history"))
    t0 = time.perf_counter()
    engine = make_engine(recipe, plan, path)
    RESULTS["engine_startup_s"] = round(time.perf_counter() - t0, 1)
    torch.cuda.synchronize()
    before = used()
    policy = load_policy(recipe, plan, engine)
    engine.attach(policy)
    torch.cuda.synchronize()
    HISTORY["message"] = str(oom.explain("start", 0, plan, torch.cuda.OutOfMemoryError("CUDA out of memory (test)")))
    oom.started()
    HISTORY["stopped"] = oom.dump_history() is None
    os.environ.pop("TRAINER_MEMORY_HISTORY")
    dims = ModelDims.from_config(read_config(recipe.model))
    ctx = Context(dims, 2, True, 16, "all-linear", "adamw_torch", True, "vllm", 384, 8, 128, 256, False)
    RESULTS.update(shape="qwen2.5-0.5b", policy_build_added_gb=(used() - before) / 1e9,
                   second_base_copy_would_cost_gb=base_bytes(ctx, vllm_layout=True) / 1e9, engine_info=engine.info)
    yield recipe, plan, engine, policy
    engine.close()


def test_trainer_base_is_a_view_of_vllm_weights(stack):
    from trainer.sync import count_base_copies

    _, _, engine, policy = stack
    copies, outside = count_base_copies(policy.model, engine.vmodel)
    RESULTS["base_copies"] = copies
    assert copies == 1, outside
    # building the policy on top of vLLM added LoRA and bookkeeping only, far less than a second 4-bit base
    assert RESULTS["policy_build_added_gb"] < 0.25 * RESULTS["second_base_copy_would_cost_gb"]


def _sample(engine, policy, seed=3, n=4, tokens=64):
    from trainer.types import Sampling

    prompts = [policy.tokenizer("write only digits: river")["input_ids"], policy.tokenizer("hello there")["input_ids"]]
    return prompts, engine.generate(prompts, Sampling(n=n, max_tokens=tokens, temperature=1.0, seed=seed))


def _gap(policy, prompts, gens, n=4):
    from trainer.batch import build_batch
    from trainer.policy import completion_logprobs

    b = build_batch(prompts, ["p"] * len(prompts), gens, n, policy.tokenizer.pad_token_id,
                    lambda ids: ["" for _ in ids], False, False)
    dev = policy.device
    with torch.no_grad():
        lp, _ = completion_logprobs(policy, torch.cat([b.prompt_ids, b.completion_ids], 1).to(dev),
                                    torch.cat([b.prompt_mask, b.completion_valid], 1).to(dev),
                                    b.completion_ids.to(dev), b.completion_valid.to(dev), 1.0, 4096, 32768)
    diff = (lp.cpu() - b.sampler_logps).abs()[b.completion_valid.bool()]
    return float(diff.mean()), float(diff.max())


def _randomize_lora(policy, scale, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.device))


def test_inplace_lora_sync_reaches_sampling(stack):
    _, _, engine, policy = stack
    # the engine decided its LoRA kernels' configs (trainer/rollout/lora_kernels.py): none are shipped for the 0.5B
    assert engine.info["lora_kernels"].startswith(("vLLM's default", "VLLM_TUNED_CONFIG_FOLDER=")), engine.info
    prompts, g0 = _sample(engine, policy)
    RESULTS["gap_zero_lora"] = _gap(policy, prompts, g0)
    _randomize_lora(policy, 0.02, seed=1)
    ms = [engine.sync(policy)["ms"] for _ in range(5)]
    _, g1 = _sample(engine, policy)
    RESULTS["sync_ms_inplace_0.5b"] = sorted(ms)[2]
    RESULTS["gap_random_lora"] = _gap(policy, prompts, g1)
    assert g1.completion_ids != g0.completion_ids
    assert RESULTS["gap_random_lora"][0] < 0.02, RESULTS["gap_random_lora"]
    _randomize_lora(policy, 0.0, seed=0)
    engine.sync(policy)
    _, g2 = _sample(engine, policy)
    assert g2.completion_ids == g0.completion_ids  # zero LoRA again: exactly the base samples (same seeds)


def test_kv_pool_alone_is_released_and_restored(stack):
    _, plan, engine, policy = stack
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = used()
    t0 = time.perf_counter()
    engine.release()
    released_s = time.perf_counter() - t0
    freed = before - used()
    t0 = time.perf_counter()
    engine.acquire()
    restored_s = time.perf_counter() - t0
    prompts, g = _sample(engine, policy)
    RESULTS.update(kv_planned_gb=plan.kv_cache_memory_bytes / 1e9, kv_freed_gb=freed / 1e9,
                   kv_release_s=released_s, kv_restore_s=restored_s, gap_after_restore=_gap(policy, prompts, g))
    assert freed >= 0.9 * plan.kv_cache_memory_bytes, RESULTS
    assert RESULTS["gap_after_restore"][0] < 0.02  # weights untouched, generation still exact


def test_add_lora_fallback_sync(stack):
    """The fallback sync (a new adapter version through add_lora) reaches sampling: a random adapter pushed this way
    changes the samples from the zero adapter's, and the sampler's log-probs match the trainer's."""
    from trainer.sync import AdapterFileSync

    _, _, engine, policy = stack
    _randomize_lora(policy, 0.0, seed=0)
    engine.sync(policy)
    prompts, g0 = _sample(engine, policy)
    engine.llm.llm_engine.remove_lora(1)  # last test: drop the pinned in-place adapter to make room
    _randomize_lora(policy, 0.02, seed=2)
    fs = AdapterFileSync(engine.shm, 1)
    ms = []
    for _ in range(3):
        t, engine.request = fs.push(policy.model, engine.llm)
        ms.append(t)
    _, g1 = _sample(engine, policy)
    RESULTS["sync_ms_add_lora_0.5b"] = sorted(ms)[1]
    RESULTS["gap_add_lora"] = _gap(policy, prompts, g1)
    assert g1.completion_ids != g0.completion_ids  # the pushed adapter is the one sampling
    assert RESULTS["gap_add_lora"][0] < 0.02, RESULTS["gap_add_lora"]
    _randomize_lora(policy, 0.0, seed=0)


def test_start_up_allocation_history_names_the_engines_and_the_trainers_allocations(stack):
    """TRAINER_MEMORY_HISTORY=start over a real engine's start-up: an OOM's message names the snapshot, the snapshot
    holds vLLM's and the trainer's allocations with their stacks, and recording stops once start-up is over."""
    import pickle
    import re

    from bench.memory_snapshot import summary

    assert HISTORY["recording"] and HISTORY["stopped"]
    found = re.search(r"allocations with their stacks: (\S+memory_snapshot\.pickle)", HISTORY["message"])
    assert found, HISTORY["message"]
    snap = pickle.loads(open(found.group(1), "rb").read())
    frames = {f["filename"] for trace in snap["device_traces"] for e in trace for f in e.get("frames", [])}
    assert any("/vllm/" in f for f in frames) and any("/trainer/" in f for f in frames)
    text = summary(snap)
    assert "vllm/" in text and "GB live in" in text, text


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vllm_4bit_layers_load_and_compute_in_the_model_dtype(dtype):
    """float16 (a T4's model.dtype) or float32 (bench/fidelity.py's LoRA-less engines) on the shared nf4 base: vLLM
    0.26 sized a float32 model's packed
    weight for four nf4 values a byte (a bare AssertionError at load, the H100 2026-12-05) and computed the 4-bit
    layers in bf16 whatever the model dtype. With vllm_internals.install_bnb_in_model_dtype a fused layer of two
    shards holds bitsandbytes' bytes and its output is bitsandbytes' own matmul_4bit in the model dtype bit for bit,
    not the bf16 computation vLLM did. 64 rows in float16: past the fused decode GEMM's 16 (an engine started earlier
    in this process may have installed it) and bitsandbytes 0.50.2's own small-M kernel on an H100 (<= 32 rows for
    this shape), so both sides dequantise and call F.linear, which repeats bit for bit."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from vllm.model_executor.layers.quantization.bitsandbytes import BitsAndBytesConfig, BitsAndBytesLinearMethod
    from vllm.model_executor.utils import set_weight_attrs

    from trainer.rollout import vllm_internals as vi

    vi.install_bnb_in_model_dtype()
    method = BitsAndBytesLinearMethod(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    layer, k, rows = torch.nn.Module(), 512, [256, 128]
    method.create_weights(layer, k, rows, k, sum(rows), dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", generator=g).bfloat16() for n in rows]  # a bf16 checkpoint's shards
    packed = [F.quantize_4bit(w, quant_type="nf4", compress_statistics=False) for w in ws]  # as vLLM's loader does
    data = torch.cat([q for q, _ in packed])
    assert layer.weight.shape == data.shape  # two values a byte
    layer.weight.data = data
    set_weight_attrs(layer.weight, {"bnb_quant_state": {i: st for i, (_, st) in enumerate(packed)},
                                    "bnb_shard_offsets": torch.tensor([0, packed[0][0].numel(), data.numel()])})
    x = torch.randn(8 if dtype == torch.float32 else 64, k, device="cuda", generator=g).to(dtype)
    with torch.no_grad():
        out = method.apply(layer, x)
        lib = torch.cat([bnb.matmul_4bit(x, q.t(), st) for q, st in packed], 1)
        in_bf16 = torch.cat([bnb.matmul_4bit(x.bfloat16(), q.t(), st) for q, st in packed], 1).to(dtype)
    assert out.dtype == dtype and torch.equal(out, lib)
    assert (in_bf16 - lib).abs().max() > 1e-3  # what vLLM computed before: the test tells the two apart


def test_the_trainers_vllm_rounding_equals_vllms_cuda_kernels():
    """trainer/sampler_rounding.py follows vLLM 0.26's CUDA rms_norm, fused_add_rms_norm and rotary_embedding as read
    from their machine code (one rounding each, in fp32): on the card the patched ops equal the kernels' outputs
    (all but fp32 reduction-order flips), where HF's own match ~75-85%."""
    from tests.test_sampler_rounding import agreement_with_vllm_ops

    share = agreement_with_vllm_ops("cuda")
    RESULTS["sampler_rounding_agreement"] = share
    for op in ("rms_norm", "fused_add_rms_norm", "rotary_q", "rotary_k"):
        assert share[f"{op}_ours"] > 0.999, share
    assert max(share["rms_norm_hf"], share["fused_add_rms_norm_hf"], share["rotary_q_hf"]) < 0.9, share
