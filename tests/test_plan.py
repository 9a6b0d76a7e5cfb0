"""The VRAM planner: byte counts of real model configs against hand-computed values, and properties of its
choices (more budget never plans worse, fixed knobs are kept, infeasible recipes are refused with the minimum)."""
from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import ROOT
from trainer import memory
from trainer.errors import UserError
from trainer.memory import GB, ModelDims
from trainer.plan import Device, make_plan
from trainer.recipe import load_recipe

H100 = Device("cuda", "NVIDIA H100 80GB HBM3", 85_000_000_000, 84_000_000_000, True, capability=(9, 0))
MODELS = ROOT / "tests" / "data" / "models"


def cfg(name: str) -> dict:
    return json.loads((MODELS / f"{name}.json").read_text())


def recipe(overrides=()):
    return load_recipe(ROOT / "bench" / "recipes" / "toy-digits-1.5b-vllm.yaml",
                       ["rollout.weight_format=", "rollout.kv_release=", "train.generation_batch_size=8",
                        "grpo.max_completion_length=256", "data.max_prompt_length=128", *overrides])


def test_qwen25_15b_counts_by_hand():
    d = ModelDims.from_config(cfg("qwen2.5-1.5b-instruct"))
    per_layer = 2 * 1536 * 1536 + 2 * 256 * 1536 + 3 * 8960 * 1536  # q, o; k, v; gate, up, down
    assert d.linear_params == 28 * per_layer == 1_310_195_712
    assert d.embed_params == 151936 * 1536  # tied: one matrix
    assert d.lora_params(16, "all-linear") == 28 * 16 * (2 * 3072 + 2 * 1792 + 3 * 10496) == 18_464_768
    assert d.lora_params(16, ["q_proj", "v_proj"]) == 28 * 16 * (3072 + 1792)
    assert d.kv_bytes_per_token() == 2 * 28 * 2 * 128 * 2 == 28_672  # K and V, layers, kv heads, head dim, bf16


def test_untied_and_gqa_models():
    q7, llama = ModelDims.from_config(cfg("qwen2.5-7b-instruct")), ModelDims.from_config(cfg("llama-3.1-8b-instruct"))
    assert q7.embed_params == 2 * 152064 * 3584 and q7.kv_bytes_per_token() == 2 * 28 * 4 * 128 * 2
    assert llama.linear_params == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    assert llama.max_position == 131072 and not llama.tied


def test_4bit_base_bytes_by_hand():
    d = ModelDims.from_config(cfg("qwen2.5-1.5b-instruct"))
    ctx = memory.Context(d, 2, True, 16, "all-linear", "adamw_torch", True, "vllm", 384, 8, 128, 256, False)
    n = d.linear_params
    small = 28 * (2 * 1536 + 1536 + 2 * 256) + 1536  # norms and q/k/v biases
    assert memory.base_bytes(ctx, vllm_layout=True) == n // 2 + n // 64 * 4 + (151936 * 1536 + small) * 2
    # HF's double quantisation stores absmax in 8 bits (+ an fp32 per 256 blocks): smaller than vLLM's fp32 absmax
    assert memory.base_bytes(ctx, vllm_layout=False) < memory.base_bytes(ctx, vllm_layout=True)


def test_kv_pool_is_sized_in_bytes_for_the_sequences_not_a_fraction():
    d = ModelDims.from_config(cfg("qwen2.5-1.5b-instruct"))
    # 8 sequences of 384 tokens: 24 + 1 spare blocks of 16 tokens each
    assert memory.kv_pool_bytes(d, 8, 384) == 8 * 25 * 16 * 28_672  # 91.8 MB, where a 0.6 fraction reserves ~10 GB


def test_the_kv_pool_is_counted_once_without_the_allocators_slack():
    """vLLM's KV pool is one allocation made at engine start: a larger pool raises the rollout phase by its bytes and
    no more (the 8B's 24 GB long row planned its rollout 2.1 GB high with 17% slack on 12.38 GB of KV), and the train
    phase by the same bytes when the pool stays mapped through training, by nothing when it is released."""
    from trainer.plan import plan_context, plan_knobs

    c = cfg("qwen2.5-1.5b-instruct")
    for release in (True, False):
        r = recipe(["budget.vram_gb=20", f"rollout.kv_release={str(release).lower()}"])
        p = make_plan(c, r, H100)
        ctx, k = plan_context(c, r, p, H100), plan_knobs(p)
        assert k["kv_release"] == release
        small = memory.components(ctx, {**k, "kv_cache_memory_bytes": 10**9})[1]
        large = memory.components(ctx, {**k, "kv_cache_memory_bytes": 5 * 10**9})[1]
        assert large["rollout"] - small["rollout"] == 4 * 10**9
        assert large["train"] - small["train"] == (0 if release else 4 * 10**9)


def test_seed_case_fits_seven_gb_with_a_small_kv_pool():
    plan = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["budget.vram_gb=7", "data.max_prompt_length=128"]), H100)
    assert plan.peak_bytes <= 7e9 and plan.kv_cache_memory_bytes < 0.2e9
    assert plan.max_num_seqs == 8 and plan.cudagraph_capture_sizes == [1, 2, 4, 8]


def test_infeasible_budget_states_the_minimum_that_fits():
    with pytest.raises(UserError) as e:
        make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["budget.vram_gb=2"]), H100)
    assert e.value.field == "budget.vram_gb"
    need = float(e.value.fix.split("budget.vram_gb: ")[1].split(",")[0])
    plan = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe([f"budget.vram_gb={need}"]), H100)
    assert plan.peak_bytes <= need * 1e9
    with pytest.raises(UserError):
        make_plan(cfg("qwen2.5-1.5b-instruct"), recipe([f"budget.vram_gb={need - 0.15}"]), H100)


def test_context_longer_than_the_model_is_refused():
    with pytest.raises(UserError) as e:
        make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["grpo.max_completion_length=40000"]), H100)
    assert e.value.field == "grpo.max_completion_length"


@settings(max_examples=40, deadline=None)
@given(budget=st.floats(5.0, 40.0), extra=st.floats(0.1, 20.0), gen=st.sampled_from([8, 16, 32, 64]),
       length=st.sampled_from([128, 256, 512]), model=st.sampled_from(["qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct"]))
def test_more_budget_never_plans_worse_and_never_exceeds(budget, extra, gen, length, model):
    """A larger budget's plan is no slower at the cap, or else faster with completions half as long (the bar graphed
    plans meet: plan._eligible): never slower at both."""
    from trainer.plan import plan_context, plan_knobs, short_step_seconds

    over = [f"train.generation_batch_size={gen}", f"grpo.max_completion_length={length}"]
    plans = []
    for b in (budget, budget + extra):
        try:
            plans.append(make_plan(cfg(model), recipe(over + [f"budget.vram_gb={b}"]), H100))
        except UserError:
            plans.append(None)
    small, big = plans

    def short(plan) -> float:
        r = recipe(over)
        return short_step_seconds({**plan_knobs(plan), "predicted_phases_s": plan.predicted_phases_s}, r,
                                  plan_context(cfg(model), r, plan, H100), plan.compile_layers, H100)

    if small is not None:
        assert small.peak_bytes <= budget * 1e9
        assert big is not None and big.peak_bytes <= (budget + extra) * 1e9
        assert _speed(big, model, length) >= _speed(small, model, length) or short(big) <= short(small) + 1e-9


def _speed(plan, model: str, length: int) -> float:
    """What the planner maximises: minus its predicted step time (trainer/cost.py), recomputed from the plan's knobs."""
    from trainer import cost

    knobs = {k: getattr(plan, k) for k in ("micro_batch_tokens", "gradient_checkpointing", "checkpoint_in_graph",
                                           "weight_format", "kv_release", "max_num_seqs", "activation_offload",
                                           "micro_batch_seqs", "hf_batch_size", "sync", "trainer_linears",
                                           "train_cudagraphs", "checkpoint_recompute_all")}
    dims = ModelDims.from_config(cfg(model))
    got = -cost.step_seconds(dims.linear_params, plan.generation_batch_size, length,
                             plan.generation_batch_size * plan.max_model_len, knobs, plan.rollout_engine,
                             plan.compile_layers, plan.nf4_gemm_max_rows > 0, dims=dims,
                             prompt_len=plan.max_model_len - length,
                             group=plan.generation_batch_size // plan.prompts_per_step,
                             speed=cost.card_speed(plan.device_name))
    assert abs(got + plan.predicted_step_s) < 1e-2
    assert abs(sum(plan.predicted_phases_s.values()) - plan.predicted_step_s) < 1e-2
    return got


