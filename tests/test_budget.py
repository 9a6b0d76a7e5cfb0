"""The budget kept at run time (trainer/budget.py): torch's allocator is capped at the budget less what torch does not
allocate; measured peaks above plan re-plan the runtime knobs through the planner's own candidates, slack buys speed
only with budget.adapt: speed and never past the budget; an OOM retries the step once, one notch smaller."""
from __future__ import annotations

import json
import math
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tests.conftest import ROOT, run_train, tiny_qwen2
from trainer import budget, memory, oom
from trainer.budget import HEADROOM, TOLERANCE, Loop
from trainer.errors import UserError
from trainer.memory import GB
from trainer.plan import Device, make_plan, plan_context, plan_knobs
from trainer.recipe import load_recipe

H100 = Device("cuda", "NVIDIA H100 80GB HBM3", 85_000_000_000, 84_000_000_000, True, capability=(9, 0))
CFG = json.loads((ROOT / "tests" / "data" / "models" / "qwen2.5-1.5b-instruct.json").read_text())


def recipe(overrides=()):
    return load_recipe(ROOT / "bench" / "recipes" / "toy-digits-1.5b-vllm.yaml",
                       ["rollout.weight_format=", "rollout.kv_release=", "train.generation_batch_size=64",
                        "grpo.max_completion_length=256", "data.max_prompt_length=128",
                        # the notches of these tests are micro-batch and checkpointing; offload's are in
                        # tests/test_long_context.py
                        "train.activation_offload=false", *overrides])


def setup(overrides=(), device=H100, **kw):
    r = recipe(overrides)
    p = make_plan(CFG, r, device)
    return r, p, Loop(r, p, config=CFG, world_size=device.world_size, **kw)


def peaks(rollout: float, train: float) -> dict:
    """State.peaks as the loop records them: device memory used per sub-phase, and torch's allocated peaks."""
    return {"used_kv": 0.9 * rollout, "used_rollout": rollout, "used_reward": 0.6 * train, "used_recompute": 0.7 * train,
            "used_train": train, "used_optimizer": 0.8 * train, "used_sync": 0.8 * train,
            "torch_alloc_rollout": 0.5 * rollout, "torch_alloc_train": 0.5 * train}


def state(loop: Loop, measured: dict) -> types.SimpleNamespace:
    """The loop's view of grpo.State: the phase running, finished phases, the optimizer and the step's peaks."""
    param = torch.nn.Parameter(torch.zeros(3))
    return types.SimpleNamespace(phase="", times={}, peaks=measured, optimizer=torch.optim.SGD([param], lr=0.1),
                                 param=param)


# ---------------------------------------------------------------------------------------------- the hard cap


def test_cap_is_the_budget_less_what_torch_does_not_allocate():
    _, p, _ = setup(["budget.vram_gb=6"])
    assert p.allocator_cap_bytes == int(6 * GB) - memory.CUDA_CONTEXT - memory.VLLM_NON_TORCH
    assert p.allocator_fraction == pytest.approx(p.allocator_cap_bytes / H100.total_bytes, rel=1e-12)
    assert p.allocator_cap_bytes >= max(p.phase_peaks.values()) - memory.CUDA_CONTEXT - memory.VLLM_NON_TORCH
    from dataclasses import replace

    two = make_plan(CFG, recipe(["budget.vram_gb=8"]), replace(H100, world_size=2))
    assert two.allocator_cap_bytes == int(8 * GB) - memory.CUDA_CONTEXT - memory.VLLM_NON_TORCH - memory.DISTRIBUTED
    hf = make_plan(CFG, recipe(["budget.vram_gb=6", "rollout.engine=hf"]), H100)
    assert hf.allocator_cap_bytes == int(6 * GB) - memory.CUDA_CONTEXT - memory.HF_NON_TORCH
    # No budget, or no GPU: no cap.
    assert make_plan(CFG, recipe(["budget.vram_gb="]), H100).allocator_fraction is None
    cpu = make_plan(CFG, recipe(["budget.vram_gb=6", "rollout.engine=hf"]), Device("cpu"))
    assert cpu.allocator_cap_bytes is None and cpu.allocator_fraction is None


