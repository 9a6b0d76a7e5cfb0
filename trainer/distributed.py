"""Data parallel plumbing: one process per GPU (or CPU worker) under torchrun; no-ops in a single process.

Each rank samples its own share of the step's prompts with its own engine; the loss weights use global token
and sequence counts, so summing LoRA gradients across ranks gives exactly the single-process gradient.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_size() -> int:
    """Processes in this job as torchrun (or Slurm's srun + torchrun) announces them; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> World:
    size = launched_size()
    if size == 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            backend = "cpu:gloo,cuda:nccl"  # gradients over NCCL; step counts and metrics are CPU tensors
        dist.init_process_group(backend=backend)
    return World(rank, size, local)


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_gradients(params: list[torch.nn.Parameter], world: World, times: dict | None = None) -> None:
    """Sum LoRA gradients over ranks in one flat buffer (they are small: tens of MB).

    With `times`, two per-rank timers are added to it: "grad_wait" (a one-element all-reduce first: how long this
    rank waited for the slowest rank to finish its backward) and "grad_allreduce" (the gradient transfer itself).
    The extra collective costs one small message per step; it is what lets a benchmark tell imbalance from transfer.
    """
    if world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if times is not None:
        t0 = _synced(flat.device)
        dist.all_reduce(torch.zeros(1, device=flat.device), op=dist.ReduceOp.SUM)
        t1 = _synced(flat.device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if times is not None:
        t2 = _synced(flat.device)
        times["grad_wait"] = times.get("grad_wait", 0.0) + t1 - t0
        times["grad_allreduce"] = times.get("grad_allreduce", 0.0) + t2 - t1
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def _synced(device: torch.device) -> float:
    """perf_counter after the device's queued work (collectives included) has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def gather_objects(obj, world: World) -> list:
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world: World):
    """Rank 0's value on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