@pytest.mark.parametrize("linears", ["nf4", "views", "rows"])
def test_predicted_step_prices_every_pass_over_the_batch(linears, monkeypatch):
    # num_iterations 2 and beta > 0 were predicted as one pass (7.1 s a step against 11.6 s measured on one H200,
    # 2026-12-02): each iteration's forward + backward and each gradient-free log-prob pass now costs its time; on
    # the mirror's bf16 linears (views, merged rows) at cost.BF16_LINEARS_TRAIN of it, except the reference pass under
    # the merged rows (peft's adapter disabled: the trainer's nf4 path).
    from trainer import cost, plan as planmod

    monkeypatch.setattr(planmod, "MIRROR_VIEWS", linears != "nf4")
    fixed = ["train.micro_batch_tokens=4096", "model.gradient_checkpointing=true", "train.checkpoint_in_graph=false",
             "rollout.weight_format=bf16_mirror", "rollout.sync=" + ("merge" if linears == "rows" else "inplace"),
             "grpo.max_completion_length=1024", "train.generation_batch_size=32", "budget.vram_gb=40"]
    one, ref, two = (make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(fixed + o), H100)
                     for o in ([], ["grpo.beta=0.04"], ["grpo.beta=0.04", "grpo.num_iterations=2"]))
    assert one.trainer_linears == ref.trainer_linears == two.trainer_linears == linears
    assert one.micro_batch_tokens == ref.micro_batch_tokens == two.micro_batch_tokens == 4096
    d = ModelDims.from_config(cfg("qwen2.5-1.5b-instruct"))
    t = one.max_model_len  # whole sequences a micro-batch: as many of T tokens as fit 4096 (batch.pack)
    rows = 4096 // t
    n, mb = math.ceil(32 / rows), rows * t
    # a micro-batch's forward: linear layers, lm_head, causal attention of its sequences
    forward_flops = 2 * (d.linear_params + d.vocab * d.hidden) * mb + 2 * t * t * d.heads * d.head_dim * d.layers * rows
    train = n * max(cost.LAYER_FLOOR_S[(one.compile_layers, True)] * d.layers, 4 * forward_flops / cost.TRAIN_FLOPS)
    forward = n * max(cost.LAYER_FLOOR_S[(one.compile_layers, False)] * d.layers / 2, forward_flops / cost.TRAIN_FLOPS)
    bf16 = 1.0 if linears == "nf4" else cost.BF16_LINEARS_TRAIN
    # the reference pass
    assert ref.predicted_step_s - one.predicted_step_s == pytest.approx(forward * (1.0 if linears == "rows" else bf16),
                                                                        abs=2e-3)
    # the second iteration (forward, recompute, 2x backward) and the old policy's pass
    assert two.predicted_step_s - ref.predicted_step_s == pytest.approx((train + forward) * bf16, abs=2e-3)


def test_hf_generate_is_priced_per_call_and_decoder_layer():
    # HF generate was priced as 10.4x vLLM's decode, fitted on the 0.5B row alone: 29% short on the 1.5B's (one H200,
    # 2026-12-03). Now per token step and decoder layer (host-bound: the 1.5B and the 7B, 5x its parameters, both took
    # 72 ms a step), per call of hf_batch_size sequences.
    from trainer import cost

    def rollout(model, extra=()):
        plan = make_plan(cfg(model), recipe(["rollout.engine=hf", "train.generation_batch_size=8",
                                             "grpo.max_completion_length=512", "budget.vram_gb=40", *extra]), H100)
        return plan, plan.predicted_phases_s["rollout"]

    plan, one_call = rollout("qwen2.5-1.5b-instruct")
    d = ModelDims.from_config(cfg("qwen2.5-1.5b-instruct"))
    assert plan.hf_batch_size == 8
    assert one_call == pytest.approx(512 * cost.HF_MS_PER_LAYER * d.layers / 1e3, abs=2e-3)
    _, four_calls = rollout("qwen2.5-1.5b-instruct", ["rollout.hf_batch_size=2"])
    assert four_calls == pytest.approx(4 * one_call, abs=4e-3)
    _, small = rollout("qwen2.5-0.5b-instruct")
    assert small < one_call  # 24 decoder layers against 28


@pytest.mark.parametrize("fixed", [["train.micro_batch_tokens=1024"], ["rollout.weight_format=shared_nf4"],
                                   ["rollout.kv_release=true"], ["rollout.enforce_eager=true"],
                                   ["model.gradient_checkpointing=true"], ["rollout.kv_cache_memory_bytes=123456789"]])
def test_fixed_knobs_are_kept(fixed):
    plan = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(fixed + ["budget.vram_gb=30"]), H100)
    key, value = fixed[0].split("=")
    field = key.split(".")[1]
    got = getattr(plan, field)
    assert str(got).lower() == value.lower()


def test_auto_budget_uses_free_memory_minus_margin():
    plan = make_plan(cfg("qwen2.5-0.5b-instruct"), recipe(["budget.vram_gb=auto", "budget.margin_gb=2"]),
                     Device("cuda", "x", 16e9, 12e9, True))
    assert plan.budget_bytes == int(12e9 - 2e9)


def test_data_parallel_plans_the_per_gpu_cost_of_distribution():
    """Measured on 2 GPUs: NCCL buffers of two groups and the peer's context cost ~1.2-1.5 GB per GPU."""
    from dataclasses import replace

    r = recipe(["train.generation_batch_size=64"])
    one, two = make_plan(cfg("qwen2.5-1.5b-instruct"), r, H100), make_plan(cfg("qwen2.5-1.5b-instruct"), r, replace(H100, world_size=2))
    assert "distributed" not in one.components and two.components["distributed"] == memory.DISTRIBUTED
    assert two.generation_batch_size == 32
    solo_half = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["train.generation_batch_size=32"]), H100)
    assert two.peak_bytes == solo_half.peak_bytes + memory.DISTRIBUTED


def test_the_distributed_term_is_a_function_of_the_rank_count():
    """Fixed + per extra peer beyond two; the two-rank value is the measured one whatever the per-peer fit."""
    from dataclasses import replace

    assert memory.distributed_bytes(1) == 0 and memory.distributed_bytes(2) == memory.DISTRIBUTED_FIXED
    assert memory.distributed_bytes(4) == memory.DISTRIBUTED_FIXED + 2 * memory.DISTRIBUTED_PER_PEER
    four = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["train.generation_batch_size=64"]), replace(H100, world_size=4))
    assert four.components["distributed"] == memory.distributed_bytes(4) and four.generation_batch_size == 16


def test_plan_is_sized_for_the_longest_prompt_of_the_data():
    r = recipe(["budget.vram_gb=30"])  # data.max_prompt_length=128
    by_field = make_plan(cfg("qwen2.5-1.5b-instruct"), r, H100)
    by_data = make_plan(cfg("qwen2.5-1.5b-instruct"), r, H100, max_prompt_tokens=24)
    assert by_field.max_model_len == 128 + 256 and by_data.max_model_len == 24 + 256
    assert by_data.kv_cache_memory_bytes < by_field.kv_cache_memory_bytes
    # and priced smaller at the same rows a micro-batch (left to the planner, the shorter rows may buy a bigger,
    # faster micro-batch: 8 rows of 280 tokens against 4 of 384 with the train phase's CUDA graphs)
    rows = recipe(["budget.vram_gb=30", "train.per_device_train_batch_size=4"])
    assert (make_plan(cfg("qwen2.5-1.5b-instruct"), rows, H100, max_prompt_tokens=24).peak_bytes
            < make_plan(cfg("qwen2.5-1.5b-instruct"), rows, H100).peak_bytes)
    longer = make_plan(cfg("qwen2.5-1.5b-instruct"), r, H100, max_prompt_tokens=500)  # truncated to the field
    assert longer.max_model_len == by_field.max_model_len


