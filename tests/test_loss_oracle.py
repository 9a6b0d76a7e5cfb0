"""Our GRPO losses equal TRL 1.16's `GRPOTrainer._compute_loss` (the oracle) on the same inputs, within 1e-5,
for every loss type, with our loss summed over uneven micro-batches and TRL's computed on the whole batch."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import tiny_qwen2, trl_loss_and_grads
from trainer.batch import pack
from trainer.loss import LossConfig, policy_loss, token_weights
from trainer.policy import Policy, completion_logprobs

CASES = [
    dict(loss_type="grpo"), dict(loss_type="dr_grpo"), dict(loss_type="dapo"), dict(loss_type="bnpo"),
    dict(loss_type="cispo", epsilon_high=3.0), dict(loss_type="sapo"),
    dict(loss_type="grpo", importance_sampling_level="sequence"),  # GSPO
    dict(loss_type="dapo", beta=0.04), dict(loss_type="dr_grpo", beta=0.1, epsilon_high=0.28),
]
B, P, C, TEMP = 8, 6, 10, 0.9


@pytest.fixture
def setup():
    """A fresh LoRA model per case: TRL adds a 'ref' adapter to the model it is given when beta != 0."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from trainer.shapes import build_tokenizer

    tok = build_tokenizer(256)
    model = get_peft_model(tiny_qwen2(vocab=256), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ds = Dataset.from_list([{"prompt": "hi"}] * 8)
    return model, tok, ds, GRPOConfig, GRPOTrainer, isinstance(tok, PreTrainedTokenizerFast)


def make_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 256, (B, P), generator=g)
    completion_ids = torch.randint(3, 256, (B, C), generator=g)
    lengths = torch.randint(2, C + 1, (B,), generator=g)
    mask = (torch.arange(C)[None] < lengths[:, None]).long()
    advantages = torch.randn(B, generator=g)
    noise = torch.randn(B, C, generator=g)
    return prompt_ids, completion_ids, mask, advantages, noise


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_loss_and_grads_match_trl(setup, tmp_path, case):
    model, tok, ds, GRPOConfig, GRPOTrainer, _ = setup
    cfg_kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=B, num_generations=4, report_to="none",
                  max_completion_length=C, temperature=TEMP, beta=0.0, use_cpu=True, bf16=False, epsilon=0.2)
    cfg_kw.update(case)
    args = GRPOConfig(**cfg_kw)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
                          train_dataset=ds, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    prompt_ids, completion_ids, mask, adv, noise = make_inputs(hash(str(case)) % 1000)
    policy = Policy(model, tok, torch.device("cpu"), torch.float32, False, tmp_path)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([torch.ones_like(prompt_ids), mask], 1)
    with torch.no_grad():
        cur, _ = completion_logprobs(policy, input_ids, attn, completion_ids, mask, TEMP, 64, 100)
    old = (cur + 0.15 * noise) * mask  # ratios away from 1, so clipping engages
    ref = (cur - 0.1 * noise.flip(0)) * mask
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
              "num_items_in_batch": mask.sum()}
    if args.beta != 0.0:
        inputs["ref_per_token_logps"] = ref

    params, trl_loss, trl_grads = trl_loss_and_grads(trainer, model, inputs)

    lcfg = LossConfig.from_grpo(_grpo_section(args))
    weights = token_weights(mask, lcfg)
    ours = torch.zeros(())
    for rows in pack((P + mask.sum(1)).tolist(), token_budget=3 * (P + C)):  # uneven micro-batches
        r = torch.tensor(rows)
        lp, _ = completion_logprobs(policy, input_ids[r], attn[r], completion_ids[r], mask[r], TEMP, 7, 100)
        loss, _ = policy_loss(lp, adv[r], mask[r], weights[r], lcfg, old[r],
                              ref[r] if args.beta != 0.0 else None)
        loss.backward()
        ours = ours + loss.detach()
    assert torch.allclose(ours, trl_loss.detach(), atol=1e-5, rtol=1e-5), (float(ours), float(trl_loss))
    for p, g in zip(params, trl_grads):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)


def _grpo_section(args):
    from trainer.recipe import GRPOSection

    names = {f for f in GRPOSection.model_fields}
    values = {k: v for k, v in dataclasses.asdict(args).items() if k in names and v is not None}
    values.pop("top_k", None)
    values.pop("vllm_importance_sampling_mode", None)
    values.pop("vllm_importance_sampling_correction", None)
    values.pop("vllm_importance_sampling_clip_max", None)
    values.pop("mask_truncated_completions", None)
    values.pop("scale_rewards", None)
    return GRPOSection(**values)
