"""Rollout engines: who samples completions. One protocol, two backends (HF generate, colocated vLLM).

An engine takes token ids of prompts and a `Sampling` and returns `Generations` (completion ids, the sampler's
logprob of every sampled token, truncation flags). After each optimizer step the loop calls `sync(policy)` so the
engine samples from the updated LoRA weights; `release()`/`acquire()` bracket the training phase so an engine
that holds memory (vLLM's KV pool) can hand it to the trainer. Engines never compute losses or rewards.
"""
from __future__ import annotations

from typing import Protocol

from trainer.types import Generations, Sampling


class RolloutEngine(Protocol):
    name: str

    def attach(self, policy) -> None:
        """Called once the policy is built (vLLM: mirror weights, register the adapter, map LoRA slots)."""
        ...

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> Generations: ...

    def sync(self, policy) -> dict[str, float]:
        """Make the engine sample from the policy's current adapter; returns timing/fidelity stats."""
        ...

    def release(self) -> None:
        """Free memory the trainer may use until `acquire` (no-op for engines that hold none)."""
        ...

    def acquire(self) -> None: ...

    def close(self) -> None: ...


def make_engine(recipe, plan, model_path) -> RolloutEngine:
    """Built before the policy: a vLLM engine loads the base that the policy then shares."""
    if plan.rollout_engine == "vllm":
        from trainer.rollout.vllm import VLLMEngine

        return VLLMEngine(recipe, plan, model_path)
    from trainer.rollout.hf import HFEngine

    return HFEngine(plan.hf_batch_size, plan.hf_compiled_decode, plan.max_model_len)


def sample(engine: RolloutEngine, turns, prompts, idx: list[int], sampling: Sampling) -> Generations:
    """The rows of prompts `idx` (a PromptSet's indices): one completion each from the engine, or, with `turns`
    (rollout/multi_turn.py's MultiTurn), conversations with tools or an environment driven on the same engine."""
    if turns is not None:
        return turns.generate(engine, prompts, idx, sampling)
    return engine.generate([prompts.prompt_ids[i] for i in idx], sampling)
