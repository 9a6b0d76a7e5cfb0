"""Data parallel plumbing: one process per GPU (or CPU worker) under torchrun; no-ops in a single process.

Each rank samples its own share of the step's prompts with its own engine; the loss weights use global token
and sequence counts, so summing LoRA gradients across ranks gives exactly the single-process gradient.
"""
from __future__ import annotations

import os
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


def sum_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum LoRA gradients over ranks in one flat buffer (they are small: tens of MB)."""
    if world.size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


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