def test_the_engine_reports_kv_release_and_remap_to_the_cap():
    from trainer.rollout.vllm import VLLMEngine

    seen = []
    eng = VLLMEngine.__new__(VLLMEngine)  # the release/acquire bookkeeping only: no vLLM is started
    eng.plan, eng.llm, eng.kv_released = types.SimpleNamespace(kv_release=True), object(), False
    eng.vi = types.SimpleNamespace(release_kv=lambda llm: 123, restore_kv=lambda llm: None)
    eng.on_kv_change = seen.append
    eng.release()
    eng.release()  # already released: nothing more
    eng.acquire()
    assert seen == [123, 0] and not eng.kv_released


def test_the_run_caps_the_allocator_before_the_engine_or_weights_load(monkeypatch, tmp_path):
    from trainer import distributed, grpo

    order = []

    class Stop(Exception):
        pass

    def engine(*a):
        order.append("engine")
        raise Stop

    monkeypatch.setattr(grpo.Cap, "apply", lambda self: order.append(("cap", self.plan.budget_bytes)))
    monkeypatch.setattr(grpo, "make_engine", engine)
    from trainer.shapes import config_dict

    r = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["budget.vram_gb=1"])
    p = make_plan(config_dict("tiny"), r, Device("cpu"))
    from trainer.api import inputs

    tokenizer, prompts, rewards, evaluator, _ = inputs(r)
    with pytest.raises(Stop):
        grpo.run(r, p, tmp_path, distributed.World(), tokenizer=tokenizer, prompts=prompts, rewards=rewards,
                 evaluator=evaluator)
    assert order == [("cap", int(1 * GB)), "engine"]


# ---------------------------------------------------------------------------------------------- re-planning


@pytest.mark.parametrize("over", [["budget.vram_gb=6"], ["budget.vram_gb=6", "rollout.engine=hf",
                                                         "train.generation_batch_size=32"], ["budget.vram_gb=12"]])
def test_the_loop_replans_with_the_planners_own_numbers(over):
    """The context rebuilt from the plan gives back the plan's bytes, and the plan is one of the loop's candidates."""
    r, p, loop = setup(over)
    comps, phases = memory.components(plan_context(CFG, r, p, H100), plan_knobs(p))
    assert comps == p.components and phases == p.phase_peaks
    assert loop.current()["phase_peaks"] == p.phase_peaks


def test_within_plan_nothing_changes():
    _, p, loop = setup(["budget.vram_gb=6"])
    before = plan_knobs(p)
    lines = loop.after_step(0, peaks(p.phase_peaks["rollout"] * (1 + TOLERANCE * 0.9),
                                     p.phase_peaks["train"] * (1 + TOLERANCE * 0.9)), worst=True)
    assert lines == [] and loop.pending == [] and plan_knobs(p) == before


def test_a_train_phase_above_plan_gets_the_fastest_knobs_that_fit_with_the_measured_error():
    r, p, loop = setup(["budget.vram_gb=6"])
    planned, knobs = p.phase_peaks["train"], plan_knobs(p)
    lines = loop.after_step(0, peaks(p.phase_peaks["rollout"], 1.08 * planned), worst=True)
    assert (p.micro_batch_tokens < knobs["micro_batch_tokens"] or p.gradient_checkpointing != knobs["gradient_checkpointing"]
            or p.activation_offload != knobs["activation_offload"])
    new = memory.components(plan_context(CFG, r, p, H100), plan_knobs(p))[1]
    assert 1.08 * new["train"] <= planned  # the new knobs fit the plan with the measured 8% included
    # ... and no faster candidate does: the planner's speed score decides among those that fit
    fits = [c for c in loop.candidates if c["weight_format"] == p.weight_format and 1.08 * c["phase_peaks"]["train"] <= planned]
    assert loop.current()["score"] == max(c["score"] for c in fits)
    assert p.phase_peaks["train"] == planned  # the plan's prediction stays for summary.json's comparison
    assert len(lines) == 1 and "train phase measured" in lines[0] and "+8.0%" in lines[0]
    assert any(f in lines[0] for f in ("train.micro_batch_tokens", "model.gradient_checkpointing",
                                       "train.activation_offload"))
    a = loop.pending[0]
    assert (a.step, a.phase, a.reason) == (1, "train", "over plan")
    assert a.measured_gb == pytest.approx(1.08 * planned / GB) and a.planned_gb == pytest.approx(planned / GB)
    assert a.old == knobs[a.knob] and a.new == getattr(p, a.knob) and a.expected_gb <= planned / GB
    # The next step measures what the corrected prediction said: within plan, nothing more changes.
    loop.pending.clear()
    assert loop.after_step(1, peaks(p.phase_peaks["rollout"], 1.08 * new["train"])) == [] and loop.pending == []


