"""Importance-sampling correction for the sampler/trainer logprob gap, as TRL 1.16 does it (`vllm_importance_sampling_*`);
it reweights or masks the policy-gradient term and never changes the loss's normalizer or the KL term.

The rollout engine samples with its own arithmetic (vLLM's kernels, bf16 logits, CUDA graphs), so the trainer's
log-probs of the sampled tokens differ from the sampler's by a small gap. TRL multiplies each token's policy loss by
rho = pi_old / pi_sampler, with pi_old the trainer's log-probs before this step's update (TRL's
`old_per_token_logps`), and bounds rho to [clip_min, clip_max] (clip_min None: no lower bound; clip_max None: none
above). Modes, as in `GRPOTrainer._generate_and_score_completions`:
- `token_truncate` / `token_mask`: one rho per token, exp(logp_old - logp_sampler).
- `sequence_truncate` / `sequence_mask`: one rho per sequence, exp(sum over its loss tokens of the differences), i.e.
  the product of the token ratios, applied to every token of the sequence.
- `*_truncate` clamps rho to the bounds; `*_mask` sets rho to 0 outside them, so a masked sequence (or token) adds
  nothing to the policy term of the gradient (its KL term stays) but still counts in the loss's normalizer.
A token whose sampler log-prob is NaN (vLLM could not score it) gets a zero difference (rho 1), as in TRL.

TRL applies it only under vLLM, because its `generate` path records no sampler log-probs; both our engines record
them (trainer/rollout/hf.py, vllm.py), so it applies to whichever engine ran. An engine that returns none makes the
correction impossible: that is said once in the log and training goes on uncorrected.
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_is_ratio(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                     clip_min: float | None, clip_max: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's ratio pi_old / pi_sampler, truncated or masked to [clip_min, clip_max]: [B, T] for token modes, [B, 1]
    for sequence modes. Also summed statistics over its units (tokens in the mask, or sequences) for logging, as TRL
    logs them: the ratio after truncation/masking, and how many units fell outside the bounds."""
    if mode not in MODES:
        raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}; expected one of {MODES}")
    diff = torch.nan_to_num((old_logps - sampler_logps) * mask, nan=0.0)
    sequence = mode.startswith("sequence")
    if sequence:
        diff = diff.sum(-1, keepdim=True)
    raw = torch.exp(diff)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    outside = (raw < lo) | (raw > hi)
    ratio = torch.clamp(raw, min=clip_min, max=clip_max) if mode.endswith("truncate") else raw.masked_fill(outside, 0.0)
    units = torch.ones_like(ratio, dtype=torch.bool) if sequence else mask.bool()
    vals = ratio[units]
    stats = {"is_n": torch.tensor(float(vals.numel())), "is_sum": vals.sum(), "is_out": outside[units].sum().float()}
    if vals.numel():
        stats["is_min"], stats["is_max"] = vals.min(), vals.max()
    return ratio, stats


class SamplerCorrection:
    """The recipe's `grpo.vllm_importance_sampling_*` settings, applied per micro-batch by the GRPO step."""

    def __init__(self, grpo):
        self.enabled, self.mode = grpo.vllm_importance_sampling_correction, grpo.vllm_importance_sampling_mode
        self.clip_min, self.clip_max = grpo.vllm_importance_sampling_clip_min, grpo.vllm_importance_sampling_clip_max
        self.warned = False

    def __call__(self, old_logps: torch.Tensor, sampler_logps: torch.Tensor | None,
                 mask: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """(ratio to multiply the per-token policy loss by, or None; statistics to add up over micro-batches)."""
        if not self.enabled:
            return None, {}
        if sampler_logps is None:
            if not self.warned:
                log.warning("grpo.vllm_importance_sampling_correction is on, but the rollout engine returned no "
                            "sampler log-probs: training without the correction")
                self.warned = True
            return None, {}
        return sampler_is_ratio(old_logps, sampler_logps, mask, self.mode, self.clip_min, self.clip_max)


def metrics(st: dict, mode: str) -> dict:
    """A step's `is_ratio/...` keys from the statistics summed over its micro-batches (none when the correction did
    not run). mean/min/max are TRL's `sampling/importance_sampling_ratio/*`; `count` is the number of ratios (tokens
    or sequences); `masked_frac` (mask modes) or `truncated_frac` (truncate modes) the share outside the bounds."""
    n = st.get("is_n", 0.0)
    if not n:
        return {}
    outside = "is_ratio/truncated_frac" if mode.endswith("truncate") else "is_ratio/masked_frac"
    return {"is_ratio/mean": st["is_sum"] / n, "is_ratio/min": st["is_min"], "is_ratio/max": st["is_max"],
            "is_ratio/count": n, outside: st["is_out"] / n}
