"""The recipes we ship for real hub models plan on the cards they name, from this CPU machine: `train RECIPE --plan
--gpu GB[:fp16]` plans for a GPU that is not here (a Slurm login node, a laptop before renting one). Each hub model is
stood in for by its random-init shape (trainer/shapes.py: every tensor the real size, tests/test_shapes.py holds the
configs to the published ones) and GSM8K by a local parquet file in the hub dataset's format."""
from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import ROOT, run_train
from trainer.errors import UserError
from trainer.memory import GB

GSM8K = ROOT / "tests" / "data" / "gsm8k_sample.parquet"
# hub model -> the shape that stands in for it; a recipe naming a model not listed here fails the first test
SHAPE = {"Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b", "Qwen/Qwen2.5-1.5B-Instruct": "qwen2.5-1.5b",
         "Qwen/Qwen2.5-7B-Instruct": "qwen2.5-7b", "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b"}
# the card each budget preset stands for: the T4 has no bfloat16
CARD = {15.0: "15:fp16", 24.0: "24"}


def hub_recipes() -> dict[str, dict]:
    out = {}
    for p in sorted((ROOT / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(p.read_text())
        if (raw.get("model") or {}).get("name"):
            out[p.name] = raw
    return out


def local(raw: dict) -> list[str]:
    """Overrides that stand in for the hub: the model's shape, GSM8K's local sample (for the eval split too)."""
    sets = ["model.name=", f"model.shape={SHAPE[raw['model']['name']]}", f"data.dataset={GSM8K}"]
    return sets + ([f"eval.dataset={GSM8K}"] if raw.get("eval") else [])


def test_every_hub_recipe_has_a_stand_in_and_the_7_8b_ones_are_shipped():
    recipes = hub_recipes()
    assert {r["model"]["name"] for r in recipes.values()} <= SHAPE.keys()
    assert {"gsm8k-qwen2.5-7b.yaml", "gsm8k-llama3.1-8b.yaml"} <= recipes.keys()


@pytest.mark.parametrize("name", sorted(hub_recipes()))
def test_each_hub_recipe_plans_within_its_budget_on_the_card_it_names(name, monkeypatch):
    from trainer import api
    from trainer.plan import Device
    from trainer.recipe import load_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = hub_recipes()[name]
    budget = load_recipe(ROOT / "recipes" / name, local(raw)).budget.vram_gb
    recipe, plan = api.plan(ROOT / "recipes" / name, local(raw), device=Device.elsewhere(CARD[float(budget)]))
    assert plan.device == "cuda" and plan.budget_bytes == int(float(budget) * GB)
    assert plan.peak_bytes <= plan.budget_bytes, (name, plan.peak_bytes / GB)
    if recipe.rollout.engine == "vllm":  # the engine is sized in bytes, inside the budget
        assert plan.kv_cache_memory_bytes > 0 and plan.max_num_seqs >= 1 and plan.components.get("vllm_kv_cache", 0) > 0
    # auto: float16 where vLLM samples (the sampler/trainer gap, trainer/plan.py) or the card has no bfloat16
    fp16 = recipe.rollout.engine == "vllm" or CARD[float(budget)].endswith("fp16")
    assert plan.compute_dtype == ("float16" if fp16 else "bfloat16") and plan.loss_scaling == fp16
    assert any("not this machine's" in n for n in plan.notes)  # the plan says which card it is for


def test_the_7b_and_8b_recipes_fit_a_16_gb_card_too(monkeypatch):
    # what their headers promise (`--set budget.vram_gb=16`): vLLM and the trainer share the one nf4 base there
    from trainer import api
    from trainer.plan import Device

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("gsm8k-qwen2.5-7b.yaml", "gsm8k-llama3.1-8b.yaml"):
        raw = hub_recipes()[name]
        _, plan = api.plan(ROOT / "recipes" / name, local(raw) + ["budget.vram_gb=16"], device=Device.elsewhere("16"))
        assert plan.peak_bytes <= 16 * GB and plan.weight_format == "shared_nf4", (name, plan.peak_bytes / GB)


def test_plan_for_a_gpu_that_is_not_here_from_the_command_line():
    raw = hub_recipes()["gsm8k-qwen2.5-7b.yaml"]
    sets = [x for s in local(raw) for x in ("--set", s)]
    out = run_train(["recipes/gsm8k-qwen2.5-7b.yaml", "--plan", "--json", "--gpu", "24", *sets],
                    env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)
    assert plan["device"] == "cuda" and plan["device_name"] == "a 24 GB GPU, not this machine's"
    assert plan["peak_bytes"] <= 24 * GB and plan["rollout_engine"] == "vllm"
    assert plan["alternatives"]["fitting"] >= 1


@pytest.mark.parametrize("args, says", [
    (["--gpu", "24"], "cannot train on one"),  # without --plan: refused before anything loads
    (["--plan", "--gpu", "lots"], "is not a GPU size"),
    (["--plan", "--gpu", "24:int8"], "is not a GPU size"),
])
def test_gpu_flag_mistakes_are_one_message_and_exit_2(args, says):
    out = run_train(["recipes/tiny-cpu.yaml", *args])
    assert out.returncode == 2 and says in out.stdout and "Traceback" not in out.stdout + out.stderr, out.stdout


def test_gpu_spec_parses_sizes_and_fp16():
    from trainer.plan import Device

    d = Device.elsewhere("24gb")
    assert (d.kind, d.total_bytes, d.free_bytes, d.bf16, d.here) == ("cuda", 24 * GB, 24 * GB, True, False)
    assert Device.elsewhere("15:fp16").bf16 is False and Device.elsewhere("80:bf16").total_bytes == 80 * GB
    for bad in ("0", "-3", "nan", "inf", "24:tf32", ""):
        with pytest.raises(UserError):
            Device.elsewhere(bad)


def test_a_budget_larger_than_the_card_is_refused_before_loading():
    # the 24 GB preset on a 16 GB card planned 23.3 GB for it (and would have run out of memory at start-up)
    raw = hub_recipes()["gsm8k-qwen2.5-7b.yaml"]
    sets = [x for s in local(raw) for x in ("--set", s)]
    out = run_train(["recipes/gsm8k-qwen2.5-7b.yaml", "--plan", "--gpu", "16", *sets], env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "error budget.vram_gb: the budget is 24.00 GB" in out.stdout, out.stdout
    assert "at most 16.0" in out.stdout and "Traceback" not in out.stdout + out.stderr
    auto = run_train(["recipes/gsm8k-qwen2.5-7b.yaml", "--plan", "--json", "--gpu", "16", *sets,
                      "--set", "budget.vram_gb=auto"], env={"HF_HUB_OFFLINE": "1"})
    assert auto.returncode == 0, auto.stdout[-2000:] + auto.stderr[-2000:]
    assert json.loads(auto.stdout)["peak_bytes"] <= 16 * GB


def test_the_scale_bench_runs_the_7_8b_recipes_as_shipped():
    # bench/scale.py's recipe rows are what the H200 measures of these recipes: only the hub's model and data are
    # stood in for and the run shortened, and the row's record (batch, length, budget) is the recipe's own
    from bench import scale
    from trainer.recipe import load_recipe

    rows = {n: r for n, r in scale.ROWS.items() if "recipe" in r}
    assert {r["recipe"] for r in rows.values()} == {"recipes/gsm8k-qwen2.5-7b.yaml", "recipes/gsm8k-llama3.1-8b.yaml"}
    for name, row in rows.items():
        sets = scale.overrides(name)
        assert {s.split("=")[0] for s in sets} == {"model.name", "model.shape", "data.dataset", "eval.dataset",
                                                    "logging.wandb", "train.max_steps"}
        assert scale.command(name)[3] == row["recipe"]
        r = load_recipe(ROOT / row["recipe"], sets)
        assert (r.train.generation_batch_size, r.grpo.max_completion_length, float(r.budget.vram_gb)) == (
            row["completions"], row["completion_tokens"], float(row["budget_gb"]))
        assert SHAPE[yaml.safe_load((ROOT / row["recipe"]).read_text())["model"]["name"]] == row["shape"]