def test_planner_bench_runs_the_budget_a_name_asks_for_listed_or_not():
    """`bench/planner.py NAME@SPEC` runs that budget: a number however written (`@10` matched the text "10.0" only,
    and ran nothing), and a spec the config does not list (`@min` of a config listed at 10 GB ran nothing, rc 0, in
    the 2026-12-04 sitting); a spec that is no budget stops the command instead of running nothing."""
    from bench.planner import runs

    assert [(n, b) for n, _, b, _ in runs(["1.5b-vllm-32x1024-iter2-beta@10"])] == [
        ("1.5b-vllm-32x1024-iter2-beta@10gb", 10.0)]
    assert [b for _, _, b, _ in runs(["1.5b-vllm-32x1024-iter2-beta@10.0gb"])] == [10.0]
    assert [b for _, _, b, _ in runs(["1.5b-vllm-8x256@7"])] == [7.0]  # listed: min and 6.6
    (name, ov, b, spec), = runs(["1.5b-vllm-128x96-20gb@min"])  # listed: 20 only
    assert spec == "min" and b < 20 and ov[-1] == f"budget.vram_gb={b}" and name == f"1.5b-vllm-128x96-20gb@{b:g}gb"
    assert len(runs(["1.5b-vllm-8x256"])) == 2  # no @: every listed budget
    with pytest.raises(SystemExit, match="min, min\\+15% or a number"):
        runs(["1.5b-vllm-8x256@lots"])


def test_step_time_model_predicts_every_steady_h200_grid_row_within_a_quarter(tmp_path):
    """trainer/cost.py against what the H200 measured (bench/results/planner.json, rows with five steps: their steps
    3-5 are past the layers' compiles; HF rows from three), each row priced with the knobs it ran: the step within
    25% (issue 25), and the rollout and train phases each within 50% (a refit that trades one phase against the other
    shows here)."""
    import json

    from bench.planner import fit

    grid = json.loads((ROOT / "bench" / "results" / "planner.json").read_text())
    # HF rows do not compile the layers (a growing KV cache would recompile them): their step 3 is steady already
    steady = {r["name"] for r in grid["configs"] if r.get("rc") == 0 and len(r.get("step_s") or [])
              >= (3 if (r.get("knobs") or {}).get("rollout_engine") == "hf" else 5)}
    assert len(steady) >= 6
    fit(tmp_path / "fit.json")
    rows = {r["name"]: r for r in json.loads((tmp_path / "fit.json").read_text())["rows"]}
    missed = {}
    for name in steady:
        if rows[name]["compile_fell_back_to_eager"]:  # measured eager layers, not the compiled ones cost.py prices
            continue
        err = rows[name]["error_frac"]
        if not (abs(err["step"]) <= 0.25 and abs(err["rollout"]) <= 0.5 and abs(err["train"]) <= 0.5):
            missed[name] = err
    # Each known miss named, so that a new one fails here and a fixed one is taken off the list.
    assert missed.keys() == STEP_MODEL_MISSES.keys(), missed
    # Memory the same way (issue 25: within 5% of nvidia-smi's peak): today's memory.py at each run's knobs
    mem = {name: x["memory"]["peak_error_frac"] for name, x in rows.items()}
    assert len(mem) >= 15 and all(e <= 0.05 for e in mem.values()), mem  # never more than 5% above the plan
    assert {n for n, e in mem.items() if abs(e) > 0.05} == MEMORY_MODEL_MISSES.keys(), mem
    # and the train phase on its own, where a row kept it: a train phase planned under what ran is a promise broken at
    # another length or budget even while the row's peak is its rollout's (the 8B 24 GB long row's was 5.5% under
    # after the checkpointing refit of 2026-12-04, its peak 0.2% under: memory.OFFLOAD_BACKWARD_BYTES_PER_TH)
    train = {name: x["memory"]["measured_gb"]["train"] / x["memory"]["predicted_gb"]["train"] - 1
             for name, x in rows.items() if (x["memory"]["measured_gb"] or {}).get("train")}
    assert len(train) >= 15 and all(e <= 0.05 for e in train.values()), train


# Rows the step model misses today. The train phase's floor is per decoder layer since 2026-12-04 (trainer/cost.py's
# LAYER_FLOOR_S, from the profile of the 1.5B's eight 286-token micro-batches: host-bound, the GPU busy ~0.3 s of 2.1);
# the host's cost a layer and micro-batch spans 3-13 ms across rows and sittings, and one constant cannot hold these
# two. Not profiled apart yet: why one micro-batch (or the mirror's 94-token ones) costs a third of the others.
# Off the list since the H200 sitting of 2026-12-06 23:22 (today's code: merge + merged rows): the 286-token mirror row
# (was step -36%, train -44%, 12.8 ms a layer and micro-batch on the slowest host; now +23% / +26%); the 16 x 64 row at
# its least budget re-ran as 1.5b-vllm-mirror-16x64-beta@5.6gb (step +3%), its 5.7 GB namesake below is the older code.
STEP_MODEL_MISSES: dict[str, str] = {
    "1.5b-vllm-mirror-16x64-beta@5.7gb": "train +71% (step +24%): sixteen 94-token micro-batches and a reference "
                                         "pass at 3.7 ms a layer",
    "0.5b-vllm-16x2048-r64-beta@9gb": "step -65%, train -95%: steps 3-4 still compiled the reference and train "
                                      "variants (9.2 and 15.4 s, 2026-12-06); step 5, past them, 7.75 s against "
                                      "5.49 (rollout 6.92 against 4.98); TRAINER_COMPILE_DYNAMIC_DIMS=mask_always "
                                      "ends its compiling at step 2 (one H100, 2026-12-06 08:58)",
}


# Rows memory.py misses by more than 5% today, at the knobs they ran with (bench/planner.py --fit, its "memory" table):
# none of the 31. The 7B 8 x 1,024 row without checkpointing (-7.4% on 2026-12-05, over-planned) is -3.7% since
# NO_CKPT_FIT was fitted on both rows without checkpointing; config A at 6.6 GB on the mirror's merged rows with the KV
# released (-5.7%, over-planned by the allocator's slack) is -2.6% since memory.EXPANDABLE_SLACK (trainer/memory.py).
MEMORY_MODEL_MISSES: dict[str, str] = {}


def test_memory_model_holds_every_completed_h100_row_of_the_mirror_paths():
    """memory.py against the H100 rows of the bf16 mirror's trainer paths (bench/results/planner_h100.json, 2026-12-05:
    views and merged rows, 1.5B and 7B, none fitted on but config B's merged rows, which set IN_GRAPH_SLACK; and
    since 2026-12-06 a shared nf4 row, config A at its least budget), each re-planned at the knobs it ran with: within 5% of nvidia-smi's peak, and never more than 5% above the plan."""
    import json

    from bench.planner import _pin_run, _plan, linears_as_ran, ran_knobs

    rows = json.loads((ROOT / "bench" / "results" / "planner_h100.json").read_text())["configs"]
    done = [r for r in rows if r.get("rc") == 0]
    assert len(done) >= 6 and {r["knobs"]["trainer_linears"] for r in done} >= {"views", "rows"}
    err = {}
    for row in done:
        ran = ran_knobs(row)
        with linears_as_ran(ran):
            plan, _ = _plan(row["overrides"][:-1] + _pin_run(ran), None)
        assert plan.trainer_linears == ran["trainer_linears"] and plan.sync == ran["sync"], row["name"]
        err[row["name"]] = row["measured_peak_gb"] / (plan.peak_bytes / 1e9) - 1
    assert all(e <= 0.05 for e in err.values()), err  # never more than 5% over the plan
    assert {n for n, e in err.items() if abs(e) > 0.05} == H100_MEMORY_MISSES.keys(), err
    assert all(abs(err[n]) <= 0.06 for n in H100_MEMORY_MISSES), err


