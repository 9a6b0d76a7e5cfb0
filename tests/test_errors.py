"""The catalogue of user mistakes, through the `train` command: each gives exit code 2, one message that names the
field or file and the fix, and no traceback."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tests.conftest import ROOT, run_train

TINY = ROOT / "recipes" / "tiny-cpu.yaml"
QUICK = ["--set", "train.max_steps=1", "--set", "logging.plots=false"]


def recipe_file(tmp_path, body: str, name: str = "r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return str(p)


def reward_module(tmp_path, body: str) -> str:
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(body))
    return "my_rewards.py:score"


def tiny_with(tmp_path, reward: str = "trainer.rewards.builtin:char_class_fraction", extra: str = "") -> str:
    data = ROOT / "recipes" / "data" / "tiny_task.jsonl"
    return recipe_file(tmp_path, f"""
        model: {{shape: tiny}}
        data: {{dataset: {data}, chat_template: false, max_prompt_length: 32}}
        rewards: [{{function: "{reward}"}}]
        grpo: {{num_generations: 4, max_completion_length: 8}}
        train: {{max_steps: 1, generation_batch_size: 8}}
        logging: {{wandb: false, plots: false}}
        {extra}
    """)


def case(tmp_path, name):
    """(argv, words the message must contain) for each catalogue entry."""
    nan_reward = reward_module(tmp_path, "def score(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n")
    if name == "unknown key":
        return [str(TINY), "--set", "grpo.num_generation=4"], ["grpo.num_generation", "num_generations"]
    if name == "wrong type":
        return [str(TINY), "--set", "train.learning_rate=fast"], ["train.learning_rate", "fast"]
    if name == "yaml syntax":
        return [recipe_file(tmp_path, "model:\n  shape: [tiny\n")], ["line", "column"]
    if name == "missing recipe":
        return [str(tmp_path / "nope.yaml")], ["recipe", "not found"]
    if name == "dataset missing":
        return [str(TINY), "--set", "data.dataset=no_such.jsonl"], ["data.dataset", "not found"]
    if name == "prompt column missing":
        return [str(TINY), "--set", "data.prompt_column=question"], ["data.prompt_column", "'target'"]
    if name == "reward not importable":
        return [str(TINY), "--set", "rewards=[{function: 'no_such_mod:f'}]"], ["rewards[0].function", "cannot import"]
    if name == "reward wrong length":
        ref = reward_module(tmp_path, "def score(prompts, completions, **kw):\n    return [1.0]\n")
        return [tiny_with(tmp_path, ref)], ["reward score", "1 values for 8"]
    if name == "reward nan":
        return [tiny_with(tmp_path, nan_reward)], ["reward score", "nan"]
    if name == "reward not a number":
        ref = reward_module(tmp_path, "def score(prompts, completions, **kw):\n    return ['x'] * len(completions)\n")
        return [tiny_with(tmp_path, ref)], ["reward score", "not a number"]
    if name == "reward raises":
        ref = reward_module(tmp_path, "def score(prompts, completions, **kw):\n    raise KeyError('oops')\n")
        return [tiny_with(tmp_path, ref)], ["reward score", "offending sample", "on_error: zero"]
    if name == "lora target absent":
        return [str(TINY), "--set", "lora.target_modules=[q_proj, qkv]"], ["lora.target_modules", "qkv", "down_proj"]
    if name == "budget infeasible":
        return [str(TINY), "--set", "budget.vram_gb=0.0001"], ["budget.vram_gb", "at least"]
    if name == "completion beyond context":
        return [str(TINY), "--set", "grpo.max_completion_length=5000"], ["grpo.max_completion_length", "context"]
    if name == "resume without checkpoint":
        return [str(TINY), "--resume", "--output-dir", str(tmp_path / "fresh")], ["--resume", "no complete checkpoint"]
    if name == "resume corrupt checkpoint":
        bad = tmp_path / "bad" / "checkpoints" / "step-0000001"
        bad.mkdir(parents=True)
        (bad / "manifest.json").write_text(json.dumps({"step": 1, "files": {"adapter_model.safetensors": 99}}))
        return [str(TINY), "--resume", str(bad), "--output-dir", str(tmp_path / "bad")], ["--resume", "not a complete"]
    if name == "existing run dir":
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "metrics.jsonl").write_text("{}\n")
        return [str(TINY), "--output-dir", str(tmp_path / "old")], ["output dir", "--resume"]
    if name == "bad override syntax":
        return [str(TINY), "--set", "grpo.beta"], ["--set", "key=value"]
    if name == "unknown shape":
        return [str(TINY), "--set", "model.shape=gpt5"], ["model.shape", "tiny"]
    if name == "no model source":
        return [str(TINY), "--set", "model.shape="], ["model", "exactly one"]
    if name == "compile cache not writable":
        (tmp_path / "a_file").write_text("")
        return [str(TINY), "--set", f"train.compile_cache_dir={tmp_path / 'a_file' / 'cache'}"], \
            ["train.compile_cache_dir", "cannot write", "a_file"]
    raise KeyError(name)


CATALOGUE = ["unknown key", "wrong type", "yaml syntax", "missing recipe", "dataset missing", "prompt column missing",
             "reward not importable", "reward wrong length", "reward nan", "reward not a number", "reward raises",
             "lora target absent", "budget infeasible", "completion beyond context", "resume without checkpoint",
             "resume corrupt checkpoint", "existing run dir", "bad override syntax", "unknown shape", "no model source",
             "compile cache not writable"]


# Run as users run them, in a `train` process of their own: the reward mistakes (each case's reward module is
# imported by name, and its worker pool is a process tree) and one parse error. The rest call the same entry point,
# trainer.cli.main, in this process: an exception escaping it fails the test as a traceback would, and each case
# costs no interpreter start (~15 s of imports apiece on 2 cores).
OWN_PROCESS = {"reward wrong length", "reward nan", "reward not a number", "reward raises", "yaml syntax"}


@pytest.mark.parametrize("name", CATALOGUE)
def test_user_error_is_one_clear_message(tmp_path, name, monkeypatch, capsys):
    argv, words = case(tmp_path, name)
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "run")]
    if name in OWN_PROCESS:
        out = run_train(argv + QUICK, cwd=tmp_path)
        code, text = out.returncode, out.stdout + out.stderr
    else:
        from trainer import cli

        monkeypatch.chdir(tmp_path)
        code = cli.main(argv + QUICK)
        captured = capsys.readouterr()
        text = captured.out + captured.err
    assert code == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "fix:" in text, text[-2000:]
    for w in words:
        assert w.lower() in text.lower(), (w, text[-2000:])


def test_vllm_that_cannot_load_is_a_user_error(tmp_path):
    """A vllm build for another CUDA fails at import with an OSError: one message, exit 2."""
    fake = tmp_path / "fakevllm" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise OSError('libcudart.so.13: cannot open shared object file')\n")
    import os

    out = run_train([str(TINY), "--set", "rollout.engine=vllm", "--output-dir", str(tmp_path / "run")] + QUICK,
                    env={"PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}", "TRAINER_FORCE_VLLM_CPU": "1"})
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    assert "rollout.engine" in text and "libcudart" in text


def test_gpu_without_bf16_refuses_bfloat16_and_auto_picks_float16():
    from trainer.plan import Device, make_plan
    from trainer.policy import read_config
    from trainer.recipe import load_recipe
    from trainer.errors import UserError

    old = Device("cuda", "Tesla T4", 16e9, 15e9, bf16=False)
    plan = make_plan(read_config(load_recipe(TINY).model), load_recipe(TINY), old)
    assert plan.compute_dtype == "float16"
    with pytest.raises(UserError) as e:
        make_plan(read_config(load_recipe(TINY).model), load_recipe(TINY, ["model.dtype=bfloat16"]), old)
    assert e.value.field == "model.dtype" and "float16" in e.value.fix


def test_wsl_turns_pinned_memory_off_and_says_so(monkeypatch):
    from trainer import env
    from trainer.plan import Device, make_plan
    from trainer.policy import read_config
    from trainer.recipe import load_recipe

    env.is_wsl.cache_clear()
    monkeypatch.setenv("TRAINER_ASSUME_WSL", "1")
    try:
        plan = make_plan(read_config(load_recipe(TINY).model), load_recipe(TINY), Device("cuda", "RTX 4090", 24e9, 23e9))
        assert any("WSL" in n and "pinned" in n for n in plan.notes)
        calls = []

        class T:
            def pin_memory(self):
                calls.append("pin")
                return self

            def to(self, *a, **k):
                calls.append("to")
                return self

        import torch

        env.to_device(T(), torch.device("cuda"))
        assert calls == ["to"]  # no pinned staging copy under WSL
    finally:
        env.is_wsl.cache_clear()


def test_a_gpu_torch_cannot_use_is_named_not_taken_for_a_cpu_machine(monkeypatch, tmp_path):
    """An NVIDIA driver is installed but torch sees no GPU (a CPU-only torch, or torch's CUDA 13 on an older driver):
    the plan says so in a warning instead of quietly training on the CPU, and a vLLM recipe is refused with the reason
    and its fix rather than "no GPU is visible"."""
    from trainer import env
    from trainer.errors import UserError
    from trainer.plan import Device, make_plan
    from trainer.policy import read_config
    from trainer.recipe import load_recipe

    recipe = load_recipe(TINY)
    monkeypatch.setattr(env, "DRIVER_FILE", tmp_path / "absent")
    assert env.unusable_gpu() is None
    assert not any("NVIDIA" in n for n in make_plan(read_config(recipe.model), recipe, Device("cpu")).notes)
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 "
                                      "22:23:56 UTC 2024\nGCC version:  gcc version 12.3.0\n")
    monkeypatch.setattr(env, "DRIVER_FILE", tmp_path / "version")
    plan = make_plan(read_config(recipe.model), recipe, Device("cpu"))
    warning = [n for n in plan.notes if n.startswith("WARNING") and "driver 550.54.15" in n]
    assert warning and "CPU-only build" in warning[0] and "trains on the CPU" in warning[0], plan.notes
    with pytest.raises(UserError) as e:
        make_plan(read_config(recipe.model), load_recipe(TINY, ["rollout.engine=vllm"]), Device("cpu"))
    assert e.value.field == "rollout.engine" and "CPU-only build" in str(e.value) and "torch" in e.value.fix
    # torch's CUDA build on a driver older than its CUDA: torch's own reason, and the driver as the fix
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def too_old():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12040). Please update it.")

    monkeypatch.setattr(torch.cuda, "init", too_old)
    why, fix = env.unusable_gpu()
    assert "too old (found version 12040)" in why and "CUDA 13.0" in why and "driver" in fix