def test_a_rollout_phase_above_plan_shrinks_the_hf_batch():
    _, p, loop = setup(["budget.vram_gb=6", "rollout.engine=hf", "train.generation_batch_size=32"])
    bs, planned = p.hf_batch_size, p.phase_peaks["rollout"]
    loop.after_step(0, peaks(1.2 * planned, p.phase_peaks["train"]), worst=True)
    assert p.hf_batch_size < bs and [a.knob for a in loop.pending] == ["hf_batch_size"]
    assert 1.2 * loop.current()["phase_peaks"]["rollout"] <= planned


def test_no_runtime_knob_left_is_said_once_with_the_recipe_fix():
    # vLLM's rollout phase is sized when the engine starts: nothing to change between steps.
    _, p, loop = setup(["budget.vram_gb=6"])
    knobs = plan_knobs(p)
    lines = loop.after_step(0, peaks(1.2 * p.phase_peaks["rollout"], p.phase_peaks["train"]))
    assert len(lines) == 1 and "no runtime knob is left" in lines[0] and "rollout.max_num_batched_tokens" in lines[0]
    assert loop.after_step(1, peaks(1.2 * p.phase_peaks["rollout"], p.phase_peaks["train"])) == []
    assert plan_knobs(p) == knobs and loop.pending == []


def test_knobs_the_user_set_are_never_changed():
    _, p, loop = setup(["budget.vram_gb=6", "train.micro_batch_tokens=6144", "model.gradient_checkpointing=true",
                        "rollout.kv_release=true"])
    knobs = plan_knobs(p)
    lines = loop.after_step(0, peaks(p.phase_peaks["rollout"], 1.3 * p.phase_peaks["train"]))
    assert plan_knobs(p) == knobs and "no runtime knob is left" in lines[0] and "train.micro_batch_tokens" in lines[0]


def test_adapt_speed_spends_measured_slack_after_the_worst_case_step_within_the_budget():
    r, p, loop = setup(["budget.vram_gb=5", "budget.adapt=speed"])
    score, measured = loop.current()["score"], peaks(0.7 * p.phase_peaks["rollout"], 0.7 * p.phase_peaks["train"])
    assert loop.after_step(3, measured, worst=False) == []  # a later step's shapes are not the worst case
    lines = loop.after_step(0, measured, worst=True)
    assert loop.current()["score"] > score and {a.reason for a in loop.pending} == {"slack"}
    assert "adapt: speed" in lines[0]
    for phase, raw in loop.current()["phase_peaks"].items():
        assert loop.expected(phase, raw) <= 5 * GB * (1 - HEADROOM)
    # Off (the default), the same slack changes nothing.
    _, p2, off = setup(["budget.vram_gb=5"])
    assert off.after_step(0, peaks(0.7 * p2.phase_peaks["rollout"], 0.7 * p2.phase_peaks["train"]), worst=True) == []


def test_adapt_speed_keeps_a_phase_above_plan_that_is_within_the_budget():
    _, p, loop = setup(["budget.vram_gb=12", "budget.adapt=speed", "train.micro_batch_tokens=6144"])
    knobs = plan_knobs(p)
    assert p.phase_peaks["train"] * 1.1 < 12 * GB * (1 - HEADROOM)
    assert loop.after_step(2, peaks(p.phase_peaks["rollout"], 1.1 * p.phase_peaks["train"])) == []
    assert plan_knobs(p) == knobs
    _, p, off = setup(["budget.vram_gb=12", "train.micro_batch_tokens=6144"])  # off: the plan is the promise
    lines = off.after_step(2, peaks(p.phase_peaks["rollout"], 1.1 * p.phase_peaks["train"]))
    assert "train phase measured" in lines[0]  # above plan: re-planned (here nothing the recipe leaves free is left)


