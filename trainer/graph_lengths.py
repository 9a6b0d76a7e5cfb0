"""With the train phase replayed from CUDA graphs (plan.train_cudagraphs), every micro-batch is one of a few shapes (its
rows and one length), so that the graphs recorded in the first steps replay in every later one whatever lengths GRPO
samples.

Inductor's cudagraph trees record a graph for each input shape they meet (a warm-up run, then the recording), dynamic
length or not. `pack` (trainer/batch.py) fills each micro-batch with as many rows as fit the plan's token budget and
trims it to its longest row: with sampled lengths nearly every micro-batch of every step is a shape not met before,
and the train phase would record in every step instead of replaying (the random-init benchmarks never show it: their
completions all run to max_completion_length). Here, where the plan replays graphs:
- rows: sorted longest first, then a fixed number at a time, as many rows of the longest length the plan allows
  (plan.max_model_len, prompt + completion) as fit its token budget (or the user's per_device_train_batch_size), so
  that a micro-batch fits the budget however it is padded; every step has the same row counts (the last micro-batch
  may hold fewer, the same number every step);
- length: the plan's longest sequence (plan.max_model_len), whatever the rows' own: one shape a micro-batch count, so
  the graphs recorded in the first two steps replay in every later one (a multi-turn trajectory past it: rounded up
  to 16 tokens, a shape of its own).
Why one length and not a ladder of them: on one H100 (2026-12-07, bench/results/queue_2026-12-07/h, compile 6
train_cudagraphs), config A's eight 279-token sequences, one a micro-batch, with lengths sampled anew each step
(A-mb286-mix) and padded to a ladder 7/8 apart (14 lengths) met new lengths in every one of 6 steps: the graphs held
grew 56, 112, 280, 336, 504, 616, each new length compiled (~1 s) and recorded, the steady step 2.98x the ungraphed
run's, and nvidia-smi's peak rose step by step to 3.48 GB against the 3.41 GB planned (the pool the plan counts,
memory.TRAIN_GRAPH_POOL_BYTES, was measured on one shape). At the fixed 279 tokens, the same graphs replayed from
step 3 (112 held): train phase 0.48 s against 1.46 s ungraphed (medians of steps 3-6), the step 0.66x. The graphed
micro-batch is launch-bound (GRAPHED_LAYER_FLOOR_S): padding a short row to 279 tokens costs next to nothing, so that
train phase, which is what every step gets here whatever it samples, is below the ungraphed one on the sampled
lengths (1.27 s). One long sequence a micro-batch, compute-bound, replays no graphs (plan.cudagraphs_apply); in
between, trainer/cost.py prices the graphed phase at the full length.
The cost: rows that would have shared a micro-batch under `pack` when a step's sequences are short run in more,
full-length micro-batches (what the graphs make cheap: their launches are what they save).

The padding is what a micro-batch's shorter rows get anyway (trainer/batch.py `micro_batch`): completion columns past
every row's end, out of every mask, so the real tokens' log-probs and loss are the unpadded ones
(tests/test_microbatch.py).
"""
from __future__ import annotations

ROUND = 16


def bucket(length: int, longest: int) -> int:
    """The length a micro-batch whose longest row has `length` tokens is padded to: the plan's `longest`; past it (a
    multi-turn trajectory can be) rounded up to 16 tokens."""
    return longest if length <= longest else -(-length // ROUND) * ROUND


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
