"""Prompt datasets: local jsonl/parquet/csv in the hub format, templates, chat templates, errors, ordering."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT
from trainer.data import load_prompts
from trainer.errors import UserError
from trainer.recipe import DataSection
from trainer.shapes import build_tokenizer

DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(384)


@pytest.mark.parametrize("ext", ["jsonl", "parquet", "csv"])
def test_local_files_with_template(tok, ext):
    d = DataSection(dataset=f"gsm8k_sample.{ext}", prompt_template="Q: {question}", chat_template=False)
    ps = load_prompts(d, tok, DATA)
    import json

    rows = [json.loads(x) for x in (DATA / "gsm8k_sample.jsonl").read_text().splitlines() if x.strip()]
    assert len(ps) == len(rows) == 24  # the three files hold the same rows, in the same order
    assert ps.prompts == ["Q: " + r["question"] for r in rows] and ps.columns["answer"] == [r["answer"] for r in rows]
    assert ps.prompt_ids[0] == tok(ps.prompts[0])["input_ids"]


def test_missing_prompt_column_lists_the_columns(tok):
    with pytest.raises(UserError) as e:
        load_prompts(DataSection(dataset="gsm8k_sample.jsonl"), tok, DATA)
    assert e.value.field == "data.prompt_column" and "question" in e.value.fix


def test_template_with_unknown_column(tok):
    with pytest.raises(UserError) as e:
        load_prompts(DataSection(dataset="gsm8k_sample.jsonl", prompt_template="{problem}"), tok, DATA)
    assert "problem" in e.value.problem


def test_missing_file(tok):
    with pytest.raises(UserError) as e:
        load_prompts(DataSection(dataset="nope.jsonl"), tok, DATA)
    assert "not found" in e.value.problem


def test_chat_messages_use_the_chat_template_and_system_prompt(tok):
    d = DataSection(dataset="chat_sample.jsonl", system_prompt="be brief")
    ps = load_prompts(d, tok, DATA)
    assert ps.conversational and ps.prompts[0][0] == {"role": "system", "content": "be brief"}
    text = tok.decode(ps.prompt_ids[0])
    assert text.startswith("<|im_start|>system\nbe brief") and text.endswith("<|im_start|>assistant\n")


def test_long_prompts_are_cut_from_the_left(tok):
    d = DataSection(dataset="gsm8k_sample.jsonl", prompt_template="{question}", max_prompt_length=8,
                    chat_template=False)
    ps = load_prompts(d, tok, DATA)
    full = tok(ps.prompts[0])["input_ids"]
    assert ps.prompt_ids[0] == full[-8:] and ps.truncated == 24


def test_order_is_a_pure_function_of_seed_and_step(tok):
    ps = load_prompts(DataSection(dataset="gsm8k_sample.jsonl", prompt_template="{question}"), tok, DATA)
    steps = [ps.indices(s, 5, seed=7) for s in range(10)]
    assert steps == [ps.indices(s, 5, seed=7) for s in range(10)]
    first_epoch = [i for s in steps for i in s][:24]
    assert sorted(first_epoch) == list(range(24))  # every prompt once per epoch
    assert steps != [ps.indices(s, 5, seed=8) for s in range(10)]
