"""Recipe loading: includes, overrides, and one clear UserError per mistake."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT
from trainer.errors import UserError
from trainer.recipe import load_recipe

BASE = """
model: {shape: tiny}
data: {dataset: data.jsonl}
rewards: [{function: trainer.rewards.builtin:length}]
"""


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error(tmp_path, text, overrides=()) -> UserError:
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, text), list(overrides))
    return e.value


def test_shipped_recipes_validate():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.rewards and recipe.model


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    e = error(tmp_path, BASE + "grpo: {num_generation: 4}\n")
    assert e.field == "grpo.num_generation" and "num_generations" in e.fix


def test_unknown_top_level_section_is_suggested(tmp_path):
    e = error(tmp_path, BASE + "trian: {max_steps: 3}\n")
    assert e.field == "trian" and "'train'" in e.fix


def test_wrong_type_names_field_and_value(tmp_path):
    e = error(tmp_path, BASE + "train: {learning_rate: fast}\n")
    assert e.field == "train.learning_rate" and "fast" in e.problem


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    e = error(tmp_path, BASE + "grpo:\n  beta: [0.1\n")
    assert "line" in e.problem and "column" in e.problem


def test_missing_recipe_file():
    with pytest.raises(UserError) as e:
        load_recipe("no/such/recipe.yaml")
    assert "not found" in e.value.problem


def test_set_overrides_nested_fields_with_yaml_types(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["grpo.beta=0.04", "lora.target_modules=[q_proj, v_proj]",
                                             "train.generation_batch_size=16"])
    assert r.grpo.beta == 0.04 and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.train.generation_batch_size == 16


def test_include_presets_merge_under_the_recipe(tmp_path):
    write(tmp_path, "lora: {r: 64, lora_alpha: 128}\nbudget: {vram_gb: 15}\n", "preset.yaml")
    r = load_recipe(write(tmp_path, "include: [preset.yaml, budgets/24gb]\nlora: {r: 8}\n" + BASE))
    assert r.lora.r == 8 and r.lora.lora_alpha == 128 and r.budget.vram_gb == 24.0


def test_missing_include_is_reported(tmp_path):
    e = error(tmp_path, "include: nope.yaml\n" + BASE)
    assert e.field == "include"


def test_model_needs_exactly_one_source(tmp_path):
    e = error(tmp_path, BASE.replace("{shape: tiny}", "{shape: tiny, name: Qwen/Qwen2.5-0.5B}"))
    assert e.field == "model"


def test_batch_must_hold_whole_groups(tmp_path):
    e = error(tmp_path, BASE + "grpo: {num_generations: 8}\ntrain: {generation_batch_size: 12}\n")
    assert "multiple" in e.problem


def test_trl_style_batch_fields_give_the_generation_batch(tmp_path):
    r = load_recipe(write(tmp_path, BASE + "grpo: {num_generations: 4}\n"
                          "train: {per_device_train_batch_size: 4, gradient_accumulation_steps: 3}\n"))
    assert r.train.generation_batch_size == 12


def test_bad_override_syntax(tmp_path):
    with pytest.raises(UserError) as e:
        load_recipe(write(tmp_path, BASE), ["grpo.beta"])
    assert e.value.field == "--set"
