"""Token-budgeted micro-batches change nothing in the math, cut padding on long-tailed lengths, and an out-of-memory
in any phase is one message naming the phase and the knob, with exit code 4 and the last checkpoint intact."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, run_train, tiny_qwen2
from trainer import checkpoint, graph_lengths
from trainer.batch import build_batch, fixed_chunks, groups_of_step, micro_batch, pack, take
from trainer.is_correction import sampler_is_ratio
from trainer.loss import LossConfig, policy_loss, token_weights
from trainer.metrics import GCPauses
from trainer.policy import Policy, completion_logprobs
from trainer.types import Generations

LOSSES = [dict(loss_type=t) for t in ("grpo", "dr_grpo", "dapo", "bnpo", "sapo")] + [
    dict(loss_type="cispo", epsilon_high=3.0), dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", beta=0.05)]


@pytest.fixture(scope="module")
def setup():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_qwen2(vocab=200, hidden=64), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    policy = Policy(model, None, torch.device("cpu"), torch.float32, False, None)
    # 4 prompts of different lengths x 4 completions with long-tailed lengths (2 .. 40 tokens)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (3, 9, 5, 14)]
    lengths = [2, 40, 3, 5, 17, 2, 30, 4, 6, 3, 25, 2, 8, 2, 3, 12]
    comps = [torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]
    gens = Generations(comps, [[-1.0] * len(c) for c in comps], [False] * 16)
    batch = build_batch(prompts, ["p"] * 4, gens, 4, 0, lambda ids: [""] * len(ids), False, False)
    batch.advantages = torch.randn(16, generator=g)
    with torch.no_grad():
        full = micro_batch(batch, list(range(16)), "cpu")
        lp, _ = completion_logprobs(policy, full.input_ids, full.attention_mask, full.completion_ids,
                                    full.completion_valid, 1.0, 64, 64)
    noise = torch.randn(lp.shape, generator=g) * 0.1
    batch.old_logps = (lp + noise) * batch.completion_valid
    batch.ref_logps = (lp - noise.flip(0)) * batch.completion_valid
    batch.sampler_logps = (lp + 0.05 * noise.flip(1)) * batch.completion_valid
    return policy, batch


def _loss_and_grads(policy, batch, cfg, groups, padded=None):
    params = [p for p in policy.model.parameters() if p.requires_grad]
    policy.model.zero_grad()
    weights = token_weights(batch.completion_mask, cfg)
    total = 0.0
    for rows in groups:
        mb = micro_batch(batch, rows, "cpu", padded)
        lp, _ = completion_logprobs(policy, mb.input_ids, mb.attention_mask, mb.completion_ids, mb.completion_valid,
                                    1.0, 16, 64)
        mask = take(batch.completion_mask, mb, "cpu")
        isr, _ = sampler_is_ratio(lp.detach(), take(batch.sampler_logps, mb, "cpu"), mask, "token_truncate", None, 3.0)
        loss, _ = policy_loss(lp, take(batch.advantages, mb, "cpu"), mask, take(weights, mb, "cpu"), cfg,
                              take(batch.old_logps, mb, "cpu"), take(batch.ref_logps, mb, "cpu"), isr)
        loss.backward()
        total += float(loss.detach())
    return total, [p.grad.clone() for p in params]


@pytest.mark.parametrize("case", LOSSES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_token_packed_micro_batches_equal_one_big_batch(setup, case):
    policy, batch = setup
    cfg = LossConfig(max_completion_length=40, **case)
    big_loss, big_grads = _loss_and_grads(policy, batch, cfg, [list(range(16))])
    groups = pack(batch.seq_lengths.tolist(), token_budget=60)
    assert len(groups) > 4  # really split, unevenly
    loss, grads = _loss_and_grads(policy, batch, cfg, groups)
    assert abs(loss - big_loss) < 1e-5
    for a, b in zip(grads, big_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", LOSSES[:1] + LOSSES[-3:], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_micro_batches_of_the_graphs_shapes_equal_one_big_batch(setup, case):
    """Where the train phase replays CUDA graphs (trainer/graph_lengths.py): a fixed number of rows a micro-batch, each
    padded past its longest row to the plan's longest length, leave the loss and the gradients as they are."""
    policy, batch = setup
    cfg = LossConfig(max_completion_length=40, **case)
    big_loss, big_grads = _loss_and_grads(policy, batch, cfg, [list(range(16))])
    # as a recipe of max_prompt_length 128 and max_completion_length 40 plans it: 168 tokens, two a micro-batch
    plan = SimpleNamespace(micro_batch_tokens=336, max_model_len=128 + 40, micro_batch_seqs=None)
    groups, padded = groups_of_step(batch.seq_lengths.tolist(), plan, graphs=True)
    assert [len(g) for g in groups] == [2] * 8
    mbs = [micro_batch(batch, rows, "cpu", padded) for rows in groups]
    trimmed = [micro_batch(batch, rows, "cpu").input_ids.size(1) for rows in groups]
    assert all(mb.input_ids.size(1) >= t for mb, t in zip(mbs, trimmed))
    assert {mb.input_ids.size(1) for mb in mbs} == {168}  # one shape, however long the rows
    assert max(mb.c_len for mb in mbs) > batch.completion_ids.size(1)  # padded past the batch's own width
    loss, grads = _loss_and_grads(policy, batch, cfg, groups, padded)
    assert abs(loss - big_loss) < 1e-5
    for a, b in zip(grads, big_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_a_grpo_run_on_the_graphs_micro_batches_learns_as_the_packed_run(tmp_path, monkeypatch):
    """grpo_step where the plan replays CUDA graphs: its micro-batches grouped and padded as trainer/graph_lengths.py
    says (on the CPU the policy's flag is set by hand; no graphs), with a reference model and two iterations, so the
    no-grad passes run on them too. Step for step the same loss, KL, entropy and gradient norm as packed micro-batches,
    the adapter learning between steps."""
    from trainer import distributed, grpo
    from trainer.api import inputs
    from trainer.metrics import read_metrics
    from trainer.plan import Device, make_plan
    from trainer.recipe import load_recipe
    from trainer.shapes import config_dict

    def run(graphs: bool) -> list[dict]:
        def load(*a, **kw):
            policy = real(*a, **kw)
            policy.cudagraphs = graphs
            return policy

        monkeypatch.setattr(grpo, "load_policy", load)
        r = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml",
                        ["grpo.beta=0.04", "grpo.num_iterations=2", "train.max_steps=3", "train.generation_batch_size=16",
                         "train.micro_batch_tokens=192", "rollout.length_mix={median: 8, sigma: 0.8, min_tokens: 2}",
                         "train.lr_scheduler_type=constant",
                         "eval=", "checkpoint.save_final=false", "logging.plots=false"])
        plan = make_plan(config_dict("tiny"), r, Device("cpu"))
        longest.append(plan.max_model_len)
        tokenizer, prompts, rewards, evaluator, _ = inputs(r)
        out = tmp_path / f"run_{graphs}"
        out.mkdir()
        assert grpo.run(r, plan, out, distributed.World(), tokenizer=tokenizer, prompts=prompts, rewards=rewards,
                        evaluator=evaluator) == 0
        return read_metrics(out)

    real, longest = grpo.load_policy, []
    packed, graphed = run(False), run(True)
    assert len(packed) == len(graphed) == 3
    rows = 192 // longest[0]  # graph_lengths: as many rows of the plan's longest sequence as fit the budget
    assert [m["micro_batches"] for m in graphed] == [math.ceil(16 / rows)] * 3  # (counted in the first iteration)
    assert all(b["padding_frac"] > a["padding_frac"] for a, b in zip(packed, graphed))  # padded to the longest
    assert len({m["completion_length_mean"] for m in packed}) == 3 and packed[-1]["lr"] > 0  # sampled lengths, learning
    for a, b in zip(packed, graphed):
        assert b["completion_length_mean"] == a["completion_length_mean"]  # the same rollouts
        for k in ("loss", "kl", "grad_norm", "entropy"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


def test_the_graphs_micro_batches_keep_one_length_over_many_steps_and_fit_the_budget():
    for longest in (54, 384, 640, 1054, 4224):
        for length in range(1, longest + 1):
            assert graph_lengths.bucket(length, longest) == longest
        assert graph_lengths.bucket(longest + 5, longest) == -(-(longest + 5) // 16) * 16  # a longer trajectory
        for budget in (longest, 2 * longest + 40, 8 * longest):  # every micro-batch fits the token budget padded
            rows = graph_lengths.rows_per_micro_batch(budget, longest)
            assert rows * graph_lengths.bucket(longest, longest) <= budget and rows == budget // longest
    # 200 steps of 64 sampled lengths (prompt 20-128, completion 1-512): the shapes the layers meet, two (21 micro-
    # batches of 3 rows, one of 1) where pack's are new nearly every step
    g = torch.Generator().manual_seed(0)
    plan = SimpleNamespace(micro_batch_tokens=2048, max_model_len=640, micro_batch_seqs=None)
    shapes, packed = set(), set()
    for _ in range(200):
        lengths = (torch.randint(20, 129, (64,), generator=g) + torch.randint(1, 513, (64,), generator=g)).tolist()
        groups, padded = groups_of_step(lengths, plan, graphs=True)
        assert sorted(i for gr in groups for i in gr) == list(range(64))
        shapes |= {(len(gr), padded(max(lengths[i] for i in gr))) for gr in groups}
        packed |= {(len(gr), max(lengths[i] for i in gr)) for gr in pack(lengths, 2048)}
    assert shapes == {(3, 640), (1, 640)} and len(packed) > 300, (shapes, len(packed))


def test_pack_covers_every_row_once_within_budget_and_pads_less_than_fixed():
    lengths = [30, 520, 40, 35, 300, 28, 480, 33, 60, 45, 250, 31, 90, 29, 38, 510]
    groups = pack(lengths, token_budget=1100)
    assert sorted(i for g in groups for i in g) == list(range(16))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 1100 or len(g) == 1

    def padded(gs):
        return sum(len(g) * max(lengths[i] for i in g) for g in gs)

    fixed = fixed_chunks(16, 2)  # 2 sequences: the most a fixed micro-batch can hold at this peak (2 x 520 tokens)
    assert padded(groups) < 0.8 * padded(fixed) and len(groups) <= len(fixed) // 2


def test_pack_leaves_no_lone_row_behind_a_micro_batch_of_several():
    # GRPO rows often share one length (every completion at max_completion_length): 9 rows where 8 fit made 8 + 1,
    # and the one-row micro-batch compiled the layers again (a batch of one is specialised)
    assert [len(g) for g in pack([100] * 9, token_budget=800)] == [5, 4]
    lengths = [100, 90, 90, 80, 80, 80, 80, 80, 80, 70]
    groups = pack(lengths, token_budget=400)
    assert sorted(i for g in groups for i in g) == list(range(10)) and min(len(g) for g in groups) > 1
    assert all(len(g) * max(lengths[i] for i in g) <= 400 for g in groups)
    assert [len(g) for g in pack([300, 250, 100], token_budget=320)] == [1, 1, 1]  # nothing to share: each alone
    assert [len(g) for g in pack([50] * 8, token_budget=400)] == [8]


PHASES = ["rollout", "recompute", "train", "optimizer", "sync"]


@pytest.mark.parametrize("phase", PHASES)
def test_oom_names_the_phase_and_the_knob_and_keeps_the_checkpoint(tmp_path, phase):
    out = run_train(["recipes/tiny-cpu.yaml", "--output-dir", str(tmp_path / "run"), "--set", "train.max_steps=5",
                     "--set", "checkpoint.save_steps=1", "--set", "logging.plots=false"],
                    env={"TRAINER_TEST_OOM_PHASE": phase, "TRAINER_TEST_OOM_STEP": "3"})
    text = out.stdout + out.stderr
    assert out.returncode == 4, text[-3000:]
    assert "Traceback" not in text
    from trainer.oom import PHASE_NAMES

    assert f"in the {PHASE_NAMES.get(phase, phase)}" in text and "step 3" in text and "fix: set" in text and "planned" in text
    want = {"rollout": "rollout.hf_batch_size", "recompute": "train.micro_batch_tokens",
            "train": "train.micro_batch_tokens", "optimizer": "train.optim", "sync": "budget.vram_gb"}[phase]
    assert want in text
    # Before the optimizer step an OOM is retried once, one notch smaller (trainer/budget.py); the hook fires again.
    assert ("the step was retried once with" in " ".join(text.split())) == (phase in ("rollout", "recompute", "train"))
    latest = checkpoint.latest(tmp_path / "run")
    assert latest.name == "step-0000002" and json.loads((latest / "state.json").read_text())["step"] == 2


def test_oom_at_start_up_is_one_message_with_a_budget_to_set(tmp_path):
    # Seen on the H200 (2026-12-02): vLLM's CUDA-graph capture ran out of memory at a planned budget and the run
    # ended in a traceback. Start-up is a phase of its own now: one message, exit 4, a budget to set, nothing written.
    out = run_train(["recipes/tiny-cpu.yaml", "--output-dir", str(tmp_path / "run"), "--set", "logging.plots=false"],
                    env={"TRAINER_TEST_OOM_PHASE": "start"})
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 4, text[-3000:]
    assert "Traceback" not in text and "in the start-up (weights" in text, text[-3000:]
    assert "fix: set budget.vram_gb:" in text and "planned" in text and "--resume" not in text
    assert checkpoint.latest(tmp_path / "run") is None


def test_length_mix_draws_per_request_caps():
    from trainer.grpo import length_mix
    from trainer.recipe import load_recipe
    from tests.conftest import ROOT

    r = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["rollout.length_mix={median: 6, sigma: 1.0, min_tokens: 2}"])
    caps = length_mix(r, 200, seed=1)
    assert len(caps) == 200 and min(caps) >= 2 and max(caps) <= 16 and len(set(caps)) > 5
    assert caps == length_mix(r, 200, seed=1)


def test_each_phase_counts_the_allocators_cap_retries_it_caused(monkeypatch):
    """A phase that makes torch's allocator free its cache and retry (near the cap) is counted as that phase's, per
    step (metrics alloc_retries_<phase>; bench/planner.py keeps them per row): the CUDA calls stubbed, the accounting
    real."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trainer.grpo import State

    count = {"n": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: {"num_alloc_retries": count["n"]})
    s = SimpleNamespace(phase="", step=0, policy=SimpleNamespace(device=torch.device("cuda")), cap=None, mem=None,
                        peaks={}, times=defaultdict(float), alloc_retries=defaultdict(int), gc=GCPauses(),
                        gc_times=defaultdict(float), compiles=None)
    with State.timed(s, "rollout"):
        pass
    with State.timed(s, "train"):
        count["n"] += 3  # three retries while training
    with State.timed(s, "train"):  # a second train-phase block in the same step adds to it
        count["n"] += 1
    assert dict(s.alloc_retries) == {"rollout": 0, "train": 4}
    s.gc.close()


def test_each_phase_counts_the_garbage_collectors_pauses_inside_it():
    """A full collection walks every object the process tracks (0.24 s in a 0.17 s step of the tiny CPU recipe): the
    step's metrics carry the pauses (time_gc_s, time_gc_train_s, gc_full_collections), each phase its own."""
    import gc
    from collections import defaultdict
    from types import SimpleNamespace

    from trainer.grpo import State

    s = SimpleNamespace(phase="", step=0, policy=SimpleNamespace(device=torch.device("cpu")), cap=None, mem=None,
                        peaks={}, times=defaultdict(float), alloc_retries=defaultdict(int), gc=GCPauses(),
                        gc_times=defaultdict(float), compiles=None)
    gc.disable()  # no automatic collection in between: only the one below
    try:
        with State.timed(s, "rollout"):
            pass
        with State.timed(s, "train"):
            gc.collect()
    finally:
        gc.enable()
        s.gc.close()
    assert s.gc.full == 1 and s.gc_times["train"] > 0 and s.gc_times["rollout"] == 0
    assert s.gc_times["train"] <= s.times["train"]


def test_each_phase_counts_what_torch_compile_spent_inside_it(tmp_path):
    # the H100's mirror rows (2026-12-05) spent 10-25 s of steps 3-5 in the train phase and nothing said whether it was
    # compiling: each phase now takes the compiles made inside it (trainer/metrics.py CompileWatch), none twice
    from collections import defaultdict
    from types import SimpleNamespace

    from trainer.grpo import State
    from trainer.metrics import CompileWatch

    s = SimpleNamespace(phase="", step=3, policy=SimpleNamespace(device=torch.device("cpu")), cap=None, mem=None,
                        peaks={}, times=defaultdict(float), alloc_retries=defaultdict(int), gc=GCPauses(),
                        gc_times=defaultdict(float), compiles=CompileWatch(tmp_path / "compiles.jsonl"),
                        compile_times=defaultdict(float), compile_graphs=0, compile_reasons=[])
    f = torch.compile(lambda x: x.cos() + 1, backend="eager")
    try:
        f(torch.ones(2))  # between the phases: logged, not the step's
        with State.timed(s, "rollout"):
            pass
        with State.timed(s, "train"):
            f(torch.ones(2, 3))
    finally:
        s.gc.close()
    assert s.compile_graphs == 1 and s.compile_times["train"] > 0 and s.compile_times["rollout"] == 0
    assert "rank mismatch" in s.compile_reasons[0] and s.compile_times["train"] <= s.times["train"]
    import json

    rows = [json.loads(x) for x in (tmp_path / "compiles.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in rows] == [(4, "outside the phases"), (4, "train")]


def test_snapshot_summary_names_what_was_live_at_the_oom_and_what_grew_before_it():
    # torch's snapshot format (torch.cuda.memory._snapshot's docstring): a trace of alloc / free / oom events
    from bench.memory_snapshot import summary

    def ev(action, addr, size, where, pool=(0, 0)):
        return {"action": action, "addr": addr, "size": size, "pool_id": pool,
                "frames": [{"filename": "/x/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
                           {"filename": f"/site/{where}", "line": 7, "name": "f"}]}

    trace = [ev("alloc", 1, 6 * 10**9, "vllm/model_executor/weights.py"),
             ev("alloc", 2, 2 * 10**9, "trainer/policy.py"),
             ev("free_requested", 2, 2 * 10**9, "trainer/policy.py"),
             ev("free_completed", 2, 2 * 10**9, "trainer/policy.py"),
             ev("alloc", 3, 5 * 10**9, "vllm/v1/worker/gpu_model_runner.py", pool=(1, 2)),
             {"action": "oom", "size": 117440512, "device_free": 10**11, "frames": []},
             ev("alloc", 4, 9 * 10**9, "trainer/late.py")]  # after the OOM: not counted
    segments = [{"segment_pool_id": (0, 0), "total_size": 8 * 10**9, "allocated_size": 6 * 10**9},
                {"segment_pool_id": (1, 2), "total_size": 5 * 10**9, "allocated_size": 0}]
    text = summary({"device_traces": [trace], "segments": segments})
    assert "OOM: 0.117 GB requested" in text and "11.00 GB live in 2 allocations" in text, text
    lines = text.splitlines()
    live = lines[lines.index("live by owner:") + 1:lines.index("live by owner:") + 3]
    assert "6.000 GB" in live[0] and "vllm/model_executor/weights.py:7" in live[0] and "gpu_model_runner" in live[1]
    assert "trainer/policy.py" not in "\n".join(live) and "late.py" not in text
    assert "(1, 2) 5.000 GB" in text and "(1, 2): 5.000 / 0.000" in text


def test_gc_freeze_moves_the_heap_into_the_permanent_generation_after_the_first_steps(tmp_path, monkeypatch):
    # TRAINER_GC_FREEZE=1 (trainer/grpo.py GC_FREEZE, off until its GPU A/B): what the first two steps leave
    # (compiled layers, captured graphs) is not walked again by every full collection
    import gc

    import trainer.grpo
    from trainer.api import train

    monkeypatch.setattr(trainer.grpo, "GC_FREEZE", True)
    gc.unfreeze()
    try:
        code, _ = train(ROOT / "recipes" / "tiny-cpu.yaml", ["train.max_steps=1", "logging.plots=false", "eval=null"],
                        output_dir=tmp_path / "run")
        assert code == 0 and gc.get_freeze_count() > 100_000
    finally:
        gc.unfreeze()
