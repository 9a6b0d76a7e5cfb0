"""The GRPO loop: rollout -> rewards -> advantages -> loss -> optimizer step -> sync -> checkpoint, one step per call.

`grpo_step` is the whole algorithm on one screen; everything it calls is named for what it does. Setup, resume,
signals and the outer loop live in `run`. This module decides no memory knob: it reads them from the Plan.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer import budget, checkpoint, distributed, fp16_range, graph_lengths, is_correction, oom
from trainer.batch import build_batch, groups_of_step, micro_batch, take
from trainer.cap import Cap, apply_segments
from trainer.data import PromptSet
from trainer.errors import EXIT_NONFINITE, EXIT_PREEMPTED
from trainer.evaluate import line as eval_line
from trainer.loss import LossConfig, group_advantages, policy_loss, token_weights
from trainer.loss_scale import LossScale
from trainer.metrics import CompileWatch, GCPauses, MemorySampler, MetricsLogger, line, merge_ranks
from trainer.policy import Policy, completion_logprobs, load_policy, resolve_model_path
from trainer.rewards import close_rewards, combine, score
from trainer.rollout import make_engine, sample
from trainer.types import RolloutBatch, Sampling

# TRAINER_GC_FREEZE=1: after each of the first two steps (which compile the layers and capture the graphs), collect
# once and move every object the process then tracks into the garbage collector's permanent generation, so that a
# full collection later walks only what the run allocates after (vLLM freezes its start-up heap the same way; the
# policy, the compiled layers and their caches come after it). Off until an A/B on the GPU (bench/compile_ab.py
# gc_freeze) shows what the pauses (time_gc_s) cost a step.
GC_FREEZE = os.environ.get("TRAINER_GC_FREEZE") == "1"
# Test hook: TRAINER_TEST_NAN_AT_STEPS=3,5 makes those steps' losses non-finite (float16:3,5: in float16 runs alone,
# an overflow bfloat16 holds), read once here.
_NAN_SPEC = os.environ.get("TRAINER_TEST_NAN_AT_STEPS", "")
NAN_FLOAT16_ONLY = _NAN_SPEC.startswith("float16:")
NAN_AT_STEPS = frozenset(int(x) - 1 for x in _NAN_SPEC.removeprefix("float16:").split(",") if x.strip())


@dataclass
class State:
    recipe: object
    plan: object
    policy: Policy
    engine: object
    prompts: PromptSet
    rewards: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    world: distributed.World
    loss_cfg: LossConfig
    correction: is_correction.SamplerCorrection
    mem: MemorySampler | None = None
    cap: Cap | None = None  # the process-level allocator cap (trainer/cap.py), enforced at each phase boundary
    turns: object = None  # rollout.multi_turn.MultiTurn: conversations with tools / an environment (None: one turn)
    loss_scale: LossScale = field(default_factory=lambda: LossScale(False))  # plan.loss_scaling: float16's
    times: dict = field(default_factory=lambda: defaultdict(float))  # phases; they add up to time_step_s
    comm: dict = field(default_factory=dict)  # collectives inside a phase (grad wait / all-reduce: in "optimizer")
    peaks: dict = field(default_factory=dict)  # per phase: device memory used (sampled) and torch's allocated peak
    # per phase: how often torch's allocator hit its cap (or the device's end), freed its cache and tried again: each
    # retry synchronises and re-maps memory, so a phase planned close to the budget can run slower than it is priced
    alloc_retries: dict = field(default_factory=lambda: defaultdict(int))
    gc: GCPauses = field(default_factory=GCPauses)  # the garbage collector's pauses, cumulative
    gc_times: dict = field(default_factory=lambda: defaultdict(float))  # per phase: inside it, not added again
    gc_full0: int = 0  # full collections before this step
    compiles: CompileWatch | None = None  # torch.compile's graphs made inside the phases (the run's compiles.jsonl)
    compile_times: dict = field(default_factory=lambda: defaultdict(float))  # per phase: inside it, not added again
    compile_graphs: int = 0  # this step's
    compile_reasons: list = field(default_factory=list)  # this step's failed guards, in order
    phase: str = ""
    step: int = 0

    @contextlib.contextmanager
    def timed(self, name: str):
        self.phase = name
        oom.test_hook(name, self.step)
        cuda = self.policy.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            if self.cap is not None:
                self.cap.enforce()
            torch.cuda.reset_peak_memory_stats()
            retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        if self.mem is not None:
            self.mem.take_peak()
        if self.compiles is not None:  # what compiled outside the phases (an evaluation) is logged, not the step's
            self.compiles.take(self.step, "outside the phases")
        gc0, t0 = self.gc.seconds, time.perf_counter()
        with torch.profiler.record_function(f"phase:{name}"):  # TRAINER_PROFILE_STEP's table by phase (_profiled)
            yield
        if cuda:
            torch.cuda.synchronize()
            self.peaks[f"torch_alloc_{name}"] = max(self.peaks.get(f"torch_alloc_{name}", 0),
                                                    torch.cuda.max_memory_allocated())
            self.alloc_retries[name] += torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
        if self.mem is not None:
            self.peaks[f"used_{name}"] = max(self.peaks.get(f"used_{name}", 0), self.mem.take_peak())
        self.times[name] += time.perf_counter() - t0
        self.gc_times[name] += self.gc.seconds - gc0
        if self.compiles is not None:
            n, seconds, reasons = self.compiles.take(self.step, name)
            self.compile_times[name] += seconds
            self.compile_graphs += n
            self.compile_reasons += reasons


def grpo_step(s: State, step: int) -> dict:
    r, g, plan = s.recipe, s.recipe.grpo, s.plan
    s.step = step
    s.times.clear()
    s.comm.clear()
    s.alloc_retries.clear()
    s.peaks.clear()
    s.gc_times.clear()
    s.compile_times.clear()
    s.compile_reasons.clear()
    s.compile_graphs = 0
    s.gc_full0 = s.gc.full
    # 1. Rollout: G completions for each of this rank's prompts, from the current adapter.
    n = plan.prompts_per_step
    worst = step == 0 and r.train.worst_case_first_step
    order = s.prompts.longest(n * s.world.size) if worst else s.prompts.indices(step, n * s.world.size,
                                                                                   r.train.seed, r.data.shuffle)
    idx = order[s.world.rank * n:(s.world.rank + 1) * n]
    # Seeds and length caps belong to global rows, so N ranks sample exactly what one process would.
    seed, rows = r.train.seed * 1_000_003 + step * 1009, n * g.num_generations
    caps = None if worst else length_mix(r, rows * s.world.size, seed)
    sampling = Sampling(n=g.num_generations, max_tokens=g.max_completion_length, temperature=g.temperature,
                        top_p=g.top_p, top_k=g.top_k, seed=seed, ignore_eos=worst, first_row=s.world.rank * rows,
                        max_tokens_per_request=caps[s.world.rank * rows:(s.world.rank + 1) * rows] if caps else None)
    with s.timed("kv"):  # the KV pool comes back from the trainer (when the plan releases it)
        s.engine.acquire()
    with s.timed("rollout"):  # one completion per row, or conversations with tools / an environment
        gens = sample(s.engine, s.turns, s.prompts, idx, sampling)
    with s.timed("kv"):
        s.engine.release()
    batch = build_batch([s.prompts.prompt_ids[i] for i in idx], [s.prompts.prompts[i] for i in idx], gens,
                        g.num_generations, s.policy.tokenizer.pad_token_id, _decoder(s.policy.tokenizer),
                        s.prompts.conversational, g.mask_truncated_completions)
    # 2. Rewards and group-relative advantages.
    with s.timed("reward"):
        columns = {c: [v[i] for i in idx for _ in range(g.num_generations)] for c, v in s.prompts.columns.items()}
        batch.rewards, failures = score(s.rewards, batch.prompts, batch.completions, {**columns, **batch.columns})
        batch.reward = combine(batch.rewards, s.rewards, batch.fixed_reward)
        batch.advantages = group_advantages(batch.reward, g.num_generations, g.scale_rewards)
    # 3. Loss weights from global counts; micro-batches packed by tokens; reference / old log-probs if needed.
    # The first collective of the step: a rank that finished its rollout and rewards early waits here (time_barrier_s).
    t0 = time.perf_counter()
    counts = distributed.all_reduce_sum(torch.tensor([float(batch.completion_mask.sum()), float(len(batch))]), s.world)
    if s.world.size > 1:
        s.times["barrier"] += time.perf_counter() - t0
    weights = token_weights(batch.completion_mask, s.loss_cfg, total_tokens=counts[0], num_sequences=int(counts[1]))
    groups, padded = groups_of_step(batch.seq_lengths.tolist(), plan, s.policy.cudagraphs)
    with s.timed("recompute"):
        if g.beta != 0.0:
            with s.policy.reference():
                batch.ref_logps = logprobs_pass(s, batch, groups, padded)
        if g.num_iterations > 1:
            batch.old_logps = logprobs_pass(s, batch, groups, padded)
    # 4. Policy-gradient update(s): backward over micro-batches, then one optimizer step per iteration, and
    # 5. weight sync after each: the engine samples the next step from the updated adapter (and where the trainer
    # computes on the engine's merged rows, trainer/merged_linear.py, its next iteration sees that adapter too).
    stats: dict = defaultdict(float)
    for it in range(g.num_iterations):
        with s.timed("train"):
            for rows in groups:
                mb = micro_batch(batch, rows, s.policy.device, padded)
                logps, ent = completion_logprobs(s.policy, mb.input_ids, mb.attention_mask, mb.completion_ids,
                                                 mb.completion_valid, g.temperature, plan.token_chunk,
                                                 plan.vocab_chunk, entropy=it == 0, logits_dtype=plan.logits_dtype)
                mask, sampler = take(batch.completion_mask, mb, logps.device), take(batch.sampler_logps, mb, logps.device)
                old = take(batch.old_logps, mb, logps.device)
                # pi_old / pi_sampler (trainer/is_correction.py): None when off or the engine gave no log-probs
                isr, is_st = s.correction(logps.detach() if old is None else old, sampler, mask)
                loss, st = policy_loss(logps, take(batch.advantages, mb, logps.device), mask,
                                       take(weights, mb, logps.device), s.loss_cfg, old,
                                       take(batch.ref_logps, mb, logps.device), isr)
                if step in NAN_AT_STEPS and (s.loss_scale.enabled or not NAN_FLOAT16_ONLY):  # test hook: a
                    # non-finite loss, as a diverging run (or float16 past its range) would produce
                    loss = loss * float("nan")
                s.loss_scale.backward(loss)  # scaled by 2**k in float16 (trainer/loss_scale.py), else as it is
                if it == 0:
                    _accumulate(stats, {**st, **is_st}, loss, logps, ent, sampler, mb)
        with s.timed("optimizer"):
            grad_norm = optimizer_step(s)
        with s.timed("sync"):
            sync_stats = s.engine.sync(s.policy)
    return _metrics(s, step, batch, stats, grad_norm, failures, sync_stats)


def length_mix(recipe, count: int, seed: int) -> list[int] | None:
    """Benchmark knob: per-request max_tokens from a log-normal (random-init models never stop on their own)."""
    mix = recipe.rollout.length_mix
    if mix is None:
        return None
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = rng.lognormal(np.log(mix.median), mix.sigma, size=count)
    return [int(min(recipe.grpo.max_completion_length, max(mix.min_tokens, x))) for x in draws]


@torch.no_grad()
def logprobs_pass(s: State, batch: RolloutBatch, groups: list[list[int]], padded=None) -> torch.Tensor:
    """Per-token log-probs of the whole batch without gradient (old policy, or reference inside `reference()`)."""
    out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
    for rows in groups:
        mb = micro_batch(batch, rows, s.policy.device, padded)
        logps, _ = completion_logprobs(s.policy, mb.input_ids, mb.attention_mask, mb.completion_ids,
                                       mb.completion_valid, s.recipe.grpo.temperature, s.plan.token_chunk,
                                       s.plan.vocab_chunk, logits_dtype=s.plan.logits_dtype)
        width = min(mb.c_len, out.size(1))  # past the batch's width: padding (trainer/graph_lengths.py)
        out[mb.rows, :width] = logps[:, :width].float().cpu()
    return out


def optimizer_step(s: State) -> float:
    """Sum gradients over ranks, unscale, clip, step; a non-finite gradient skips the update (returns its norm: NaN
    or inf; under float16's loss scale an overflow halves the scale, s.loss_scale.overflowed)."""
    params = s.policy.trainable_parameters()
    distributed.sum_gradients(params, s.world, s.comm)
    s.loss_scale.unscale(params)
    norm = float(torch.nn.utils.clip_grad_norm_(params, s.recipe.train.max_grad_norm or float("inf")))
    if math.isfinite(norm):
        s.optimizer.step()
    s.loss_scale.update(math.isfinite(norm))
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return norm


def _accumulate(stats, st, loss, logps, ent, sampler, mb) -> None:
    for k, v in st.items():  # sums, except the extremes
        v = float(v)
        if k.endswith("_max"):
            stats[k] = max(stats.get(k, v), v)
        elif k.endswith("_min"):
            stats[k] = min(stats.get(k, v), v)
        else:
            stats[k] += v
    stats["loss"] += float(loss.detach())
    valid = mb.own.bool()  # the model's own tokens (a multi-turn row's tool / environment tokens are not)
    if ent is not None:
        stats["entropy_sum"] += float(ent[valid].sum())
    if sampler is not None:
        gap = (logps.detach() - sampler).abs()[valid]
        gap = gap[~gap.isnan()]  # tokens the sampler could not score (NaN) are left out, as TRL does
        if gap.numel():
            stats["gap_sum"] += float(gap.sum())
            stats["gap_n"] += float(gap.numel())
            stats["gap_max"] = max(stats["gap_max"], float(gap.max()))
            stats.setdefault("gaps", []).append(gap.float())  # for the step's percentile, taken once in _metrics
    stats["valid_tokens"] += float(valid.sum())
    stats["padded_tokens"] += mb.padded_tokens
    stats["real_tokens"] += mb.real_tokens
    stats["micro_batches"] += 1


def _metrics(s: State, step: int, batch: RolloutBatch, st: dict, grad_norm: float, failures: dict,
             sync_stats: dict) -> dict:
    lengths = batch.completion_valid.sum(1).float()
    tok = max(st["tokens"], 1.0)
    m = {"step": step + 1, "loss": st["loss"], "reward_mean": float(batch.reward.mean()),
         "reward_std": float(batch.reward.std()) if len(batch) > 1 else 0.0,
         "completion_length_mean": float(lengths.mean()), "completion_length_max": float(lengths.max()),
         "truncated_frac": float(batch.truncated.float().mean()), "grad_norm": grad_norm,
         "entropy": st["entropy_sum"] / max(st["valid_tokens"], 1.0), "clip_ratio_low": st["clip_low_sum"] / tok,
         "clip_ratio_high": st["clip_high_sum"] / tok, "clip_ratio_region": st["clip_region_sum"] / tok,
         "lr": s.scheduler.get_last_lr()[0], "micro_batches": st["micro_batches"],
         "skipped": int(not math.isfinite(grad_norm)),
         "padding_frac": 1 - st["real_tokens"] / max(st["padded_tokens"], 1.0)}
    for j, rf in enumerate(s.rewards):
        col = batch.rewards[:, j]
        m[f"rewards/{rf.name}/mean"] = float(torch.nanmean(col))
        m[f"rewards/{rf.name}/std"] = float(col[~col.isnan()].std()) if (~col.isnan()).sum() > 1 else 0.0
    m.update(failures)  # rewards/<name>/failures and rewards/<name>/timeouts
    m.update(batch.rollout_stats)  # multi_turn/...: turns, tool calls, how conversations ended
    if "kl_sum" in st:
        m["kl"] = st["kl_sum"] / tok
    if s.loss_scale.enabled:  # float16: the scale the next step takes; an overflow only skipped this step's update
        m["loss_scale"], m["loss_scale_overflow"] = s.loss_scale.scale, int(s.loss_scale.overflowed)
    if st.get("gap_n"):
        m["logp_gap_mean"], m["logp_gap_max"] = st["gap_sum"] / st["gap_n"], st["gap_max"]
        m["logp_gap_p99"] = percentile(torch.cat(st["gaps"]), 0.99)
    m.update(is_correction.metrics(st, s.correction.mode))
    for k, v in s.times.items():
        m[f"time_{k}_s"] = v
    m["time_step_s"] = sum(s.times.values())
    for k, v in s.comm.items():  # inside time_optimizer_s, not added to the step again
        m[f"time_{k}_s"] = v
    m["time_gc_s"] = sum(s.gc_times.values())  # inside the phases, not added to the step again
    m["time_gc_train_s"] = s.gc_times.get("train", 0.0)
    m["gc_full_collections"] = s.gc.full - s.gc_full0
    m["compile_graphs"] = s.compile_graphs
    if s.policy.cudagraphs:  # the train phase's CUDA graphs held so far: growing after the first steps, re-recording
        m["cuda_graphs"] = graph_lengths.recorded_graphs()
    m["time_compile_s"] = sum(s.compile_times.values())  # inside the phases, not added to the step again
    m["tokens_per_s"] = float(lengths.sum()) / max(s.times["rollout"], 1e-9)
    m.update({f"peak_{k}_gb": v / 1e9 for k, v in s.peaks.items()})
    m.update({f"alloc_retries_{k}": v for k, v in s.alloc_retries.items()})
    if s.peaks:
        m["peak_memory_gb"] = max(v for k, v in s.peaks.items() if k.startswith("used_")) / 1e9
    m.update({f"sync_{k}": v for k, v in sync_stats.items()})
    m["unix_time"] = time.time()  # when the step ended (benchmarks: startup = process start to step 1's end)
    if s.world.size > 1:
        m["_rewards"] = batch.reward.tolist()
    return m


def _recompiled(m: dict, reasons: list[str], run_dir: Path) -> str:
    first = reasons[0].splitlines()[0] if reasons else "no guard failure recorded (a first compile)"
    return (f"step {m['step']}: torch.compile made {m['compile_graphs']} graph(s), {m['time_compile_s']:.1f} s of the "
            f"step; first cause: {first[:200]}; every compile in {run_dir / 'compiles.jsonl'}")


def percentile(x: torch.Tensor, q: float) -> float:
    """The nearest-rank q-quantile of a 1-D tensor (one kthvalue; torch.quantile refuses > 16M elements)."""
    return float(x.kthvalue(max(1, math.ceil(q * x.numel()))).values)


@contextlib.contextmanager
def _profiled(run_dir: Path, step: int, world: distributed.World):
    """TRAINER_PROFILE_STEP=k: torch.profiler over step k, tables by CPU and by device time in the run dir. With
    TRAINER_PROFILE_PYTHON=1 also each Python function's own time (the profiler's Python tracer: where a host-bound
    phase's time outside any op goes; it slows the step it profiles), in profile_step{k}_python.txt."""
    if os.environ.get("TRAINER_PROFILE_STEP") != str(step + 1) or not world.main:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    python = os.environ.get("TRAINER_PROFILE_PYTHON") == "1"
    with profile(activities=acts, with_stack=python) as prof:
        yield
    avg = prof.key_averages()
    by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (run_dir / f"profile_step{step + 1}.txt").write_text(
        phase_table(avg) + "\n\n" + avg.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n"
        + avg.table(sort_by=by, row_limit=40))
    if python:
        (run_dir / f"profile_step{step + 1}_python.txt").write_text(
            avg.table(sort_by="self_cpu_time_total", row_limit=100, max_name_column_width=90))


def phase_table(avg) -> str:
    """The step's phases (State.timed's ranges): wall (CPU) ms and device ms inside each, from torch.profiler's
    averages: where the step's time went before the per-kernel tables say what ran."""
    rows = ["phase         cpu ms   device ms  calls"]
    for e in sorted((e for e in avg if e.key.startswith("phase:")), key=lambda e: -e.cpu_time_total):
        rows.append(f"{e.key.removeprefix('phase:'):12s} {e.cpu_time_total / 1e3:8.1f}  "
                    f"{e.device_time_total / 1e3:10.1f}  {e.count:5d}")
    return "\n".join(rows)


def _decoder(tokenizer):
    return lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)


