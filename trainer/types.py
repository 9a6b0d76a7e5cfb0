"""The records passed between stages: a rollout engine's output and the step's batch that every later stage reads.

A reader can follow one batch from the sampler to the loss through `RolloutBatch` alone: prompt and completion
token ids, the sampler's logprobs, rewards per function, advantages and the trainer's recomputed logprobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sampling:
    """How to sample: what the engine needs besides the prompts."""
    n: int  # completions per prompt
    max_tokens: int
    temperature: float = 1.0  # 0: greedy decoding (both engines)
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None  # the step's seed; completion row k (global) samples with seed + k
    first_row: int = 0  # global index of this call's first completion row (data parallel)
    max_tokens_per_request: list[int] | None = None  # per-completion caps, prompt-major (length-mix benchmarks)
    ignore_eos: bool = False  # sample every completion to max_tokens (the worst-case first step)


@dataclass
class Generations:
    """An engine's answer: for prompt i, completions i*n .. i*n+n-1 (prompt-major order)."""
    completion_ids: list[list[int]]  # tokens after the prompt, EOS included when sampled
    logprobs: list[list[float]] | None  # the sampler's logprob of each sampled token (None: not available)
    truncated: list[bool]  # stopped by max_tokens rather than EOS
    # Multi-turn rollouts (trainer/rollout/multi_turn.py) also give, per completion row:
    prompt_ids: list[list[int]] | None = None  # the row's own prompt (an environment's opening messages added)
    sampled: list[list[int]] | None = None  # 1 for the model's tokens, 0 for tool / environment tokens
    messages: list[list[dict]] | None = None  # the conversation after the prompt (what rewards see)
    fixed_reward: list[float | None] | None = None  # a failed conversation's total reward (None: the functions')
    columns: dict[str, list] = field(default_factory=dict)  # extra reward-function arguments, one value per row
    stats: dict[str, float] = field(default_factory=dict)  # metrics of the rollout


@dataclass
class RolloutBatch:
    """One optimizer step's data, B = prompts x num_generations rows, prompt-major."""
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C] right-padded
    completion_valid: torch.Tensor  # [B, C] 1 where a sampled token exists
    completion_mask: torch.Tensor  # [B, C] 1 for tokens that enter the loss (mask_truncated may zero rows)
    sampler_logps: torch.Tensor | None  # [B, C] from the rollout engine
    prompts: list = field(default_factory=list)  # prompt per row (text or chat messages)
    completions: list[str] = field(default_factory=list)
    truncated: torch.Tensor | None = None  # [B] bool
    sampled: torch.Tensor | None = None  # [B, C] 1 for the model's own tokens (None: all valid tokens are)
    rewards: torch.Tensor | None = None  # [B, R] one column per reward function
    reward: torch.Tensor | None = None  # [B] weighted sum
    advantages: torch.Tensor | None = None  # [B]
    old_logps: torch.Tensor | None = None  # [B, C] policy before this step's updates (num_iterations > 1)
    ref_logps: torch.Tensor | None = None  # [B, C] adapter disabled (beta > 0)
    is_ratio: torch.Tensor | None = None  # [B, C] or [B, 1] sampler importance-sampling correction
    fixed_reward: torch.Tensor | None = None  # [B] a failed conversation's total reward, NaN where none
    columns: dict[str, list] = field(default_factory=dict)  # the rollout's extra reward-function arguments
    rollout_stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.size(0)

    @property
    def seq_lengths(self) -> torch.Tensor:
        """Tokens per row that a forward pass must cover (prompt + completion, padding excluded)."""
        return self.prompt_mask.sum(1) + self.completion_valid.sum(1)
