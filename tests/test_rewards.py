"""Reward loading (module:function, file.py:function), TRL's signature, and checks on what functions return."""
from __future__ import annotations

import math

import pytest

from trainer.errors import UserError
from trainer.recipe import validate
from trainer.rewards import RewardFunction, combine, load_rewards, score
from trainer.rewards.builtin import char_class_fraction, extract_answer, length, math_answer, think_answer_format


def recipe_with(functions, base_dir):
    return validate({"model": {"shape": "tiny"}, "data": {"dataset": "x.jsonl"}, "base_dir": str(base_dir),
                     "rewards": [{"function": f} for f in functions]})


def test_module_and_file_references_load(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    funcs = load_rewards(recipe_with(["trainer.rewards.builtin:length", "my_rewards.py:score"], tmp_path))
    assert [f.name for f in funcs] == ["length", "score"]
    table, _ = score(funcs, ["p"] * 2, ["a" * 200, "b"], {})
    assert table[:, 1].tolist() == [1.0, 1.0] and table[0, 0] == 1.0


@pytest.mark.parametrize("ref, needle", [("no_colon", "module:function"), ("trainer.rewards.builtin:nope", "no function"),
                                          ("no.such.module:f", "cannot import"), ("missing.py:f", "not found")])
def test_bad_references_are_user_errors(tmp_path, ref, needle):
    with pytest.raises(UserError) as e:
        load_rewards(recipe_with([ref], tmp_path))
    assert e.value.field == "rewards[0].function" and needle in e.value.problem


def _rf(fn, on_error="raise"):
    return RewardFunction(fn.__name__, fn, 1.0, {}, on_error)


def test_wrong_length_nan_and_non_numbers_are_rejected():
    def short(prompts, completions, **_):
        return [1.0]

    def nan(prompts, completions, **_):
        return [math.nan for _ in completions]

    def text(prompts, completions, **_):
        return ["good" for _ in completions]

    for fn, needle in [(short, "1 values for 2"), (nan, "nan"), (text, "not a number")]:
        with pytest.raises(UserError) as e:
            score([_rf(fn)], ["p", "p"], ["a", "b"], {})
        assert needle in e.value.problem and fn.__name__ in e.value.field


def test_raising_reward_names_the_offending_sample_or_scores_zero():
    def picky(prompts, completions, **_):
        return [1.0 / (len(c) - 3) for c in completions]

    with pytest.raises(UserError) as e:
        score([_rf(picky)], ["p"] * 3, ["aaaaa", "bbb", "cc"], {})
    assert "completion 1" in e.value.problem and "'bbb'" in e.value.problem
    table, failures = score([_rf(picky, "zero")], ["p"] * 3, ["aaaaa", "bbb", "cc"], {})
    assert table[:, 0].tolist() == [0.0, 0.0, 0.0] and failures == {"rewards/picky/failures": 3}


def test_none_means_not_applicable_and_counts_zero_in_the_sum():
    def some(prompts, completions, **_):
        return [None, 2.0]

    funcs = [_rf(some), RewardFunction("w", lambda prompts, completions, **_: [1.0, 1.0], 0.5, {})]
    table, _ = score(funcs, ["p", "p"], ["a", "b"], {})
    assert math.isnan(table[0, 0]) and combine(table, funcs).tolist() == [0.5, 2.5]


def test_dataset_columns_arrive_as_keyword_arguments():
    seen = {}

    def f(prompts, completions, answer, **_):
        seen["answer"] = answer
        return [0.0] * len(completions)

    score([_rf(f)], ["p", "p"], ["a", "b"], {"answer": ["1", "2"]})
    assert seen["answer"] == ["1", "2"]


def test_extract_answer_forms():
    assert extract_answer("so 3+4 = 7\n#### 7") == "7"
    assert extract_answer(r"the answer is \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_answer("<think>x</think><answer> 12 </answer>") == "12"
    assert extract_answer("no answer here") is None


def test_math_answer_matches_gsm8k_references_and_chat_completions():
    refs = ["Natalia sold 48/2 = 24 clips.\n#### 72", "#### 1,000", "5"]
    comps = [[{"role": "assistant", "content": "...<answer>72</answer>"}], "#### 1000", r"\boxed{6}"]
    assert math_answer(None, comps, refs) == [1.0, 1.0, 0.0]


def test_format_and_length_rewards():
    assert think_answer_format(None, ["<think>a</think><answer>1</answer>", "<answer>1</answer>"]) == [1.0, 0.0]
    assert length(None, ["x" * 100, "x" * 50, "x" * 400], target=100) == [1.0, 0.5, -1.0]


def test_toy_char_class_reward():
    assert char_class_fraction(None, ["12ab", "aeio"], target=["digits", "vowels"]) == [0.5, 1.0]