def test_a_measured_peak_above_the_budget_is_replanned_even_within_tolerance(monkeypatch):
    from trainer import memory

    monkeypatch.setattr(memory, "BUDGET_HEADROOM", 0)  # a plan that fills its budget to the byte
    _, first, _ = setup(["budget.vram_gb=5.0"])
    budget = math.ceil(first.phase_peaks["train"] / 1e7) / 100  # GB: that plan's train phase, rounded up to 10 MB
    _, p, loop = setup([f"budget.vram_gb={budget}"])
    assert p.phase_peaks["train"] > budget * GB / (1 + TOLERANCE)  # the plan fills the budget
    knobs, seen = plan_knobs(p), (budget + 0.01) * GB
    loop.after_step(0, peaks(p.phase_peaks["rollout"], seen))
    assert plan_knobs(p) != knobs and loop.current()["phase_peaks"]["train"] * seen / p.phase_peaks["train"] <= budget * GB


@settings(max_examples=30, deadline=None)
@given(ratio=st.floats(0.3, 1.3), budget_gb=st.floats(5.5, 30.0))
def test_adapt_speed_never_plans_past_the_budget(ratio, budget_gb):
    """Whatever the planner's error (measured = ratio x planned), the knobs in force are expected within the budget,
    or are the smallest there are."""
    try:
        _, p, loop = setup([f"budget.vram_gb={budget_gb}", "budget.adapt=speed"])
    except UserError:
        return
    for step in range(3):
        cur = loop.current()["phase_peaks"]
        loop.after_step(step, peaks(ratio * cur["rollout"], ratio * cur["train"]), worst=step == 0)
        now = loop.current()["phase_peaks"]
        smallest = min(max(loop.expected(q, c["phase_peaks"][q]) for q in now) for c in loop.candidates)
        assert max(loop.expected(q, now[q]) for q in now) <= max(budget_gb * GB, smallest)


def test_a_checkpoint_keeps_the_knobs_in_force_and_resume_restores_them():
    _, p, loop = setup(["budget.vram_gb=6"])
    loop.after_step(0, peaks(p.phase_peaks["rollout"], 1.1 * p.phase_peaks["train"]))
    saved = json.loads(json.dumps(loop.state()))  # state.json
    _, p2, again = setup(["budget.vram_gb=6"])
    assert plan_knobs(p2) != plan_knobs(p)
    again.restore(saved)
    assert plan_knobs(p2) == plan_knobs(p) and again.anchor == loop.anchor
    _, p3, other = setup(["budget.vram_gb=6"])
    knobs = plan_knobs(p3)
    other.restore({"knobs": {"micro_batch_tokens": 12345, "token_chunk": 12345}})  # not a candidate: the recipe changed
    assert plan_knobs(p3) == knobs