def make_optimizer(policy: Policy, t) -> tuple[torch.optim.Optimizer, object]:
    from transformers import get_scheduler

    params = policy.trainable_parameters()
    if t.optim == "adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                weight_decay=t.weight_decay, fused=t.optim == "adamw_torch_fused")
    return opt, get_scheduler(t.lr_scheduler_type, opt, num_warmup_steps=t.warmup_steps,
                              num_training_steps=t.max_steps)


class _Stop:
    """A stop request: SIGTERM / SIGUSR1, or a file named STOP in the run dir (how the Slurm scripts ask every node
    of a job at once). The loop finishes the step, checkpoints and exits with EXIT_PREEMPTED; all ranks agree."""

    def __init__(self, run_dir: Path):
        self.signal = None
        self.file = run_dir / "STOP"
        # Test hook: deliver SIGUSR1 to ourselves after this step (exercises the real handler deterministically).
        self.test_step = int(os.environ.get("TRAINER_TEST_SIGNAL_AFTER_STEP", "0"))
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook kernel thread)
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def requested(self, world: distributed.World, done: int) -> str | None:
        if self.test_step == done:
            os.kill(os.getpid(), signal.SIGUSR1)
        mine = f"signal {self.signal}" if self.signal is not None else ("STOP file" if self.file.exists() else None)
        if world.size > 1 and float(distributed.all_reduce_sum(torch.tensor([float(mine is not None)]), world)[0]):
            return mine or "another rank's stop request"
        return mine


