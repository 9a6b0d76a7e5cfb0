"""Out-of-memory, explained: which phase ran out, planned vs allocated memory at that moment, the knob to change.

The loop marks its phases (kv, rollout, reward, recompute, train = forward + backward, optimizer, sync), and start-up
(weights, the vLLM engine, its CUDA-graph capture) is one more; a CUDA OOM in any of them becomes one `OutOfMemory`
message with exit code 4 (errors.EXIT_OOM). Nothing is written after
the OOM, so the last checkpoint stays the last good one.

TRAINER_MEMORY_HISTORY=start (or =all) records every CUDA allocation with its stack from before the engine starts
(torch.cuda.memory._record_memory_history), until start-up ends (start) or for the whole run (all; slower); an OOM
meanwhile also writes the run dir's memory_snapshot.pickle (drop it on https://pytorch.org/memory_viz): which code
held what when the allocation failed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.memory import GB, MLP_TILE_TOKENS

PHASE_NAMES = {"train": "backward (log-prob forward + backward)", "recompute": "recompute (reference/old log-probs)",
               "kv": "KV-pool re-acquire (before the rollout)",
               "start": "start-up (weights, the rollout engine and its CUDA-graph capture)"}


class OutOfMemory(Exception):
    """A CUDA OOM with the phase and the advice; the CLI prints it and exits with EXIT_OOM."""


_raised = 0  # OOMs raised by the test hook in this process
_history: Path | None = None  # where an OOM writes the allocation history, while it is recorded


def record_history(run_dir: Path, rank: int = 0) -> bool:
    """Start recording CUDA allocations if TRAINER_MEMORY_HISTORY asks for it (start | all) and there is a GPU; an
    OOM writes them to run_dir/memory_snapshot.pickle (rank N > 0 of a torchrun: memory_snapshot.rankN.pickle)."""
    global _history
    if os.environ.get("TRAINER_MEMORY_HISTORY", "") not in ("start", "all") or not torch.cuda.is_available():
        return False
    torch.cuda.memory._record_memory_history(  # Python frames only: C++ unwinding on every allocation is slow
        stacks="python", max_entries=int(os.environ.get("TRAINER_MEMORY_HISTORY_ENTRIES", "200000")))
    _history = Path(run_dir) / ("memory_snapshot.pickle" if rank == 0 else f"memory_snapshot.rank{rank}.pickle")
    return True


def started() -> None:
    """Start-up is over: TRAINER_MEMORY_HISTORY=start stops recording here (it costs time on every allocation)."""
    global _history
    if _history is not None and os.environ.get("TRAINER_MEMORY_HISTORY") == "start":
        torch.cuda.memory._record_memory_history(enabled=None)
        _history = None


def dump_history() -> Path | None:
    """The recorded allocation history, written to the run dir (None when nothing is recorded)."""
    if _history is None:
        return None
    torch.cuda.memory._dump_snapshot(str(_history))
    return _history


def test_hook(phase: str, step: int) -> None:
    """TRAINER_TEST_OOM_PHASE=<phase> [TRAINER_TEST_OOM_STEP=k] [TRAINER_TEST_OOM_COUNT=n]: raise a CUDA OOM when
    the phase starts in step k, the first n times (default: every time, so a retried step fails again)."""
    global _raised
    if os.environ.get("TRAINER_TEST_OOM_PHASE") == phase and int(os.environ.get("TRAINER_TEST_OOM_STEP", "1")) == step + 1:
        if _raised < int(os.environ.get("TRAINER_TEST_OOM_COUNT", "1000000000")):
            _raised += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (TRAINER_TEST_OOM_PHASE)")


def knob(phase: str, plan) -> str:
    """The recipe change that would have avoided an OOM in this phase, with a value to set."""
    if phase in ("train", "recompute"):
        tokens = min(plan.micro_batch_tokens, plan.generation_batch_size * plan.max_model_len)
        if plan.micro_batch_seqs == 1 or tokens <= plan.max_model_len:  # one sequence: a smaller budget cannot split it
            if not plan.gradient_checkpointing:
                return "model.gradient_checkpointing: true"
            if not getattr(plan, "activation_offload", False):
                return "train.activation_offload: true (checkpoints in pinned host memory)"
            if not getattr(plan, "mlp_tile_tokens", 0) and tokens >= 2 * MLP_TILE_TOKENS:
                return f"train.mlp_tiles: true (the MLP in {MLP_TILE_TOKENS:,}-token tiles)"
            return "a shorter grpo.max_completion_length or data.max_prompt_length (train --plan names what fits)"
        advice = f"train.micro_batch_tokens: {max(256, tokens // 2)}"
        if not plan.gradient_checkpointing:
            advice += " (or model.gradient_checkpointing: true)"
        return advice
    if phase == "kv":  # the trainer's cache still holds what vLLM's pool needs back
        return "rollout.kv_release: false (keep the KV pool mapped between phases)"
    if phase == "rollout":
        if plan.rollout_engine == "hf":
            return f"rollout.hf_batch_size: {max(1, plan.hf_batch_size // 2)}"
        return f"rollout.max_num_batched_tokens: {max(256, plan.max_num_batched_tokens // 2)}"
    if phase == "optimizer":
        return "train.optim: adamw_8bit"
    if phase == "start":  # the plan's start-up estimate was short: a little more budget, or no CUDA graphs
        more = f"budget.vram_gb: {(plan.budget_bytes or plan.peak_bytes) * 1.1 / GB:.1f}"
        return more + (" (or rollout.enforce_eager: true)" if plan.cudagraph_capture_sizes else "")
    return "budget.vram_gb: a smaller budget, so the planner leaves more margin"


def explain(phase: str, step: int, plan, error: BaseException, retried: str | None = None) -> OutOfMemory:
    where = "" if phase == "start" else f" phase of step {step + 1}"
    lines = [f"CUDA out of memory in the {PHASE_NAMES.get(phase, phase)}{where}: {str(error)[:160]}"]
    if retried:
        lines.append(f"  the step was retried once with {retried} and ran out again")
    planned = plan.phase_peaks.get("rollout" if phase in ("rollout", "kv", "start") else "train")
    if planned:
        lines.append(f"  planned peak for this phase {planned / GB:.2f} GB (budget "
                     f"{'none' if plan.budget_bytes is None else f'{plan.budget_bytes / GB:.2f} GB'})")
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        free, total = torch.cuda.mem_get_info()
        lines.append(f"  now: torch allocated {stats.get('allocated_bytes.all.current', 0) / GB:.2f} GB, reserved "
                     f"{stats.get('reserved_bytes.all.current', 0) / GB:.2f} GB, peak allocated "
                     f"{stats.get('allocated_bytes.all.peak', 0) / GB:.2f} GB; device used {(total - free) / GB:.2f} "
                     f"of {total / GB:.2f} GB")
    top = sorted(plan.components.items(), key=lambda kv: -kv[1])[:6]
    lines.append("  planned components: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in top))
    snapshot = dump_history() if isinstance(error, torch.cuda.OutOfMemoryError) else None
    if snapshot is not None:
        lines.append(f"  allocations with their stacks: {snapshot} (https://pytorch.org/memory_viz)")
    lines.append(f"  fix: set {knob(phase, plan)}" + ("" if phase == "start" else
                                                      "; the last checkpoint is intact (rerun with --resume)"))
    return OutOfMemory("\n".join(lines))
