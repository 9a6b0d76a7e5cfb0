"""With the train phase replayed from CUDA graphs (plan.train_cudagraphs), every micro-batch is one of a few shapes, so
that the graphs recorded in the first steps replay in every later one whatever lengths GRPO samples.

Inductor's cudagraph trees record a graph for each input shape they meet (a warm-up run, then the recording), dynamic
length or not. `pack` (trainer/batch.py) fills each micro-batch with as many rows as fit the plan's token budget and
trims it to its longest row: with sampled lengths nearly every micro-batch of every step is a shape not met before,
and the train phase would record in every step instead of replaying (the random-init benchmarks never show it: their
completions all run to max_completion_length). Here, where the plan replays graphs:
- rows: sorted longest first, then a fixed number at a time, as many rows of the longest length the plan allows
  (plan.max_model_len, prompt + completion) as fit its token budget (or the user's per_device_train_batch_size), so
  that a micro-batch fits the budget however it is padded; every step has the same row counts (the last micro-batch
  may hold fewer, the same number every step);
- length: the smallest bucket at or above the micro-batch's longest row. The buckets are the longest length, and it
  times (7/8)^k rounded up to 16 tokens down to 64, then the multiples of 16 below: padding under 1/8 of a length + 16
  tokens; 21 lengths for 640 tokens, 35 for 4k, of which a run whose lengths cluster meets a few.
The cost: rows that would have shared a micro-batch under `pack` when a step's sequences are short run in more, smaller
micro-batches (what the graphs make cheap: their launches are what they save), plus the padding.

The padding is what a micro-batch's shorter rows get anyway (trainer/batch.py `micro_batch`): completion columns past
every row's end, out of every mask, so the real tokens' log-probs and loss are the unpadded ones
(tests/test_microbatch.py).
"""
from __future__ import annotations

import functools

RATIO = 7 / 8
ROUND = 16
FLOOR = 64


def _round_up(n: int) -> int:
    return -(-n // ROUND) * ROUND


@functools.lru_cache(maxsize=64)
def buckets(longest: int) -> tuple[int, ...]:
    """The lengths a micro-batch is padded to, ascending, for a plan whose longest sequence is `longest` tokens."""
    out, length = {longest}, float(longest)
    while length * RATIO >= FLOOR:
        length *= RATIO
        out.add(min(_round_up(int(length + 0.999999)), longest))
    out.update(range(ROUND, min(out), ROUND))
    return tuple(sorted(out))


def bucket(length: int, longest: int) -> int:
    """The bucket a micro-batch whose longest row has `length` tokens is padded to; past `longest` (a multi-turn
    trajectory can be) rounded up to 16 tokens."""
    for b in buckets(longest):
        if b >= length:
            return b
    return _round_up(length)


def rows_per_micro_batch(token_budget: int, longest: int, fixed: int | None = None) -> int:
    """Rows of every micro-batch but the last: the user's fixed count, or as many of the longest length as fit the
    token budget (at least one): the planner's budgets are whole multiples of it (trainer/plan.py)."""
    return fixed or max(1, token_budget // longest)


def recorded_graphs() -> int:
    """CUDA graphs inductor's cudagraph trees hold on this device (every node of every tree): a step's metric
    (`cuda_graphs`, trainer/grpo.py), so a run that records after its first steps shows it."""
    import torch
    from torch._inductor import cudagraph_trees

    if not torch.cuda.is_available():
        return 0
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    if manager is None:
        return 0
    nodes, n = [node for roots in manager.roots.values() for node in roots], 0
    while nodes:
        node = nodes.pop()
        n += 1
        nodes.extend(child for children in node.children.values() for child in children)
    return n


def groups(lengths: list[int], rows: int) -> list[list[int]]:
    """Row indices longest first, `rows` at a time (the last group holds the remainder)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + rows] for s in range(0, len(order), rows)]
