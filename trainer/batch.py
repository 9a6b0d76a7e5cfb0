"""Turns an engine's generations into the step's `RolloutBatch`, and splits it into token-budgeted micro-batches.

Micro-batches are packed by padded token count (rows sorted by length, so little padding), not by a fixed
number of sequences: long completions get small micro-batches, short ones large (verl's use_dynamic_bsz). The
loss weights are computed once for the whole batch (trainer/loss.py), so packing never changes the math.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from trainer import graph_lengths
from trainer.env import to_device
from trainer.types import Generations, RolloutBatch


def build_batch(prompt_ids: list[list[int]], prompts: list, gens: Generations, n: int, pad_id: int,
                decode, conversational: bool, mask_truncated: bool) -> RolloutBatch:
    """Rows are prompt-major: prompt i's completions are rows i*n .. i*n+n-1. A multi-turn rollout brings each row's
    own prompt and marks the model's tokens (`gens.sampled`): only those enter the loss."""
    rows = len(gens.completion_ids)
    row_prompts = gens.prompt_ids or [prompt_ids[r // n] for r in range(rows)]
    p_len = max(len(p) for p in row_prompts)
    c_len = max(1, max(len(c) for c in gens.completion_ids))
    p_ids = torch.full((rows, p_len), pad_id, dtype=torch.long)
    p_mask = torch.zeros((rows, p_len), dtype=torch.long)
    c_ids = torch.full((rows, c_len), pad_id, dtype=torch.long)
    c_valid = torch.zeros((rows, c_len), dtype=torch.long)
    sampled = torch.zeros((rows, c_len), dtype=torch.long) if gens.sampled is not None else None
    s_logps = torch.zeros((rows, c_len)) if gens.logprobs is not None else None
    for r in range(rows):
        p, c = row_prompts[r], gens.completion_ids[r]
        p_ids[r, p_len - len(p):] = torch.tensor(p, dtype=torch.long)
        p_mask[r, p_len - len(p):] = 1
        if c:
            c_ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
            c_valid[r, :len(c)] = 1
            if s_logps is not None:
                s_logps[r, :len(c)] = torch.tensor(gens.logprobs[r][:len(c)], dtype=torch.float32)
            if sampled is not None:
                sampled[r, :len(c)] = torch.tensor(gens.sampled[r][:len(c)], dtype=torch.long)
    truncated = torch.tensor(gens.truncated, dtype=torch.bool)
    c_mask = c_valid.clone() if sampled is None else sampled.clone()
    if mask_truncated:
        c_mask[truncated] = 0
    if gens.messages is not None:
        completions = gens.messages
    else:
        texts = decode(gens.completion_ids)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    fixed = None
    if gens.fixed_reward is not None:
        fixed = torch.tensor([math.nan if v is None else float(v) for v in gens.fixed_reward])
    return RolloutBatch(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_valid=c_valid,
                        completion_mask=c_mask, sampler_logps=s_logps, truncated=truncated, sampled=sampled,
                        prompts=[prompts[r // n] for r in range(rows)], completions=completions,
                        fixed_reward=fixed, columns=dict(gens.columns), rollout_stats=dict(gens.stats))


def pack(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group row indices into micro-batches whose padded size (rows x longest row) fits the token budget.

    Rows are taken longest first; a row longer than the budget gets a micro-batch of its own. A last micro-batch of
    one row behind one of several shares that one's rows instead (both halves fit: each is no wider and no taller than
    the one that fit): compiled layers specialise a batch of one, so a lone tail row would compile every layer variant
    again (3 graphs, 3.5-12 s, on the CPU's tiny recipe, 2026-12-05).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) > 1 and len(groups[-1]) == 1 and len(groups[-2]) > 1:
        rows = groups[-2] + groups[-1]  # still longest first
        half = (len(rows) + 1) // 2
        groups[-2:] = [rows[:half], rows[half:]]
    return groups


def groups_of_step(lengths: list[int], plan, graphs: bool) -> tuple[list[list[int]], functools.partial | None]:
    """The step's micro-batches (row indices) and the length each is padded to (None: its rows' own): packed by the
    plan's token budget, or its fixed count of rows; a fixed count and one length where the train phase replays
    CUDA graphs (trainer/graph_lengths.py)."""
    if graphs:
        rows = graph_lengths.rows_per_micro_batch(plan.micro_batch_tokens, plan.max_model_len, plan.micro_batch_seqs)
        return graph_lengths.groups(lengths, rows), functools.partial(graph_lengths.bucket, longest=plan.max_model_len)
    if plan.micro_batch_seqs is None:
        return pack(lengths, plan.micro_batch_tokens), None
    return fixed_chunks(len(lengths), plan.micro_batch_seqs), None


def fixed_chunks(n: int, size: int) -> list[list[int]]:
    """Fixed micro-batches of `size` rows in batch order (for comparison with `pack`)."""
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


@dataclass
class MicroBatch:
    rows: torch.Tensor  # indices into the step's batch
    input_ids: torch.Tensor  # [b, p + c] trimmed to this micro-batch's longest prompt and completion
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor  # [b, c]
    completion_valid: torch.Tensor
    c_len: int  # completion columns: the rows' longest, or the padded width (trainer/graph_lengths.py)
    own: torch.Tensor  # [b, c] the model's own tokens (= completion_valid but in a multi-turn row)

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def micro_batch(batch: RolloutBatch, rows: list[int], device, length=None) -> MicroBatch:
    """The rows trimmed to their longest prompt and completion; `length(tokens) -> padded tokens`
    (trainer/graph_lengths.py, where the plan replays CUDA graphs) pads the completion side further, with columns out
    of every mask."""
    idx = torch.tensor(rows, dtype=torch.long)
    p_mask = batch.prompt_mask[idx]
    p_keep = int(p_mask.sum(1).max())
    c_valid = batch.completion_valid[idx]
    c_keep = max(1, int(c_valid.sum(1).max()))
    width = c_keep if length is None else length(p_keep + c_keep) - p_keep
    p_ids = batch.prompt_ids[idx][:, -p_keep:]
    c_ids = _width(batch.completion_ids[idx][:, :c_keep], width)
    c_valid = _width(c_valid[:, :c_keep], width)
    input_ids = to_device(torch.cat([p_ids, c_ids], 1), device)
    mask = to_device(torch.cat([p_mask[:, -p_keep:], c_valid], 1), device)
    own = c_valid if batch.sampled is None else _width(batch.sampled[idx][:, :c_keep], width)
    return MicroBatch(idx, input_ids, mask, to_device(c_ids, device), to_device(c_valid, device), width,
                      to_device(own, device))


def _width(t: torch.Tensor, width: int) -> torch.Tensor:
    """[b, c] trimmed, or right-padded with zeros (token ids, masks and log-probs alike: out of every mask) to `width`
    columns."""
    if t.size(1) >= width:
        return t[:, :width]
    return torch.cat([t, t.new_zeros((t.size(0), width - t.size(1)))], 1)


def take(t: torch.Tensor | None, mb: MicroBatch, device) -> torch.Tensor | None:
    """Rows of a per-batch [B, C] (or [B]) tensor for a micro-batch, trimmed to its completion width."""
    if t is None:
        return None
    t = t[mb.rows]
    if t.dim() == 2 and t.size(1) > 1:
        t = _width(t, mb.c_len)
    return to_device(t, device)