def run(recipe, plan, run_dir: Path, world: distributed.World, *, tokenizer, prompts: PromptSet, rewards: list,
        evaluator=None, turns=None, resume: Path | None = None, console=None) -> int:
    """Train to recipe.train.max_steps; returns the process exit code. The tokenizer, prompts, rewards and evaluator
    come loaded (api.prepare loads them before the engine and the weights: a data or reward mistake costs no load);
    the loop loads nothing of the recipe's inputs itself."""
    torch.manual_seed(recipe.train.seed)
    model_path = resolve_model_path(recipe.model)  # a `shape` is built here, before the cap (test models only)
    apply_segments(plan)  # before anything allocates (Plan.expandable_segments)
    cap = Cap(plan)
    cap.apply()  # before vLLM or any weight allocates: the planner's estimate of what torch does not hold
    oom.record_history(run_dir, world.rank)  # TRAINER_MEMORY_HISTORY=start|all (oom.py)
    try:
        oom.test_hook("start", 0)
        engine = make_engine(recipe, plan, model_path)
        policy = load_policy(recipe, plan, engine, tokenizer)
        engine.attach(policy)
        fp16 = fp16_range.check(plan, policy, prompts.prompt_ids,
                                note=console.print if console and world.main else None,
                                auto=recipe.model.dtype == "auto")
        if fp16:  # the checkpoint's headroom in float16, in engine.json
            engine.info["float16_largest_activation"] = fp16
    except torch.cuda.OutOfMemoryError as e:  # the plan's start-up estimate was short: one message, no traceback
        raise oom.explain("start", 0, plan, e) from None
    oom.started()
    cap.calibrate()  # the planner's estimate replaced by what this process holds outside torch's allocator
    # Sampled from here on, not during the engine's start: with the sampler reading from its thread while vLLM
    # started (CUDA-graph capture included), the 7B shape's engine hung on the H200 (2026-12-02: 5 minutes, GPU idle);
    # started here, the same run went through.
    sampler = MemorySampler(observer=cap.observe, phase=lambda: "start",
                            timeline=run_dir / "memory.jsonl" if world.main else None)
    if world.main:
        (run_dir / "engine.json").write_text(json.dumps(engine.info, indent=2))
    optimizer, scheduler = make_optimizer(policy, recipe.train)
    if hasattr(engine, "on_kv_change"):
        engine.on_kv_change = cap.kv_change
    loop = budget.Loop(recipe, plan, policy, engine, world.size, cap=cap)
    loss_scale = LossScale(plan.loss_scaling)
    start = 0
    if resume is not None:
        state = checkpoint.load(resume, policy.model, optimizer, scheduler)
        start = state["step"]
        loop.restore(state.get("budget"))
        loss_scale.load_state_dict(state.get("loss_scale"))
    engine.sync(policy)
    s = State(recipe, plan, policy, engine, prompts, rewards, optimizer, scheduler, world,
              LossConfig.from_grpo(recipe.grpo), is_correction.SamplerCorrection(recipe.grpo), mem=sampler, cap=cap,
              turns=turns, loss_scale=loss_scale,
              compiles=CompileWatch(run_dir / "compiles.jsonl" if world.main else None))
    sampler.phase = lambda: s.phase or "start"
    logger = MetricsLogger(run_dir, recipe, world.rank, resume_step=start)
    stop, bad = _Stop(run_dir), 0
    if world.main:
        for stale in (stop.file, run_dir / "preempted"):
            stale.unlink(missing_ok=True)
    distributed.barrier(world)
    code, step = 0, start
    save = lambda k: checkpoint.save(run_dir, k, policy.model, optimizer, scheduler,  # noqa: E731
                                     {"recipe": recipe.name, "budget": loop.state(),
                                      "loss_scale": loss_scale.state_dict()},
                                     recipe.checkpoint.save_total_limit) if world.main else None
    from trainer.console import Progress

    with Progress(console, recipe.train.max_steps, start, enabled=world.main) as progress:
        for step in range(start, recipe.train.max_steps):
            with _profiled(run_dir, step, world):  # an OOM is retried once, smaller, or explained (trainer/budget.py)
                m = loop.run_step(s, step, lambda: merge_ranks(distributed.gather_objects(grpo_step(s, step), world)),
                                  progress.note)
            if evaluator is not None and evaluator.due(step + 1):  # the updated policy, on held-out prompts
                try:
                    s.phase = "rollout"  # an OOM there takes the rollout's advice
                    m.update(evaluator.run(engine, world))
                except torch.cuda.OutOfMemoryError as e:
                    raise oom.explain(s.phase, step, plan, e) from None
            if GC_FREEZE and step - start < 2:
                gc.collect()
                gc.freeze()
            logger.log(m)
            progress.update(m, line(m))
            if m.get("compile_graphs") and step - start >= 2:  # the first two steps compile for the lengths they see
                progress.note(_recompiled(m, s.compile_reasons, run_dir))
            if "eval/reward_mean" in m:
                progress.note(eval_line(m))
            bad = bad + 1 if not (math.isfinite(m["loss"]) and (math.isfinite(m["grad_norm"])
                                                                 or m.get("loss_scale_overflow"))) else 0
            if bad >= recipe.train.max_nonfinite_steps:
                progress.note(f"stopping: {bad} consecutive steps with non-finite loss or gradient; "
                              f"the last checkpoint is kept{fp16_range.stop_hint(plan)}")
                code = EXIT_NONFINITE
                break
            done = step + 1
            why = stop.requested(world, done)
            if done % recipe.checkpoint.save_steps == 0 or why:
                save(done)
            if why:
                progress.note(f"{why}: checkpoint step {done} written; resume with --resume")
                if world.main:
                    (run_dir / "preempted").write_text(f"{done}\n")  # the Slurm script requeues on this
                code = EXIT_PREEMPTED
                break
        else:
            if recipe.checkpoint.save_final and recipe.train.max_steps > start:
                save(recipe.train.max_steps)
    if os.environ.get("TRAINER_TEST_DUMP_LORA"):  # test hook: each rank's adapter, to compare across ranks
        torch.save({k: v.detach().cpu() for k, v in policy.model.named_parameters() if v.requires_grad},
                   Path(os.environ["TRAINER_TEST_DUMP_LORA"]) / f"lora_rank{world.rank}.pt")
    sampler.close()
    s.gc.close()
    close_rewards(rewards)
    if turns is not None:
        turns.close()  # the tools' worker processes
    logger.close()
    distributed.barrier(world)
    engine.close()  # last: under torchrun vLLM's shutdown takes the process groups down with it
    return code