# H100 rows memory.py misses by more than 5% (and less than 6%), with why.
H100_MEMORY_MISSES: dict[str, str] = {
    "1.5b-vllm-mirror-64x512-inplace@7.25gb": "-5.0% (6.25 GB against 6.58 planned; one H100, 2026-12-06 14:12 "
    "sitting, and 6.25 again at 16:58 on another H100, run before the merge + rows' row): the peak came in vLLM's "
    "start-up (30 s in, nvidia-smi's samples), priced as the slots + views' rollout phase: the nf4 linears and the "
    "mirror both held, the KV pool, the rollout's activations and their slack. Without those activations the price "
    "would be 6.19, under what the start-up took: between the two, so it stays (the rollout phase after the start-up "
    "5.89; the train phase 6.21 against 6.02 planned, +3.3%, where the closed loop took the checkpoint out of the "
    "graph and offloaded from step 2). A forced-knob row (rollout.sync=inplace): the planner takes merge + rows here",
    "1.5b-vllm-32x1024-iter2-beta@10gb": "-5.7%, over-planned (8.72 GB against 9.25; one H100, 2026-12-06 16:58 "
    "sitting): the train phase at 8,432-token micro-batches (4,216 when the H200 ran it, 2026-12-03: -3.9% at its "
    "knobs today). torch's allocated peak 7.33 GB against 7.54 priced and the reserve above it ~0.4 GB against the "
    "0.71 of memory.SLACK_FRACTION fitted on the H200's grid; not refitted on one H100 row",
}


# H100 rows whose steady rollout misses its prediction by more than 25% (and less than 35%), with why.
H100_ROLLOUT_MISSES: dict[str, str] = {
    "0.5b-vllm-16x2048-r64-beta@9gb": "+26%: a host-bound 2,048-step decode (16 sequences, 0.5B) on the H100 sitting's "
    "slower host (35 us an op against the H200 row's 26) in steps 3-4 that also recompiled the layers: its rollout "
    "took 5.7-7.7 s across the five steps, 7.1 the median of steps 3-5 (2026-12-06 08:58; +61% before "
    "cost.DECODE_ATTN_S_PER_TOKEN_LAYER)",
}


def test_rollouts_on_the_h100_are_priced_at_its_bandwidth():
    """trainer/cost.py's constants are the H200's; planned for the H100 they ran on (cost.CARDS: 3.35 TB/s against
    4.8), the H100 rows' steady rollouts (bench/results/planner_h100.json, 2026-12-05, none fitted on) come within 25%
    and the 7B mirror rows (13 GB of bf16 weights read at each token step) within 5%, where priced at the H200's speed
    the 7B's missed by 29% (55% before the mirror's slope was refitted on the H200's 7B row, 2026-12-06); the shared
    nf4 rows (2026-12-06) within 10%, at the H100's compute, the H200's."""
    import json
    import statistics

    from bench.planner import H200, _pin_run, _plan, linears_as_ran, ran_knobs
    from trainer import cost

    h100 = dict(H200, name="NVIDIA H100 80GB HBM3", total_bytes=85_000_000_000, free_bytes=84_000_000_000)
    assert cost.card_speed(h100["name"]) == pytest.approx((3.35 / 4.8, 1.0))
    assert cost.card_speed("NVIDIA H100 PCIe")[0] == pytest.approx(2.0 / 4.8)  # not the SXM card's
    assert cost.card_speed(H200["name"]) == (1.0, 1.0) and cost.card_speed("NVIDIA B300") is None
    assert cost.card_speed("NVIDIA GH200 480GB")[0] == pytest.approx(4.0 / 4.8)  # not an H200 by a fragment
    assert cost.card_speed("NVIDIA A10")[1] != cost.card_speed("NVIDIA A100-SXM4-80GB")[1]
    assert cost.card_speed("NVIDIA L40S")[1] != cost.card_speed("NVIDIA L4")[1] != cost.card_speed("NVIDIA L40")[1]
    rows = json.loads((ROOT / "bench" / "results" / "planner_h100.json").read_text())["configs"]
    scaled, unscaled, formats = {}, {}, {}
    for row in [r for r in rows if r.get("rc") == 0]:
        ran = ran_knobs(row)
        formats[row["name"]] = row["knobs"]["weight_format"]
        measured = statistics.median(p["rollout"] for p in row["phase_s"][2:])
        with linears_as_ran(ran):
            on_h100, _ = _plan(row["overrides"][:-1] + _pin_run(ran), None, h100)
            on_h200, _ = _plan(row["overrides"][:-1] + _pin_run(ran), None)
        assert on_h100.max_num_seqs == on_h200.max_num_seqs == ran["max_num_seqs"], row["name"]
        scaled[row["name"]] = measured / on_h100.predicted_phases_s["rollout"] - 1
        unscaled[row["name"]] = measured / on_h200.predicted_phases_s["rollout"] - 1
    assert len(scaled) >= 7 and any("7b" in n for n in scaled)
    assert {n for n, e in scaled.items() if abs(e) > 0.25} == H100_ROLLOUT_MISSES.keys(), scaled
    assert all(abs(scaled[n]) <= 0.35 for n in H100_ROLLOUT_MISSES), scaled
    # the 7B mirror's 13 GB of bf16 weights read at each token step: the bandwidth decides it
    mirror_sevens = [n for n in scaled if n.startswith("7b") and formats[n] == "bf16_mirror"]
    assert len(mirror_sevens) >= 3, scaled
    assert all(abs(scaled[n]) <= 0.05 and unscaled[n] > 0.25 for n in mirror_sevens), (scaled, unscaled)
    # the nf4 base's dequantising GEMM: as fast on the H100 as on the H200 (cost.NF4_SCALES_WITH); priced at the
    # bandwidth these rows ran 0.77-0.88x their price (2026-12-06)
    nf4 = [n for n in scaled if formats[n] == "shared_nf4"]
    assert len(nf4) >= 3 and any(n.startswith("7b") for n in nf4), scaled
    assert all(abs(scaled[n]) <= 0.1 for n in nf4), scaled


def test_a_card_the_cost_model_does_not_know_is_priced_as_an_h200_and_says_so():
    from bench.planner import H200, _plan

    known, _ = _plan(["train.generation_batch_size=8"], 20.0)
    t4 = dict(H200, name="Tesla T4", total_bytes=15_000_000_000, free_bytes=14_500_000_000, bf16=False,
              capability=(7, 5))
    slow, _ = _plan(["train.generation_batch_size=8", "model.dtype=float16"], 14.0, t4)
    unknown, _ = _plan(["train.generation_batch_size=8"], 20.0, dict(H200, name="NVIDIA B300"))
    # a T4 (0.32 TB/s, 65e12 FLOP/s): the decode's weight reads 15x slower; its fixed (host) terms are not
    assert slow.predicted_phases_s["rollout"] > 3 * known.predicted_phases_s["rollout"]
    assert slow.predicted_phases_s["train"] > known.predicted_phases_s["train"]
    assert unknown.predicted_step_s == pytest.approx(known.predicted_step_s)
    assert any("NVIDIA B300 is not in trainer/cost.py's CARDS" in n for n in unknown.notes)
    assert not any("CARDS" in n for n in known.notes + slow.notes)


def test_planner_bench_pins_the_knobs_a_row_ran_with_false_included_and_infers_an_unrecorded_offload():
    # Re-planned at 80 GB with the run's knobs pinned, the 0.5B r128 row at its least budget (3.9 GB) was priced
    # without the activation offload it ran with (not recorded then): 3.96 GB of plan against 3.60 at the time.
    import json

    from bench.planner import _pin, ran_knobs

    assert "model.gradient_checkpointing=false" in _pin({"gradient_checkpointing": False})
    assert _pin({"max_num_seqs": 0, "mlp_tile_tokens": 0}) == ["train.mlp_tiles=false"]
    grid = json.loads((ROOT / "bench" / "results" / "planner.json").read_text())
    row = next(r for r in grid["configs"] if r["name"] == "0.5b-vllm-8x4096-r128@3.9gb")
    assert "activation_offload" not in row["knobs"] and ran_knobs(row)["activation_offload"] is True