def test_knob_changes_reach_the_live_policy_and_engine():
    from peft import LoraConfig, get_peft_model

    from trainer.policy import Policy
    from trainer.rollout.hf import HFEngine

    model = get_peft_model(tiny_qwen2(), LoraConfig(r=4, target_modules="all-linear"))
    policy = Policy(model, None, torch.device("cpu"), torch.float32, False, None)
    _, p, loop = setup(["budget.vram_gb=80", "rollout.engine=hf"], policy=policy, engine=HFEngine(64))
    loop.engine.batch_size = p.hf_batch_size
    assert not p.gradient_checkpointing and not model.get_base_model().is_gradient_checkpointing
    changes = loop.after_oom(4, "train")  # one notch: checkpointing on is the planner's least slow smaller setting
    assert [(a.knob, a.new) for a in changes] == [("gradient_checkpointing", True)]
    assert model.get_base_model().is_gradient_checkpointing
    bs = p.hf_batch_size
    assert [(a.knob, a.new) for a in loop.after_oom(4, "rollout")] == [("hf_batch_size", bs // 2)]
    assert loop.engine.batch_size == bs // 2


def test_an_oom_notch_is_one_knob_smaller_in_the_phase_that_ran_out(monkeypatch):
    from trainer import plan as planner

    _, p, loop = setup(["budget.vram_gb=6", "model.gradient_checkpointing=true"])
    mbt = p.micro_batch_tokens
    changes = loop.after_oom(2, "recompute")
    assert {a.knob for a in changes} == {"micro_batch_tokens", "token_chunk"} and p.micro_batch_tokens == mbt // 2
    assert {a.reason for a in changes} == {"out of memory"} and changes[0].measured_gb is None
    assert loop.after_oom(2, "optimizer") == [] and loop.after_oom(2, "kv") == []
    # the checkpoint in graph keeps more than HF's: putting HF's back is the notch, then nothing the recipe leaves
    # free is smaller (KV already released). Without the train phase's CUDA graphs (on by default since 2026-12-08),
    # which need the checkpoint inside the layers and hold the plan's choice: with them the notch is not there
    sets = ["budget.vram_gb=6", "model.gradient_checkpointing=true", "train.micro_batch_tokens=384",
            "rollout.weight_format=shared_nf4"]
    _, p, graphed = setup(sets)
    assert p.train_cudagraphs and p.checkpoint_in_graph and graphed.after_oom(2, "train") == []
    monkeypatch.setattr(planner, "CUDAGRAPHS", False)
    _, p, small = setup(sets)
    assert p.checkpoint_in_graph
    assert [(a.knob, a.old, a.new) for a in small.after_oom(2, "train")] == [("checkpoint_in_graph", True, False)]
    assert not p.checkpoint_in_graph and small.after_oom(3, "train") == []


# ---------------------------------------------------------------------------------------------- the step wrapper


def test_run_step_adds_the_loops_metrics_and_notes(monkeypatch):
    _, p, loop = setup(["budget.vram_gb=6"])
    notes = []
    s = state(loop, peaks(p.phase_peaks["rollout"], 1.1 * p.phase_peaks["train"]))
    m = loop.run_step(s, 0, lambda: {"loss": 0.5}, notes.append)
    assert m["budget/adjustments"] == len(m["budget/changes"]) >= 1 and m["budget/retries"] == 0
    assert m["budget/train_error"] == pytest.approx(0.1) and "budget/rollout_error" in m
    assert {"step", "phase", "reason", "measured_gb", "planned_gb", "expected_gb", "knob", "old", "new"} <= m["budget/changes"][0].keys()
    assert len(notes) == 1 and notes[0].startswith("budget: train phase measured")
    s.peaks = peaks(p.phase_peaks["rollout"], p.phase_peaks["train"])
    m = loop.run_step(s, 1, lambda: {"loss": 0.5}, notes.append)
    assert m["budget/adjustments"] == 0 and "budget/changes" not in m and len(notes) == 1


def _oom_step(s, step, seen):
    """A step that draws from torch's RNG and records the gradient it starts from, then may hit the OOM hook."""
    def fn():
        seen.append((torch.rand(1).item(), None if s.param.grad is None else s.param.grad.clone()))
        s.param.grad = torch.ones(3)
        s.phase = "train"
        oom.test_hook("train", step)
        return {"loss": 0.0}
    return fn


@pytest.fixture
def one_oom(monkeypatch):
    monkeypatch.setattr(oom, "_raised", 0)
    for k, v in {"TRAINER_TEST_OOM_PHASE": "train", "TRAINER_TEST_OOM_STEP": "3", "TRAINER_TEST_OOM_COUNT": "1"}.items():
        monkeypatch.setenv(k, v)


def test_an_oom_retries_the_step_once_from_the_same_state(one_oom):
    _, p, loop = setup(["budget.vram_gb=6"])
    s, seen, notes = state(loop, {}), [], []
    mbt = p.micro_batch_tokens
    m = loop.run_step(s, 2, _oom_step(s, 2, seen), notes.append)
    assert m["budget/retries"] == 1 and p.micro_batch_tokens == mbt // 2  # checkpointing is already on
    assert len(seen) == 2 and seen[1][0] == seen[0][0]  # the same random draws
    assert seen[1][1] is None  # the failed attempt's gradients were zeroed
    assert "out of memory in the train phase of step 3; retrying the step once with" in notes[0]
    assert m["budget/changes"][0]["reason"] == "out of memory" and m["budget/changes"][0]["step"] == 3


def test_a_second_oom_is_explained_with_the_retry(one_oom, monkeypatch):
    monkeypatch.setenv("TRAINER_TEST_OOM_COUNT", "2")
    _, p, loop = setup(["budget.vram_gb=6"])
    s = state(loop, {})
    with pytest.raises(oom.OutOfMemory) as e:
        loop.run_step(s, 2, _oom_step(s, 2, []), lambda t: None)
    assert "step 3" in str(e.value) and "retried once with train.micro_batch_tokens" in str(e.value)


@pytest.mark.parametrize("case", ["after an optimizer step", "data parallel"])
def test_an_oom_that_cannot_be_retried_is_explained(one_oom, case):
    from dataclasses import replace

    _, p, loop = setup(["budget.vram_gb=6"], device=replace(H100, world_size=2) if case == "data parallel" else H100)
    s, seen = state(loop, {}), []
    if case == "after an optimizer step":
        s.times["optimizer"] = 0.1  # num_iterations > 1: an update was already applied in this step
    with pytest.raises(oom.OutOfMemory) as e:
        loop.run_step(s, 2, _oom_step(s, 2, seen), lambda t: None)
    assert len(seen) == 1 and "retried" not in str(e.value)


def test_adapt_speed_needs_the_worst_case_first_step():
    with pytest.raises(UserError) as e:
        recipe(["budget.adapt=speed", "train.worst_case_first_step=false"])
    assert "budget.adapt" in e.value.message and "worst_case_first_step" in e.value.message


# ---------------------------------------------------------------------------------------------- what a budget buys


def test_plan_alternatives_are_the_fastest_and_the_smallest_that_fit_ranked_by_speed():
    from trainer.plan import _candidates, _eligible, alternatives

    r, p, _ = setup(["budget.vram_gb=6"])
    alts = alternatives(CFG, r, p, H100)
    ctx = plan_context(CFG, r, p, H100)
    cands = _candidates(r, ctx, H100)
    # those that fit, the train phase's CUDA graphs where they also win with short completions (plan._eligible)
    fit_all = [c for c in cands if c["peak"] + c["headroom"] <= 6 * GB]
    fits = _eligible(fit_all, r, ctx, p.compile_layers, H100)
    assert any(c["train_cudagraphs"] for c in fit_all) and len(fits) < len(fit_all)
    assert all(c["headroom"] == 300 * 10**6 for c in cands)  # memory.BUDGET_HEADROOM, on CUDA
    assert (alts["candidates"], alts["fitting"]) == (len(cands), len(fits)) and 0 < len(fits) < len(cands)
    fast, small, best = alts["fastest"], alts["smallest"], alts["fastest_any_budget"]
    knobs = ("micro_batch_tokens", "gradient_checkpointing", "weight_format", "kv_release")
    assert {k: fast[k] for k in knobs} == {k: getattr(p, k) for k in knobs}  # the plan is the fastest that fits
    assert fast["rank"] == 1 and fast["peak_bytes"] == p.peak_bytes and fast["fits"]
    assert small["peak_bytes"] == min(c["peak"] for c in fits) < fast["peak_bytes"]
    assert small["rank"] == 1 + sum(c["score"] > small["score"] for c in fits) > 1
    assert not best["fits"] and best["rank"] is None and best["score"] > fast["score"] and best["peak_bytes"] > 6 * GB
    assert "fastest_any_budget" not in alternatives(CFG, recipe(["budget.vram_gb=80"]), make_plan(
        CFG, recipe(["budget.vram_gb=80"]), H100), H100)


def test_the_plan_command_prints_what_the_budget_buys():
    args = ["recipes/tiny-cpu.yaml", "--plan", "--set", "budget.vram_gb=0.05"]
    out = run_train(args + ["--json"])
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)
    alts = plan["alternatives"]
    assert alts["fastest"]["micro_batch_tokens"] == plan["micro_batch_tokens"] and alts["fastest"]["rank"] == 1
    assert alts["smallest"]["peak_bytes"] < alts["fastest"]["peak_bytes"] <= 0.05 * GB
    assert alts["fastest_any_budget"]["peak_bytes"] > 0.05 * GB and not alts["fastest_any_budget"]["fits"]
    text = run_train(args)
    assert text.returncode == 0, text.stderr[-3000:]
    flat = " ".join(text.stdout.split())
    assert "What 0.05 GB buys" in flat and "fastest (chosen)" in flat and "smallest" in flat and "predicted seconds per step" in flat


# ---------------------------------------------------------------------------------------------- end to end


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_an_oom_is_retried_smaller_and_the_run_matches_an_uninterrupted_one(tmp_path):
    """tiny-cpu (dapo): half the micro-batch changes only the order of float sums, so the retried run samples exactly
    what the uninterrupted one samples and its losses agree to float rounding; resume keeps the smaller micro-batch."""
    args = ["recipes/tiny-cpu.yaml", "--set", "train.max_steps=4", "--set", "logging.plots=false",
            "--set", "checkpoint.save_steps=1"]
    ref = run_train(args + ["--output-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    out = run_train(args + ["--output-dir", str(tmp_path / "oom")], env={
        "TRAINER_TEST_OOM_PHASE": "train", "TRAINER_TEST_OOM_STEP": "2", "TRAINER_TEST_OOM_COUNT": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    mbt = json.loads((tmp_path / "ref" / "plan.json").read_text())["micro_batch_tokens"]  # one micro-batch a step
    assert "out of memory in the train phase of step 2; retrying the step once with train.micro_batch_tokens " \
           f"{mbt} -> {mbt // 2}" in " ".join(out.stdout.split())
    a, b = _metrics(tmp_path / "ref"), _metrics(tmp_path / "oom")
    assert [m["budget/retries"] for m in b] == [0, 1, 0, 0]
    assert [m["micro_batches"] for m in a] == [1, 1, 1, 1] and [m["micro_batches"] for m in b] == [1, 2, 2, 2]
    assert a[0]["loss"] == b[0]["loss"]
    for x, y in zip(a, b):
        assert x["reward_mean"] == y["reward_mean"]  # the same completions, step after step
        assert abs(x["loss"] - y["loss"]) < 1e-6
    changes = json.loads((tmp_path / "oom" / "summary.json").read_text())["adjustments"]
    assert [(c["step"], c["knob"], c["old"], c["new"], c["reason"]) for c in changes] == [
        (2, "micro_batch_tokens", mbt, mbt // 2, "out of memory"), (2, "token_chunk", mbt, mbt // 2, "out of memory")]
    more = run_train(args + ["--output-dir", str(tmp_path / "oom"), "--resume", "--set", "train.max_steps=5"])
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert _metrics(tmp_path / "oom")[-1]["micro_batches"] == 2  # the checkpoint's knobs, not the planner's first choice


def test_without_kv_release_only_the_whole_steps_peak_is_compared():
    """Phases that share cached memory (no KV release) are judged by the step's peak against the plan's peak."""
    _, p, loop = setup(["budget.vram_gb=12", "rollout.kv_release=false"])
    assert not p.kv_release and p.phase_peaks["train"] > p.phase_peaks["rollout"]
    knobs = plan_knobs(p)
    # the rollout phase reads the train phase's cached blocks: above its own plan, under the step's plan
    assert loop.after_step(1, peaks(0.99 * p.phase_peaks["train"], 0.98 * p.phase_peaks["train"])) == []
    assert plan_knobs(p) == knobs
    lines = loop.after_step(2, peaks(1.1 * p.phase_peaks["train"], 1.1 * p.phase_peaks["train"]))
    assert lines and "train phase measured" in lines[0]


def test_a_plan_leaves_the_budget_headroom_unused_on_cuda():
    """Runs accepted at their least budget ran out of memory inside the cap (H200, 2026-12-03): a CUDA plan now keeps
    memory.BUDGET_HEADROOM of the budget unused, and the smallest budget it names includes it."""
    from trainer import memory
    from trainer.plan import alternatives

    for b in (4.0, 6.0, 12.0):
        r, p, _ = setup([f"budget.vram_gb={b}"])
        assert p.peak_bytes + memory.BUDGET_HEADROOM <= b * GB
        small = alternatives(CFG, r, p, H100)["smallest"]
        assert small["budget_needed_bytes"] == small["peak_bytes"] + memory.BUDGET_HEADROOM


def test_a_budget_that_costs_far_more_time_than_a_little_more_memory_is_named_at_plan_time():
    """Issue 25: 64 x 512 at a budget near its least is predicted 5x slower than at 1.5x that budget; the plan says
    so with both numbers and the budget to set. At a budget where more memory buys little, it says nothing."""
    over = ["train.generation_batch_size=64", "grpo.max_completion_length=512"]
    _, tight, _ = setup(["budget.vram_gb=3.4", *over])
    note = next(n for n in tight.notes if n.startswith("WARNING: at 3.4 GB"))
    faster = float(note.split(" would buy ")[1].split(" s ")[0])
    assert f"{tight.predicted_step_s:.1f} s" in note and tight.predicted_step_s > 3 * faster
    wanted = float(note.split("budget.vram_gb: ")[1].split(" ")[0])
    _, roomy, _ = setup([f"budget.vram_gb={wanted}", *over])
    assert roomy.predicted_step_s == pytest.approx(faster, abs=0.05) and wanted <= 3.4 * 1.5
    _, easy, _ = setup(["budget.vram_gb=8", *over])
    assert not [n for n in easy.notes if n.startswith("WARNING: at")]
