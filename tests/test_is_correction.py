"""The sampler/trainer importance-sampling correction is TRL 1.16's: the same ratios (computed by TRL's own
`_generate_and_score_completions` with vLLM's sampling log-probs handed in), the same loss and gradients (TRL's
`_compute_loss`), the same logged ratio statistics, for every `vllm_importance_sampling_mode`; it is logged every
step, merged over ranks, and an engine without sampler log-probs trains uncorrected with one warning."""
from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import tiny_qwen2, trl_loss_and_grads
from trainer import is_correction
from trainer.batch import pack
from trainer.is_correction import SamplerCorrection, sampler_is_ratio
from trainer.loss import LossConfig, policy_loss, token_weights
from trainer.metrics import merge_ranks
from trainer.policy import Policy, completion_logprobs

B, P, C, G, TEMP = 8, 6, 10, 4, 0.9
CASES = [
    dict(mode="token_truncate"), dict(mode="token_mask"), dict(mode="sequence_truncate"), dict(mode="sequence_mask"),
    dict(mode="sequence_mask", clip_min=0.5),  # both bounds
    dict(mode="token_truncate", clip_min=0.8, clip_max=1.25),
    dict(mode="token_mask", clip_min=0.8, clip_max=None),  # a lower bound only
    dict(mode="sequence_mask", loss_type="grpo", beta=0.04),  # the KL term is not reweighted
]


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ratio_loss_grads_and_logged_stats_equal_trls(tmp_path, case):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import GRPOConfig, GRPOTrainer

    from trainer.shapes import build_tokenizer

    mode, clip_min, clip_max = case["mode"], case.get("clip_min"), case.get("clip_max", 3.0)
    tok = build_tokenizer(256)
    model = get_peft_model(tiny_qwen2(vocab=256), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    # B completions of G per prompt, uneven lengths, none ending in EOS/pad (so TRL's masks equal ours)
    prompt_ids = torch.randint(3, 256, (B // G, P), generator=g).repeat_interleave(G, 0)
    lengths = torch.randint(2, C + 1, (B,), generator=g)
    lengths[0] = C
    completion_ids = torch.randint(3, 256, (B, C), generator=g)
    mask = (torch.arange(C)[None] < lengths[:, None]).long()
    policy = Policy(model, tok, torch.device("cpu"), torch.float32, False, tmp_path)
    input_ids, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([torch.ones_like(prompt_ids), mask], 1)
    with torch.no_grad():
        cur, _ = completion_logprobs(policy, input_ids, attn, completion_ids, mask, TEMP, 64, 100)
    # The sampler's log-probs: the policy's plus a per-sequence drift and token noise, so that some tokens and some
    # whole sequences fall outside the bounds and some inside; one token vLLM could not score (NaN).
    drift = torch.linspace(-0.25, 0.25, B)[torch.randperm(B, generator=g)].unsqueeze(1)
    sampler = (cur + drift + 0.3 * torch.randn(B, C, generator=g)) * mask
    sampler[1, 0] -= 2.0  # a token ratio of ~e^2, above C_max = 3
    sampler[3, 1] += 2.0  # ~e^-2, below C_min
    sampler[2, 1] = float("nan")
    rewards = torch.randn(B, generator=g).tolist()

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=B, num_generations=G, report_to="none",
                      max_completion_length=C, temperature=TEMP, beta=case.get("beta", 0.0), use_cpu=True,
                      bf16=False, loss_type=case.get("loss_type", "dapo"), vllm_importance_sampling_correction=True,
                      vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                      vllm_importance_sampling_clip_max=clip_max)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **k: rewards, args=args,
                          train_dataset=Dataset.from_list([{"prompt": "hi"}] * B), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    # TRL's vLLM path with vLLM's answer handed in: ids and sampling log-probs (a NaN stays NaN, as vLLM's None does)
    trainer.use_vllm = True
    trainer._generate = lambda prompts: (
        prompt_ids.tolist(), [completion_ids[i, :lengths[i]].tolist() for i in range(B)], None, ["c"] * B,
        [sampler[i, :lengths[i]].tolist() for i in range(B)], {}, None, None)
    model.train()
    out = trainer._generate_and_score_completions([{"prompt": "hi"}] * B)
    trl_ratio = out["importance_sampling_ratio"]
    logged = {k.rsplit("/", 1)[1]: v[-1] for k, v in trainer._metrics["train"].items()
              if k.startswith("sampling/importance_sampling_ratio/")}
    assert torch.equal(out["completion_mask"].long(), mask)

    params, trl_loss, trl_grads = trl_loss_and_grads(trainer, model, out)

    # Ours: the ratio from the training forward's detached log-probs (num_iterations 1: pi_old is the current
    # policy), per uneven micro-batch, as grpo_step does.
    lcfg = LossConfig(loss_type=args.loss_type, beta=args.beta, max_completion_length=C)
    adv = out["advantages"]
    weights = token_weights(mask, lcfg)
    ours, parts = torch.zeros(()), []
    groups = pack((P + mask.sum(1)).tolist(), token_budget=3 * (P + C))
    assert len(groups) > 1
    for rows in groups:
        r = torch.tensor(rows)
        lp, _ = completion_logprobs(policy, input_ids[r], attn[r], completion_ids[r], mask[r], TEMP, 7, 100)
        isr, st = sampler_is_ratio(lp.detach(), sampler[r], mask[r], mode, clip_min, clip_max)
        assert torch.allclose(isr, trl_ratio[r], atol=1e-5, rtol=1e-4), (mode, isr, trl_ratio[r])
        loss, _ = policy_loss(lp, adv[r], mask[r], weights[r], lcfg, None,
                              out["ref_per_token_logps"][r] if args.beta else None, isr)
        loss.backward()
        ours, parts = ours + loss.detach(), parts + [st]
    assert torch.allclose(ours, trl_loss.detach(), atol=1e-5, rtol=1e-5), (float(ours), float(trl_loss))
    for p, gr in zip(params, trl_grads):
        assert torch.allclose(p.grad, gr, atol=1e-5, rtol=1e-4)

    # The step's is_ratio/* keys (micro-batch statistics merged as grpo_step merges them) are TRL's logged ones.
    st = {k: sum(float(x[k]) for x in parts) for k in ("is_n", "is_sum", "is_out")}
    st["is_min"], st["is_max"] = min(float(x["is_min"]) for x in parts), max(float(x["is_max"]) for x in parts)
    m = is_correction.metrics(st, mode)
    assert m["is_ratio/mean"] == pytest.approx(logged["mean"], rel=1e-5)
    assert m["is_ratio/min"] == pytest.approx(logged["min"], rel=1e-5, abs=1e-7)
    assert m["is_ratio/max"] == pytest.approx(logged["max"], rel=1e-5)
    # The fraction outside the bounds, by hand from TRL's own old log-probs (NaN: difference 0, ratio 1)
    diff = torch.nan_to_num((out["old_per_token_logps"] - sampler) * mask, nan=0.0)
    raw = torch.exp(diff.sum(1)) if mode.startswith("sequence") else torch.exp(diff)[mask.bool()]
    outside = ((raw < (clip_min or 0.0)) | (raw > (clip_max or math.inf))).float().mean()
    key = "is_ratio/truncated_frac" if mode.endswith("truncate") else "is_ratio/masked_frac"
    assert m[key] == pytest.approx(float(outside))
    assert 0 < m[key] < 1, "the case must exercise the bounds: some units inside, some outside"
    assert m["is_ratio/count"] == (B if mode.startswith("sequence") else int(mask.sum()))


def test_sequence_mask_by_hand():
    """Two sequences: the per-sequence ratio is exp(sum of the token log-ratios), and a sequence outside [C_min,
    C_max] gets ratio 0 on every token (its tokens still count in the loss normalizer: the weights are unchanged)."""
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    samp = torch.tensor([[-1.5, -2.5, -9.0], [-1.0, -0.8, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the third token is padding: its difference does not count
    ratio, st = sampler_is_ratio(old, samp, mask, "sequence_mask", None, 2.0)
    assert ratio.shape == (2, 1)
    assert ratio[0, 0] == 0.0  # exp(0.5 + 0.5) = e > 2: masked
    assert ratio[1, 0] == pytest.approx(math.exp(-0.2))
    assert float(st["is_out"]) == 1 and float(st["is_n"]) == 2
    trunc, _ = sampler_is_ratio(old, samp, mask, "sequence_truncate", None, 2.0)
    assert trunc[0, 0] == 2.0
    tok, _ = sampler_is_ratio(old, samp, mask, "token_mask", 0.8, 1.5)
    assert torch.allclose(tok, torch.tensor([[0.0, 0.0, 1.0], [1.0, math.exp(-0.2), 1.0]]))


def test_an_engine_without_sampler_logprobs_trains_uncorrected_and_says_so_once(caplog):
    grpo = SimpleNamespace(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="sequence_mask",
                           vllm_importance_sampling_clip_min=None, vllm_importance_sampling_clip_max=3.0)
    corr = SamplerCorrection(grpo)
    logps, mask = torch.randn(2, 3), torch.ones(2, 3)
    with caplog.at_level(logging.WARNING, logger="trainer.is_correction"):
        for _ in range(3):
            assert corr(logps, None, mask) == (None, {})
    assert len(caplog.records) == 1 and "no sampler log-probs" in caplog.records[0].getMessage()
    off = SamplerCorrection(SimpleNamespace(**{**vars(grpo), "vllm_importance_sampling_correction": False}))
    assert off(logps, logps - 1.0, mask) == (None, {})


def test_ratio_stats_merge_over_ranks_by_count_and_extremes():
    a = {"step": 1, "loss": 0.1, "is_ratio/mean": 1.0, "is_ratio/min": 0.5, "is_ratio/max": 2.0,
         "is_ratio/count": 30.0, "is_ratio/masked_frac": 0.0, "logp_gap_max": 0.2, "completion_length_max": 12.0}
    b = {"step": 1, "loss": 0.2, "is_ratio/mean": 0.0, "is_ratio/min": 0.0, "is_ratio/max": 0.0,
         "is_ratio/count": 10.0, "is_ratio/masked_frac": 1.0, "logp_gap_max": 0.5, "completion_length_max": 9.0}
    m = merge_ranks([a, b])
    assert m["is_ratio/mean"] == pytest.approx(0.75) and m["is_ratio/masked_frac"] == pytest.approx(0.25)
    assert (m["is_ratio/min"], m["is_ratio/max"], m["is_ratio/count"]) == (0.0, 2.0, 40.0)
    assert (m["logp_gap_max"], m["completion_length_max"]) == (0.5, 12.0)
    assert m["loss"] == pytest.approx(0.3)


def test_a_training_run_logs_the_ratio_every_step(trained_run):
    """The tiny recipe (HF engine, which records its sampler log-probs; TRL's defaults: on, sequence_mask) logs
    is_ratio/* on every step; with LoRA dropout on in that run the trainer's forward differs from the sampler's."""
    lines = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines
    for m in lines:
        for k in ("is_ratio/mean", "is_ratio/min", "is_ratio/max", "is_ratio/masked_frac", "is_ratio/count"):
            assert k in m, (k, sorted(m))
        assert 0.0 <= m["is_ratio/min"] <= m["is_ratio/mean"] <= m["is_ratio/max"] <= 3.0
        assert 0.0 <= m["is_ratio/masked_frac"] <= 1.0
        assert m["is_ratio/count"] == 64  # sequence mode: one ratio per completion (8 prompts x 8)
    # the ratios are the trainer's forward (dropout on) over the sampler's, not 1 everywhere: from step 2 (LoRA B = 0
    # at step 1, where dropout changes nothing) they spread (0.54-0.66 to 1.45-2.05 in steps 2-4 on the CPU)
    assert any(m["is_ratio/max"] - m["is_ratio/min"] > 0.1 for m in lines[1:]), [
        (m["is_ratio/min"], m["is_ratio/max"]) for m in lines]


def test_recipe_bounds_are_checked_as_trl_checks_them(tmp_path):
    from trainer.errors import UserError
    from trainer.recipe import load_recipe

    base = "model: {shape: tiny}\ndata: {dataset: d.jsonl}\nrewards: [{function: trainer.rewards.builtin:length}]\n"
    path = tmp_path / "r.yaml"
    path.write_text(base)
    g = load_recipe(path).grpo  # TRL 1.16's defaults
    assert (g.vllm_importance_sampling_correction, g.vllm_importance_sampling_mode,
            g.vllm_importance_sampling_clip_min, g.vllm_importance_sampling_clip_max) == (True, "sequence_mask", None, 3.0)
    with pytest.raises(UserError) as e:
        load_recipe(path, ["grpo.vllm_importance_sampling_clip_min=3.0"])
    assert e.value.field == "grpo" and "must be less than" in e.value.problem
    with pytest.raises(UserError) as e:
        load_recipe(path, ["grpo.vllm_importance_sampling_mode=token_truncate", "grpo.vllm_importance_sampling_clip_max="])
    assert "needs vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max" in e.value.problem
    # a mask mode without bounds is allowed (TRL: nothing is masked); TRL's deprecated name still sets clip_max
    load_recipe(path, ["grpo.vllm_importance_sampling_clip_max="])
    with pytest.warns(FutureWarning, match="vllm_importance_sampling_cap"):
        assert load_recipe(path, ["grpo.vllm_importance_sampling_cap=2.0"]).grpo.vllm_importance_sampling_clip_max == 2.0