def test_planner_merge_adds_a_sittings_rows_and_keeps_the_earlier_ones(tmp_path):
    # 2026-12-03: merging one new sitting into bench/results/planner.json dropped every row of the parts not listed
    # again on the command line (13 rows became 2). OUT's rows now stay unless a part replaces them by name.
    import json

    from bench import planner as bench_planner

    def part(path, sitting, names):
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"name": n, "budget_gb": 5.0, "measured_peak_gb": 4.0, "predicted_peak_gb": 4.1, "error_frac": 0.025,
                 "within_budget": True} for n in names]
        path.write_text(json.dumps({"command": sitting, "configs": rows}))
        return path

    out = tmp_path / "planner.json"
    bench_planner.merge(out, [part(tmp_path / "a" / "planner.json", "sitting a", ["x@5gb", "y@5gb"])])
    bench_planner.merge(out, [part(tmp_path / "b" / "planner.json", "sitting b", ["y@5gb", "z@5gb"])])
    rows = {r["name"]: r["sitting"] for r in json.loads(out.read_text())["configs"]}
    assert rows == {"x@5gb": "sitting a", "y@5gb": "sitting b", "z@5gb": "sitting b"}


def test_planner_bench_keeps_the_runs_profile_and_memory_files_beside_its_log(tmp_path):
    # The H200's num_iterations 2 row (2026-12-03) ran its train phase at a third of the grid's rate; its run dir, with
    # the memory series and any TRAINER_PROFILE_STEP tables, stayed on a machine that went back.
    from bench.planner import keep_run_files

    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir(), out.mkdir()
    for f in ("plan.json", "memory.jsonl", "compiles.jsonl", "profile_step5.txt", "metrics.jsonl"):
        (run / f).write_text(f)
    keep_run_files(run, out, "1.5b@10gb")
    assert sorted(p.name for p in out.iterdir()) == ["1.5b@10gb.compiles.jsonl", "1.5b@10gb.memory.jsonl",
                                                      "1.5b@10gb.plan.json", "1.5b@10gb.profile_step5.txt"]
    assert (out / "1.5b@10gb.profile_step5.txt").read_text() == "profile_step5.txt"
    keep_run_files(tmp_path / "never-started", out, "x")  # a run that died before its dir: nothing, no error


def test_planner_rows_record_the_switches_they_ran_under(monkeypatch):
    # a queue runs one config under several switches (2026-12-05: the 7B at 22 GB with and without the parked base
    # or expandable segments): the rows share a name, so each says what it ran under, not the sitting's paths
    from bench.planner import RUN_SWITCHES, switches

    for k in [k for k in os.environ if k.startswith(RUN_SWITCHES)]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TRAINER_PARK_BASE", "1")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("TRAINER_CACHE", "/root/cache")
    assert switches() == {"TRAINER_PARK_BASE": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def test_planner_rows_give_their_steady_step_with_and_without_the_steps_compiling(tmp_path):
    # the H100's A row (2026-12-05): steps 4-5 spent ~10 s compiling the layers, and the steady step (the median of
    # steps 3-5) was 10.5 s against a 1.3 s step; the row now says both, from its metrics' time_compile_s
    import json

    from bench.planner import _write

    row = {"name": "a", "predicted_step_s": 1.0, "step_s": [20.0, 9.0, 1.2, 10.8, 10.6],
           "phase_s": [{"compile": 15.0}, {"compile": 7.5}, {"compile": 0.0}, {"compile": 9.6}, {"compile": 9.5}]}
    old = {"name": "b", "predicted_step_s": 1.0, "step_s": [20.0, 9.0, 1.2, 10.8, 10.6], "phase_s": [{}] * 5}
    _write(tmp_path / "p.json", [row, old], "cmd")
    a, b = json.loads((tmp_path / "p.json").read_text())["configs"]
    assert a["step_s_steady"] == 10.6 and a["step_s_steady_less_compile"] == pytest.approx(1.2)
    assert "step_s_steady_less_compile" not in b  # rows from before CompileWatch: not known


def _plan_with_scratch(monkeypatch, space: dict, sets=()):
    from trainer import plan as plan_mod

    monkeypatch.setattr(plan_mod, "scratch_space", lambda: dict(space))
    return make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["budget.vram_gb=40", *sets]), H100, max_prompt_tokens=100)


def test_a_float32_model_with_vllm_is_refused_before_anything_loads():
    """vLLM 0.26's LoRA shrink kernel asserts float16/bfloat16 activations: a float32 model would stop at the engine's
    LoRA warm-up after its weights loaded. The plan refuses it on the GPU, naming the field; float16 (a T4's) and the
    HF engine in float32 plan."""
    sets = ["budget.vram_gb=40", "rollout.weight_format=shared_nf4"]
    with pytest.raises(UserError) as e:
        make_plan(cfg("qwen2.5-1.5b-instruct"), recipe([*sets, "model.dtype=float32"]), H100)
    assert e.value.field == "model.dtype" and "rollout.engine: hf" in str(e.value)
    assert make_plan(cfg("qwen2.5-1.5b-instruct"), recipe([*sets, "model.dtype=float16"]), H100).nf4_gemm_max_rows
    hf = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe([*sets, "model.dtype=float32", "rollout.engine=hf"]), H100)
    assert hf.compute_dtype == "float32"


def test_the_fused_nf4_gemm_is_planned_by_default_only_on_the_cards_it_won_on():
    """Its tiles were sized for Hopper's shared memory and its A/B against bitsandbytes ran on H100/H200 only: a T4, a
    24 GB Ada card or an unknown card (`--gpu 24`) keeps bitsandbytes' 4-bit path unless the recipe asks for fused."""
    import dataclasses

    sets = ["budget.vram_gb=14", "rollout.weight_format=shared_nf4"]
    t4 = Device("cuda", "Tesla T4", 15_000_000_000, 14_900_000_000, False, capability=(7, 5))
    ada = Device("cuda", "NVIDIA GeForce RTX 4090", 24_000_000_000, 23_500_000_000, True, capability=(8, 9))
    for dev in (t4, ada, Device.elsewhere("24"), dataclasses.replace(H100, capability=None)):
        plan = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(sets), dev)
        assert plan.weight_format == "shared_nf4" and plan.nf4_gemm_max_rows == 0, dev
        assert make_plan(cfg("qwen2.5-1.5b-instruct"), recipe([*sets, "rollout.nf4_gemm=fused"]), dev).nf4_gemm_max_rows
    hopper = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(sets), H100)
    assert hopper.nf4_gemm_max_rows > 0 and hopper.device_capability == (9, 0)
    # from a login node: `--gpu 80:sm90` plans what the H100 itself would; `15:fp16:sm75` is a T4
    remote = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(sets), Device.elsewhere("80:sm90"))
    assert remote.nf4_gemm_max_rows == hopper.nf4_gemm_max_rows and remote.device_capability == (9, 0)
    assert not any("--gpu N:sm90" in n for n in remote.notes)
    assert any("--gpu N:sm90" in n for n in make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(sets),
                                                      Device.elsewhere("80")).notes)
    t4_remote = Device.elsewhere("15:fp16:sm75")
    assert (t4_remote.bf16, t4_remote.capability) == (False, (7, 5))
    with pytest.raises(UserError) as e:
        Device.elsewhere("80:sm9x")
    assert e.value.field == "--gpu" and "sm90" in e.value.fix
    # the closed loop re-plans on the plan's card: its candidates price the same GEMM as the plan did
    from trainer.budget import Loop

    assert Loop(recipe(sets), hopper, config=cfg("qwen2.5-1.5b-instruct")).device.capability == (9, 0)


