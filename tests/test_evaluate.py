"""Held-out evaluation: pass@k and accuracy for 0/1 rewards, the eval section's checks, an evaluation that leaves
the training run untouched, and `train eval` on a saved checkpoint agreeing with the in-training evaluation."""
from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, TRAINED_RUN_ARGS, run_train
from trainer.errors import UserError
from trainer.evaluate import Evaluator, default_ks, pass_at_k
from trainer.recipe import EvalSection, load_recipe
from trainer.rewards import RewardFunction


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert abs(pass_at_k(n, c, k) - exact) < 1e-12, (n, c, k)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4] and default_ks(1) == [1]


def test_accuracy_and_pass_at_k_are_reported_for_0_1_rewards_only():
    fns = [RewardFunction("correct", None, 1.0, {}), RewardFunction("fraction", None, 0.5, {})]
    ev = Evaluator(EvalSection(dataset="x", num_samples=4, temperature=1.0), None, fns, None, 8, 10)
    # 2 prompts x 4 samples (prompt-major): prompt 0 has 1 correct sample, prompt 1 has 3 (one None: not correct)
    correct = [1, 0, 0, 0, 1, 1, 1, float("nan")]
    fraction = [0.5, 0.25, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    m = ev.summarize(torch.tensor([correct, fraction]).T, torch.full((8,), 5.0), torch.zeros(8, dtype=torch.bool), {})
    assert m["eval/rewards/correct/accuracy"] == pytest.approx(4 / 8)
    assert m["eval/rewards/correct/pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert m["eval/rewards/correct/pass@2"] == pytest.approx(((1 - 3 / 6) + 1.0) / 2)
    assert m["eval/rewards/correct/pass@4"] == 1.0
    assert m["eval/rewards/correct/mean"] == pytest.approx(4 / 7)  # None does not apply (TRL's nanmean)
    assert m["eval/rewards/fraction/mean"] == pytest.approx(3.75 / 8)
    assert not any(k.startswith("eval/rewards/fraction/") and k != "eval/rewards/fraction/mean" for k in m)
    total = [1 * c + 0.5 * f if not math.isnan(c) else 0.5 * f for c, f in zip(correct, fraction)]
    assert m["eval/reward_mean"] == pytest.approx(sum(total) / 8) and m["eval/prompts"] == 2


@pytest.mark.parametrize("eval_yaml, field, words", [
    ("{every_steps: 10}", "recipe", "eval.dataset is required"),  # a local data file has no held-out split
    ("{dataset: data/tiny_task_eval.jsonl, max_completion_length: 64}", "recipe", "grpo.max_completion_length"),
    ("{dataset: data/tiny_task_eval.jsonl, num_samples: 4}", "recipe", "greedy"),
    ("{dataset: data/tiny_task_eval.jsonl, num_samples: 4, temperature: 1.0, pass_k: [8]}", "recipe", "pass_k"),
    ("{dataset: data/tiny_task_eval.jsonl, every_step: 5}", "eval.every_step", "every_steps"),
])
def test_eval_section_mistakes_are_user_errors(eval_yaml, field, words):
    with pytest.raises(UserError) as e:
        load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", [f"eval={eval_yaml}"])
    assert words in e.value.message, e.value.message
    assert e.value.field == field


def test_hub_eval_defaults_to_the_data_sections_dataset_with_the_test_split(tmp_path):
    from trainer.evaluate import eval_data

    recipe = load_recipe(ROOT / "recipes" / "gsm8k-qwen2.5-1.5b.yaml", ["eval={max_prompts: 100}"])
    d = eval_data(recipe, recipe.eval)
    assert (d.dataset, d.subset, d.split) == (recipe.data.dataset, recipe.data.subset, "test")
    assert d.prompt_template == recipe.data.prompt_template and d.system_prompt == recipe.data.system_prompt


@pytest.fixture(scope="module")
def stack(_cache):
    from trainer.plan import Device, make_plan
    from trainer.policy import load_policy, read_config, resolve_model_path
    from trainer.rewards import load_rewards
    from trainer.rollout import make_engine

    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["logging.wandb=false", "lora.lora_dropout=0.1"])
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    engine = make_engine(recipe, plan, resolve_model_path(recipe.model))
    policy = load_policy(recipe, plan, engine)
    engine.attach(policy)
    with torch.no_grad():  # a non-zero adapter, as after training
        g = torch.Generator().manual_seed(3)
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return recipe, engine, policy, load_rewards(recipe)


def test_evaluation_leaves_rng_mode_and_adapter_untouched_and_repeats_exactly(stack):
    recipe, engine, policy, rewards = stack
    evaluator = Evaluator.build(recipe, policy.tokenizer, rewards)  # sampled: temperature 1, 4 samples
    assert evaluator.ev.temperature > 0 and len(evaluator.prompts) == 32
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    adapter = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    policy.model.train()
    first = evaluator.run(engine)
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])  # the HF engine seeds torch per chunk; restored after
    assert policy.model.training  # dropout back on for the next training step
    assert all(torch.equal(p, adapter[n]) for n, p in policy.model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in policy.model.parameters())
    again = evaluator.run(engine)
    same = {k: v for k, v in first.items() if k != "eval/time_s"}
    assert same == {k: v for k, v in again.items() if k != "eval/time_s"}  # same prompts, same seeds
    assert first["eval/samples_per_prompt"] == 4 and "eval/rewards/char_class_all/pass@4" in first


