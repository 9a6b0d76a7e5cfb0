"""GRPO-family policy losses, written so that any split of a step's batch into micro-batches sums to the same loss.

The math is TRL 1.16's `GRPOTrainer._compute_loss` (tests/test_loss_oracle.py runs TRL as the oracle). TRL
normalizes each micro-batch on its own and divides by the accumulation steps, which equals the full-batch loss
only when micro-batches are the same size. Here every token gets a weight computed once from the whole step's
batch (`token_weights`), and a micro-batch contributes sum(per_token_loss * weight): micro-batches of any size,
packed by tokens or by sequences, add up to the one-big-batch loss and gradient exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.utils import nanstd


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    importance_sampling_level: str = "token"
    max_completion_length: int = 256
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    use_bias_correction_kl: bool = True

    @classmethod
    def from_grpo(cls, g) -> "LossConfig":
        return cls(loss_type=g.loss_type, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                   importance_sampling_level=g.importance_sampling_level,
                   max_completion_length=g.max_completion_length, sapo_temperature_pos=g.sapo_temperature_pos,
                   sapo_temperature_neg=g.sapo_temperature_neg, use_bias_correction_kl=g.use_bias_correction_kl)

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def token_weights(mask: torch.Tensor, cfg: LossConfig, total_tokens: float | None = None,
                  num_sequences: int | None = None) -> torch.Tensor:
    """Per-token weights [N, T] that turn sum(per_token_loss * weight) into the step's loss.

    `mask` covers the whole step on this process. `total_tokens` / `num_sequences` are the counts over all
    processes when data-parallel (DAPO normalizes by the global token count); default: this process's.
    """
    mask = mask.float()
    n = mask.size(0) if num_sequences is None else num_sequences
    if cfg.loss_type in ("grpo", "sapo"):  # mean over sequences of the per-sequence token mean
        return mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / n
    if cfg.loss_type == "dr_grpo":  # a constant normalizer: no length bias
        return mask / (n * cfg.max_completion_length)
    if cfg.loss_type in ("bnpo", "dapo", "cispo"):  # mean over every completion token of the batch
        total = mask.sum() if total_tokens is None else torch.as_tensor(total_tokens, dtype=mask.dtype)
        return mask / total.clamp(min=1.0)
    raise ValueError(f"unknown loss_type {cfg.loss_type}")


def policy_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                cfg: LossConfig, old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                is_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch (a share of the step's loss) and summed statistics for logging.

    logps, old_logps, ref_logps, mask, weights: [B, T]; advantages: [B]; is_ratio: the sampler correction's [B, T]
    or [B, 1] (trainer/is_correction.py), multiplying the policy term only, as TRL does.
    Returns (loss, stats) where stats holds masked sums ("*_sum") and "tokens", to be added across micro-batches.
    """
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if cfg.importance_sampling_level == "sequence":  # GSPO: one ratio per sequence
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)

    if cfg.loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=cfg.eps_high).detach() * adv * logps
    elif cfg.loss_type == "sapo":
        temps = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        per_token = -(torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps) * adv
    else:
        coef_2 = torch.clamp(coef_1, 1 - cfg.epsilon, 1 + cfg.eps_high)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if is_ratio is not None:
        per_token = per_token * is_ratio
    kl = None
    if cfg.beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if cfg.use_bias_correction_kl:  # TRL's default: the unbiased reverse-KL gradient (DeepSeek-V3.2)
            kl = kl * coef_1
        per_token = per_token + cfg.beta * kl
    per_token = per_token.expand_as(mask)
    loss = (per_token * mask * weights).sum()

    with torch.no_grad():
        ratio = coef_1.expand_as(mask)
        low = ((ratio < 1 - cfg.epsilon) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + cfg.eps_high) & (adv > 0)).to(mask.dtype)
        stats = {"tokens": mask.sum(), "clip_low_sum": (low * mask).sum(), "clip_high_sum": (high * mask).sum(),
                 "clip_region_sum": (torch.maximum(low, high) * mask).sum()}
        if kl is not None:
            stats["kl_sum"] = (kl * mask).sum()
    return loss, stats


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str) -> torch.Tensor:
    """Group-relative advantages as TRL computes them (mean over the group; std by group, batch or none)."""
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    adv = rewards - mean
    if scale == "group":
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    elif scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        return adv
    return adv / (std + 1e-4)