def test_the_engine_stages_its_files_where_there_is_room_and_the_mirror_only_where_it_fits(monkeypatch):
    """Docker gives a container 64 MB of /dev/shm unless run with --shm-size: the bf16 mirror (3.5 GB for a 1.5B)
    written there would fail with ENOSPC after the weights had loaded. The plan stages in the first scratch directory
    with room, leaves the mirror out where none has room for it (saying so), and refuses a pinned mirror before
    anything loads."""
    roomy = _plan_with_scratch(monkeypatch, {"/dev/shm": 10**12, "/tmp": 10**12})
    assert roomy.weight_format == "bf16_mirror" and roomy.scratch_dir == "/dev/shm"  # the 40 GB plan's choice
    docker = _plan_with_scratch(monkeypatch, {"/dev/shm": 64 * 2**20, "/tmp": 50 * GB})
    assert docker.weight_format == "bf16_mirror" and docker.scratch_dir == "/tmp"
    small = _plan_with_scratch(monkeypatch, {"/dev/shm": 64 * 2**20, "/tmp": 2 * GB})
    assert small.weight_format == "shared_nf4" and small.scratch_dir == "/tmp"  # the adapter alone has room there
    assert any(n.startswith("bf16 mirror not considered: vLLM loads the bf16 mirror's weights") and "/tmp 2.00 GB" in n
               for n in small.notes), small.notes
    with pytest.raises(UserError, match="no scratch directory has room") as e:
        _plan_with_scratch(monkeypatch, {"/dev/shm": 64 * 2**20, "/tmp": 2 * GB}, ["rollout.weight_format=bf16_mirror"])
    assert e.value.field == "rollout.weight_format" and "--shm-size" in e.value.fix
    with pytest.raises(UserError, match="the LoRA adapter from files") as e:
        _plan_with_scratch(monkeypatch, {"/dev/shm": 2**20})
    assert e.value.field == "rollout.engine"


def test_scratch_space_lists_this_machines_writable_scratch_directories(_scratch_room):
    import tempfile

    space = _scratch_room()  # the real trainer.plan.scratch_space
    assert tempfile.gettempdir() in space and all(v >= 0 for v in space.values())
    assert list(space)[0] == ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())


def test_the_checkpoint_in_graph_is_priced_and_chosen_only_where_it_applies():
    # the checkpoint inside the compiled layers keeps ~4 bytes a token x (hidden + intermediate) a layer more than
    # HF's (memory.CKPT_IN_GRAPH_BYTES) and costs a forward's host floor and FLOPs less (trainer/cost.py)
    base = ["train.micro_batch_tokens=512", "model.gradient_checkpointing=true", "train.activation_offload=false",
            "budget.vram_gb=40"]
    hf, ig = (make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(base + [f"train.checkpoint_in_graph={v}"]), H100)
              for v in ("false", "true"))
    assert (hf.checkpoint_in_graph, ig.checkpoint_in_graph) == (False, True)
    d = ModelDims.from_config(cfg("qwen2.5-1.5b-instruct"))
    extra = memory.CKPT_IN_GRAPH_BYTES * d.layers * 512 * (d.hidden + d.intermediate)
    assert ig.components["activations"] - hf.components["activations"] == pytest.approx(extra, abs=d.layers)
    assert ig.phase_peaks["train"] > hf.phase_peaks["train"] and ig.predicted_step_s < hf.predicted_step_s
    # left to the planner at the same knobs, it is taken (faster, and it fits)
    free = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(base), H100)
    assert free.checkpoint_in_graph and free.predicted_step_s == ig.predicted_step_s
    # never where the layers do not compile, nor with offload (its own checkpoint); asked for there: one message
    for o in (["rollout.engine=hf"], ["train.torch_compile=false"]):
        assert not make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(base + o), H100).checkpoint_in_graph
        with pytest.raises(UserError) as e:
            make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(base + o + ["train.checkpoint_in_graph=true"]), H100)
        assert e.value.field == "train.checkpoint_in_graph"
    off = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(base[:-2] + ["train.activation_offload=true",
                                                                       "budget.vram_gb=40"]), H100)
    assert off.activation_offload and not off.checkpoint_in_graph


def test_the_checkpoint_in_graph_runs_measured_on_the_h200_stay_within_their_plans():
    # bench/results/ckpt_in_graph_ab.json (2026-12-05): each config with the checkpoint in graph and without, the
    # trainer's own train-phase peaks over steps 3-6. Re-planned at their knobs with the checkpoint where each ran, the
    # plan holds nvidia-smi's train peak, and the term covers what torch allocated beyond HF's checkpoint.
    from bench.compile_ab import CONFIGS
    from bench.planner import H200

    ab = json.loads((ROOT / "bench" / "results" / "ckpt_in_graph_ab.json").read_text())
    runs = {(r["config"], r["variant"]): r for r in ab["runs"] if r["rc"] == 0}
    measured = 0
    for config in {c for c, _ in runs}:
        if (config, "ckpt_in_graph") not in runs or (config, "default") not in runs:
            continue
        budget, overrides = CONFIGS[config]
        plans = {}
        for variant, on in (("default", "false"), ("ckpt_in_graph", "true")):
            r = load_recipe(ROOT / "bench" / "peers" / "ours.yaml",
                            [*overrides, f"budget.vram_gb={budget}", f"train.checkpoint_in_graph={on}"])
            from trainer.policy import read_config

            plans[variant] = make_plan(read_config(r.model), r, Device(**H200))
            got = runs[(config, variant)]["steady_phase_peaks_gb"]
            assert got["used_train"] * 1e9 <= plans[variant].phase_peaks["train"], (config, variant)
        torch_extra = (runs[(config, "ckpt_in_graph")]["steady_phase_peaks_gb"]["torch_alloc_train"]
                       - runs[(config, "default")]["steady_phase_peaks_gb"]["torch_alloc_train"]) * 1e9
        planned_extra = plans["ckpt_in_graph"].components["activations"] - plans["default"].components["activations"]
        assert torch_extra > 0.1e9 and torch_extra <= planned_extra <= 1.1 * torch_extra, config
        measured += 1
    assert measured >= 2  # two shapes (1.5B, 0.5B)