def test_greedy_evaluation_is_deterministic_and_differs_from_sampling(stack):
    recipe, engine, policy, rewards = stack
    greedy = EvalSection(dataset="data/tiny_task_eval.jsonl", max_prompts=8)
    ev = Evaluator.build(recipe, policy.tokenizer, rewards, greedy)
    a, b = ev.run(engine, samples=True), ev.run(engine, samples=True)
    assert a["samples"] == b["samples"] and len(a["samples"]) == 8 and a["eval/prompts"] == 8
    sampled = Evaluator.build(recipe, policy.tokenizer, rewards, greedy.model_copy(update={"temperature": 1.0,
                                                                                           "seed": 1}))
    assert sampled.run(engine, samples=True)["samples"] != a["samples"]


def test_a_run_with_eval_trains_exactly_as_without(trained_run, tmp_path):
    out = run_train([*TRAINED_RUN_ARGS, "--set", "eval=", "--output-dir", str(tmp_path / "plain")])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with_eval, plain = metrics(trained_run), metrics(tmp_path / "plain")
    assert [m["step"] for m in with_eval if "eval/reward_mean" in m] == [2, 4]  # every 2 steps and at the end
    assert not any(k.startswith("eval/") for m in plain for k in m)
    volatile = ("eval/", "time_", "tokens_per_s", "unix_time", "peak_", "gc_")  # gc_: the process's heap, not the math
    for a, b in zip(with_eval, plain):
        a = {k: v for k, v in a.items() if not k.startswith(volatile)}
        assert a == {k: v for k, v in b.items() if not k.startswith(volatile)}
    ours = (trained_run / "checkpoints" / "step-0000004" / "adapter_model.safetensors").read_bytes()
    assert ours == (tmp_path / "plain" / "checkpoints" / "step-0000004" / "adapter_model.safetensors").read_bytes()
    assert (trained_run / "plots" / "eval_reward.png").is_file()
    assert (trained_run / "plots" / "eval_accuracy.png").is_file()


def test_train_eval_on_a_checkpoint_matches_the_in_training_evaluation(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "step-0000004"
    out = run_train(["eval", "recipes/tiny-cpu.yaml", "--checkpoint", str(ckpt), *TRAINED_RUN_ARGS[1:],
                     "--output", str(tmp_path / "eval.json")])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["step"] == 4 and record["engine"] == "hf" and len(record["samples"]) == 32
    assert len(record["samples"][0]["completions"]) == 4 and "char_class_all" in record["samples"][0]["rewards"]
    assert "rewards/char_class_all/pass@4" in out.stdout  # the table
    logged = metrics(trained_run)[-1]
    for k, v in record["metrics"].items():
        if k != "eval/time_s":
            assert v == pytest.approx(logged[k], abs=1e-6), k  # the same policy, prompts and seeds


def test_train_eval_without_eval_section_uses_the_data_rows(trained_run, tmp_path):
    ckpt = tmp_path / "step-0000002"
    shutil.copytree(trained_run / "checkpoints" / ckpt.name, ckpt)
    out = run_train(["eval", "recipes/tiny-cpu.yaml", "--set", "eval=", "--set", "logging.wandb=false",
                     "--checkpoint", str(ckpt)])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no eval section" in out.stdout
    record = json.loads((ckpt / "eval.json").read_text())  # default: next to the adapter
    assert record["metrics"]["eval/prompts"] == 64 and record["metrics"]["eval/samples_per_prompt"] == 1


def test_train_eval_with_a_missing_checkpoint_exits_2(tmp_path):
    out = run_train(["eval", "recipes/tiny-cpu.yaml", "--checkpoint", str(tmp_path / "nope")])
    assert out.returncode == 2, out.stdout + out.stderr
    assert "checkpoint not found" in out.stdout and "Traceback" not in out.stderr


def test_eval_and_generate_report_bad_prompts_before_any_weight_loads(trained_run, tmp_path, monkeypatch):
    from trainer import api

    def forbidden(*a, **k):
        raise AssertionError("weights loaded before the prompts were checked")

    monkeypatch.setattr(api, "load_trained", forbidden)
    with pytest.raises(UserError) as e:
        api.evaluate(ROOT / "recipes" / "tiny-cpu.yaml", trained_run / "checkpoints" / "step-0000004",
                     ["eval.prompt_column=question"])
    assert "'question'" in e.value.problem
    (tmp_path / "rows.jsonl").write_text('{"text": "no prompt column here"}\n')
    with pytest.raises(UserError) as e:
        api.generate(trained_run, prompts_file=tmp_path / "rows.jsonl")
    assert e.value.field.startswith("--prompts-file")