def test_a_t4_plans_float16_though_torch_can_emulate_bfloat16_there(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on a T4 (sm75) by default: a bf16 tensor can be made there, its matmuls
    emulated. Device.detect asks without emulation, so `model.dtype: auto` plans float16 on the Colab card."""
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (14_500_000_000, 15_800_000_000))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(major=7, minor=5))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda *a: True)  # what a T4 answers
    from trainer import env

    monkeypatch.setattr(env, "host_us_per_op", lambda device: 5.0)  # it would launch kernels on the (absent) card
    assert torch.cuda.is_bf16_supported()  # torch's default: counts the emulation
    t4 = Device.detect()
    assert t4.kind == "cuda" and not t4.bf16 and t4.capability == (7, 5) and t4.host_us_per_op == 5.0
    plan = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["rollout.engine=hf", "budget.vram_gb=14"]), t4)
    assert plan.compute_dtype == "float16" and plan.loss_scaling
    vllm = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["rollout.weight_format=shared_nf4", "budget.vram_gb=14"]), t4)
    assert vllm.compute_dtype == "float16" and vllm.nf4_gemm_max_rows == 0  # bitsandbytes' GEMM on sm75


def test_auto_plans_float16_where_vllm_samples_and_bfloat16_where_the_policy_samples():
    """model.dtype: auto on a bfloat16 card: float16 with vLLM (its logprobs and the trainer's round 8x finer than in
    bfloat16: the sampler/trainer gap, trainer/plan.py FLOAT16_WHERE_VLLM_SAMPLES), its loss scaled and the choice
    said in a note; HF rollouts sample with the policy itself, so bfloat16; a dtype the recipe names is kept."""
    h100 = Device.elsewhere("80:sm90")
    assert h100.bf16
    vllm = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["budget.vram_gb=20"]), h100)
    assert (vllm.rollout_engine, vllm.compute_dtype, vllm.loss_scaling) == ("vllm", "float16", True)
    assert any(n.startswith("model.dtype auto: float16") and "again in bfloat16" in n for n in vllm.notes)
    hf = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["rollout.engine=hf", "budget.vram_gb=20"]), h100)
    assert (hf.compute_dtype, hf.loss_scaling) == ("bfloat16", False)
    assert not any(n.startswith("model.dtype auto") for n in hf.notes)
    named = make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["model.dtype=bfloat16", "budget.vram_gb=20"]), h100)
    assert (named.compute_dtype, named.loss_scaling) == ("bfloat16", False)
    assert not any(n.startswith("model.dtype auto") for n in named.notes)


def test_the_plan_records_how_fast_this_host_dispatches_small_ops():
    """env.host_us_per_op times the ops themselves (a dispatch slowed by 200 us an op reads at least that), and
    Device.detect puts it in the plan, where bench/planner.py's rows pick it up for the step model's fit."""
    import time

    from torch.overrides import TorchFunctionMode

    from trainer.env import host_us_per_op

    class Slow(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            time.sleep(2e-4)
            return func(*args, **(kwargs or {}))

    fast = host_us_per_op()
    with Slow():
        slow = host_us_per_op(ops=16, rounds=2)
    assert 0 < fast < 200 <= slow, (fast, slow)
    device = Device.detect()
    assert device.host_us_per_op and device.host_us_per_op < 200
    assert make_plan(cfg("qwen2.5-1.5b-instruct"), recipe(["rollout.engine=hf"]), device).host_us_per_op == \
        device.host_us_per_op


def test_masks_for_the_compiled_layers_are_planned_where_one_micro_batch_holds_the_step(monkeypatch):
    """plan.compile_masks (trainer/compile_shapes.py "mask_always"), on the shapes of the A/Bs behind it (one H100,
    2026-12-06): on for the 0.5B's 16 x 2,048 at 9 GB and the 16 x 64 mirror row (one micro-batch a step beside the
    reference pass, beta 0.04: compiling 65.1 -> 41.2 s and 58.1 -> 20.8 s, the steady train phase the same); off for
    config A at 6.6 GB (one micro-batch, the train pass alone: one graph fewer, 18.6 -> 17.4 s, against ~+3% every
    step), on there with beta or num_iterations 2; off for config B at 14.5 GB (eight micro-batches a step: +2.4% a
    step), off where a step is split however small, and where nothing compiles. Planned as those A/Bs ran, without
    the train phase's CUDA graphs (on by default since 2026-12-08, where A at 6.6 GB takes four rows a micro-batch)."""
    from bench.planner import CONFIGS, _plan
    from trainer import plan as planner

    assert _plan(CONFIGS["1.5b-vllm-8x256"][0], 6.6)[0].train_cudagraphs
    monkeypatch.setattr(planner, "CUDAGRAPHS", False)

    def planned(name, budget, extra=()):
        plan, _ = _plan(CONFIGS[name][0] + list(extra), budget)
        one = plan.micro_batch_tokens >= plan.generation_batch_size * plan.max_model_len
        return plan.compile_masks, one, plan.compile_layers

    assert planned("0.5b-vllm-16x2048-r64-beta", 9.0) == (True, True, True)
    assert planned("1.5b-vllm-mirror-16x64-beta", 5.7) == (True, True, True)
    assert planned("1.5b-vllm-8x256", 6.6) == (False, True, True)  # the train pass alone
    assert planned("1.5b-vllm-8x256", 6.6, ["grpo.beta=0.04"]) == (True, True, True)
    assert planned("1.5b-vllm-8x256", 6.6, ["grpo.num_iterations=2"]) == (True, True, True)
    assert planned("1.5b-vllm-mirror-64x512", 14.5) == (False, False, True)
    assert planned("1.5b-vllm-8x256", 3.2, ["grpo.beta=0.04"]) == (False, False, True)  # one sequence a micro-batch
    assert planned("1.5b-vllm-8x256", 6.6, ["grpo.beta=0.04", "train.micro_batch_tokens=1144"]) == (False, False, True)
    assert planned("1.5b-vllm-8x256", 6.6, ["grpo.beta=0.04", "train.per_device_train_batch_size=8"])[0] is False
    assert planned("1.5b-hf-8x512-r64", 6.0, ["grpo.beta=0.04"])[::2] == (False, False)  # HF: nothing compiled
    assert planned("1.5b-vllm-8x256", 6.6, ["grpo.beta=0.04", "train.torch_compile=false"])[0] is False
    # and `--plan` says so
    from rich.console import Console

    from trainer.console import show_plan

    said = []
    for extra in (["grpo.beta=0.04"], []):
        console = Console(record=True, width=400)
        show_plan(console, _plan(CONFIGS["1.5b-vllm-8x256"][0] + extra, 6.6)[0])
        said.append("attention masks always: one micro-batch a step beside a no-grad pass" in console.export_text())
    assert said == [True, False]


def test_cuda_graphs_are_a_candidate_unless_turned_off_and_only_where_they_apply(monkeypatch):
    # plan.CUDAGRAPHS (on unless TRAINER_COMPILE_CUDAGRAPHS=0) adds candidates whose compiled layers replay from CUDA
    # graphs, priced by cost.GRAPHED_LAYER_FLOOR_S; HF's checkpoint around graphed layers re-recorded every pass on an
    # H100 (2026-12-07), so only the checkpoint inside the layers, or none, takes them (plan.cudagraphs_apply)
    from trainer import plan as planner
    from trainer.plan import cudagraphs_apply, free_runtime_knobs, runtime_candidates

    base = ["train.micro_batch_tokens=512", "model.gradient_checkpointing=true", "train.activation_offload=false",
            "budget.vram_gb=40"]
    c15 = cfg("qwen2.5-1.5b-instruct")
    graphed = make_plan(c15, recipe(base), H100)  # the default
    monkeypatch.setattr(planner, "CUDAGRAPHS", False)
    plain = make_plan(c15, recipe(base), H100)
    assert not plain.train_cudagraphs and not any("CUDAGRAPHS" in n for n in plain.notes)
    monkeypatch.setattr(planner, "CUDAGRAPHS", True)
    assert graphed.train_cudagraphs and graphed.checkpoint_in_graph
    assert graphed.predicted_phases_s["train"] < plain.predicted_phases_s["train"]
    assert graphed.predicted_phases_s["rollout"] == plain.predicted_phases_s["rollout"]
    loop = runtime_candidates(c15, recipe(base), graphed, H100, free_runtime_knobs(recipe(base), graphed))
    assert loop and all(c["train_cudagraphs"] and cudagraphs_apply(c) for c in loop)  # the loop keeps to them
    hf = make_plan(c15, recipe(base + ["train.checkpoint_in_graph=false"]), H100)
    assert not hf.train_cudagraphs and any("cudagraphs_apply" in n for n in hf.notes)
    for o in (["rollout.engine=hf"], ["train.torch_compile=false"]):
        p = make_plan(c15, recipe(base + o), H100)  # nothing to say where graphs were never a candidate ...
        assert not p.train_cudagraphs and not any("CUDAGRAPHS" in n for n in p.notes)
        monkeypatch.setattr(planner, "CUDAGRAPHS_ASKED", True)  # ... unless TRAINER_COMPILE_CUDAGRAPHS=1 asked
        p = make_plan(c15, recipe(base + o), H100)
        assert not p.train_cudagraphs and any("not compiled on a GPU" in n for n in p.notes)
        monkeypatch.setattr(planner, "CUDAGRAPHS_ASKED", False)
    knobs = {"gradient_checkpointing": True, "checkpoint_in_graph": True, "activation_offload": False,
             "mlp_tile_tokens": 0}
    assert cudagraphs_apply(knobs) and cudagraphs_apply({**knobs, "gradient_checkpointing": False})
    assert not cudagraphs_apply({**knobs, "checkpoint_in_graph": False})
    assert not cudagraphs_apply({**knobs, "activation_offload": True})
    assert not cudagraphs_apply({**knobs, "mlp_tile_tokens": 4096})
    # one long sequence a micro-batch: compute-bound, and padded (trainer/graph_lengths.py) it would need a mask
    assert not cudagraphs_apply({**knobs, "micro_batch_seqs": 1, "micro_batch_tokens": 16384})
    assert cudagraphs_apply({**knobs, "micro_batch_seqs": 1, "micro_batch_tokens": 512})  # the user's one a batch
    ctx = SimpleNamespace(max_len=512)
    assert memory.attention_mask_bytes(ctx, {"micro_batch_seqs": 1, "micro_batch_tokens": 512}) == 0
    assert memory.attention_mask_bytes(ctx, {"micro_batch_seqs": 1, "micro_batch_tokens": 512,
                                             "train_cudagraphs": True}) == 512 * 512


def test_the_in_graph_checkpoint_recomputing_every_op_is_priced_at_hfs_memory_unless_turned_off(monkeypatch):
    # plan.RECOMPUTE_ALL (on unless TRAINER_CKPT_RECOMPUTE_ALL=0): in-graph candidates whose checkpoint recomputes the
    # 4-bit matmuls too, at HF's checkpoint's bytes (no memory.CKPT_IN_GRAPH_BYTES term). With CUDA graphs (on by
    # default too), config A at 3.3 GB (the one point priced above its peer, issue 26) takes both: graphs need the
    # checkpoint inside the layers, which did not fit there before.
    from trainer import plan as planner
    from trainer.plan import _candidates, free_runtime_knobs, plan_context, runtime_candidates

    c15 = cfg("qwen2.5-1.5b-instruct")
    base = ["train.micro_batch_tokens=512", "model.gradient_checkpointing=true", "train.activation_offload=false",
            "budget.vram_gb=40"]
    r = recipe(base)
    ctx = plan_context(c15, r, make_plan(c15, r, H100), H100)
    monkeypatch.setattr(planner, "RECOMPUTE_ALL", False)
    assert not any(c["checkpoint_recompute_all"] for c in _candidates(r, ctx, H100))
    monkeypatch.setattr(planner, "RECOMPUTE_ALL", True)
    cands = [c for c in _candidates(r, ctx, H100) if c["weight_format"] == "shared_nf4" and not c["kv_release"]
             and c["logits_dtype"] == "model" and c["sync"] == "inplace"]
    by = {(c["checkpoint_in_graph"], c["checkpoint_recompute_all"]): c for c in cands}
    assert set(by) == {(False, False), (True, False), (True, True)}
    hf, ig, every = by[False, False], by[True, False], by[True, True]
    assert every["components"]["activations"] == hf["components"]["activations"] < ig["components"]["activations"]
    assert every["predicted_phases_s"]["train"] <= hf["predicted_phases_s"]["train"]  # the in-graph launches
    ours = ROOT / "bench" / "peers" / "ours.yaml"
    a = load_recipe(ours, ["budget.vram_gb=3.3"])
    monkeypatch.setattr(planner, "CUDAGRAPHS", False)
    assert not make_plan(c15, a, H100).checkpoint_recompute_all  # without graphs: HF's checkpoint and offload
    monkeypatch.setattr(planner, "CUDAGRAPHS", True)
    # as `train` plans it, from the benchmark data's longest prompt (23 tokens: 279-token sequences); at the field's
    # 128 (384-token sequences) the trees' pool (memory.TRAIN_GRAPH_POOL_BYTES) leaves 3.3 GB to HF's checkpoint
    both = make_plan(c15, a, H100, max_prompt_tokens=23)
    assert both.train_cudagraphs and both.checkpoint_in_graph and both.checkpoint_recompute_all
    assert both.peak_bytes + memory.BUDGET_HEADROOM <= 3.3e9
    assert both.components["train_cuda_graphs"] == int(memory.TRAIN_GRAPH_POOL_BYTES * 28 * 279 * 1536)
    assert not make_plan(c15, a, H100).train_cudagraphs  # at the field's 128-token prompts
    loop = runtime_candidates(c15, a, both, H100, free_runtime_knobs(a, both))
    assert loop and all(c["checkpoint_recompute_all"] and c["train_cudagraphs"] for c in loop)


def test_graphs_are_granted_only_where_they_stay_ahead_with_completions_half_as_long(monkeypatch):
    """Graphed micro-batches are padded to the cap in fixed row counts (trainer/graph_lengths.py), so shorter sampled
    completions make them no cheaper, while packed ones get fewer and shorter. Config B (64 x 512) at 14.5 GB: graphs
    are predicted faster at the cap but not with completions half as long, so the plan keeps none and says why; config
    A's launch-bound micro-batches keep them at 6.6 and 3.3 GB. Priced at the cap alone, B would take them."""
    from trainer import plan as planner

    c15, ours = cfg("qwen2.5-1.5b-instruct"), ROOT / "bench/peers/ours.yaml"
    b = ["budget.vram_gb=14.5", "train.generation_batch_size=64", "grpo.max_completion_length=512"]

    def plan(sets):
        return make_plan(c15, load_recipe(ours, sets), H100, max_prompt_tokens=23)

    for budget in (6.6, 3.3):
        assert plan([f"budget.vram_gb={budget}"]).train_cudagraphs, budget
    kept = plan(b)
    assert not kept.train_cudagraphs
    assert any("with completions half as long" in n for n in kept.notes), kept.notes
    monkeypatch.setattr(planner, "GRAPHS_SHORT_COMPLETIONS", 1.0)  # the cap's lengths only: what the check adds
    at_cap = plan(b)
    assert at_cap.train_cudagraphs and at_cap.predicted_step_s < kept.predicted_step_s

def test_the_train_graphs_pool_covers_what_the_h100_measured_it_to_hold(monkeypatch):
    """memory.TRAIN_GRAPH_POOL_BYTES against the A/Bs that measured it (one H100 each, 2026-12-07 16:27 and 21:30,
    train_cudagraphs_ab.json): A-mb286 with and without the train phase's CUDA graphs, nvidia-smi's steady peaks of
    each phase apart. Each graphed run's peaks are within the plan today's formulas make for it; the pool term is at
    least the first sitting's difference and not 25% above it (the second's default run drew 0.07 GB less than the
    first's, the graphed runs within 0.02 of each other: the difference 0.134 is the default's cache). And config A at
    3.3 GB with graphs + the in-graph checkpoint recomputing every op (small_graphs_ab.json, 21:25) under its plan;
    and 2026-12-08's (queue_2026-12-08/a): the 1.5B's sampled lengths padded to one, and the 0.5B shape, whose
    with/without difference (0.109 GB in both phases) is above its pool term (0.040) but inside its plan's peak."""
    from trainer import plan as planner

    for found, config, switch in (("2026-12-07/g/compile", "A-mb286", "train_cudagraphs"),
                                  ("2026-12-07/h/compile.2", "A-mb286", "train_cudagraphs"),
                                  ("2026-12-07/h/compile", "A-small", "small_graphs"),
                                  ("2026-12-08/a/compile", "A-mb286-mix", "train_cudagraphs"),
                                  ("2026-12-08/a/compile", "0.5b-mb286", "train_cudagraphs")):
        c = cfg("qwen2.5-0.5b-instruct" if config.startswith("0.5b") else "qwen2.5-1.5b-instruct")
        # as the runs' environment had it: graphs asked for, recompute-all only in small_graphs
        monkeypatch.setattr(planner, "RECOMPUTE_ALL", switch == "small_graphs")
        ab = json.loads((ROOT / f"bench/results/queue_{found}/{switch}_ab.json").read_text())
        by = {r["variant"]: r for r in ab["runs"] if r["config"] == config and r["rc"] == 0}
        sets = [s.strip() for s in by[switch]["command"].split("--set ")[1:]]
        plan = make_plan(c, load_recipe(ROOT / "bench/peers/ours.yaml", sets), H100, max_prompt_tokens=23)
        assert plan.train_cudagraphs and plan.checkpoint_recompute_all == (switch == "small_graphs")
        assert plan.micro_batch_tokens == (279 if switch == "small_graphs" else 286)  # the runs' plan.json
        # nvidia-smi's whole-run peak and each phase's: under the plan's peak (the rollout phase's device peak holds
        # what torch kept cached from the train phase before it)
        for held in [by[switch]["peak_gb"]] + [by[switch]["steady_phase_peaks_gb"][f"used_{p}"] for p in ("rollout", "train")]:
            assert held <= plan.peak_bytes / 1e9, (found, held, plan.peak_bytes)
        if found == "2026-12-07/g/compile":
            pool = plan.components["train_cuda_graphs"] / 1e9
            for phase in ("rollout", "train"):
                grew = (by[switch]["steady_phase_peaks_gb"][f"used_{phase}"]
                        - by["default"]["steady_phase_peaks_gb"][f"used_{phase}"])
                assert 0 < grew <= pool <= 1.25 * grew, (phase, grew, pool)
