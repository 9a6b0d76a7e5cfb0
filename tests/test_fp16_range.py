"""trainer/fp16_range.py: a float16 run reads a few of its prompts before the first step and stops at start-up, naming
the layer and the dtype to use, when the checkpoint's activations pass float16's 65,504."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from tests.conftest import ROOT, run_train
from trainer import fp16_range
from trainer.errors import UserError
from trainer.plan import Device, make_plan
from trainer.policy import load_policy, read_config
from trainer.recipe import load_recipe

PROMPTS = [list(range(5, 25)), list(range(30, 42))]


def _scaled_model(tmp_path, tiny_model_dir, factor: float):
    """The tiny checkpoint with layer 0's MLP up and down projections x factor: at 300 its weights stay inside
    float16 (|w| < 140) while the layer's output passes 65,504, as a bf16-trained checkpoint's outliers can."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / f"scaled_{factor:g}"
    shutil.copytree(tiny_model_dir, out)
    w = load_file(out / "model.safetensors")
    for k in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        w[k] = w[k] * factor
    assert max(float(v.abs().max()) for v in w.values()) < 65504 / 100
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _policy(model, dtype="float16"):
    sets = ["rollout.engine=hf", f"model.dtype={dtype}"]
    sets += [f"model.name={model}", "model.shape=null"] if model else []
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", sets)
    plan = make_plan(read_config(recipe.model), recipe, Device("cpu"))
    return plan, load_policy(recipe, plan)


def test_the_range_check_passes_a_fitting_checkpoint_notes_a_close_one_and_stops_an_overflowing_one(
        tmp_path, tiny_model_dir):
    notes = []
    plan, policy = _policy(None)
    got = fp16_range.check(plan, policy, PROMPTS, note=notes.append)
    assert got["finite"] and 0 < got["max_abs"] < 65504 / fp16_range.HEADROOM and got["layer"] in (0, 1) and not notes

    plan, policy = _policy(_scaled_model(tmp_path, tiny_model_dir, 100.0))  # ~50,000: fits, within 4x of the range
    got = fp16_range.check(plan, policy, PROMPTS, note=notes.append)
    assert got["finite"] and 65504 / fp16_range.HEADROOM < got["max_abs"] <= 65504 and got["layer"] == 0, got
    assert len(notes) == 1 and "model.dtype: bfloat16" in notes[0] and "layer 0" in notes[0], notes

    plan, policy = _policy(_scaled_model(tmp_path, tiny_model_dir, 300.0))
    with pytest.raises(UserError) as e:
        fp16_range.check(plan, policy, PROMPTS)
    assert e.value.field == "model.dtype" and "layer 0 of 2" in e.value.problem
    assert e.value.fix == "set model.dtype: bfloat16"
    # the same weights in float32 hold the same activations without overflow: the check is float16's alone
    plan32, policy32 = _policy(tmp_path / "scaled_300", "float32")
    assert fp16_range.check(plan32, policy32, PROMPTS) is None
    with torch.no_grad():
        h = policy32.hidden_states(input_ids=torch.tensor([PROMPTS[0]]), use_cache=False)
    assert torch.isfinite(h).all()


def test_the_fallback_is_bfloat16_where_the_card_has_it_else_float32_with_the_hf_engine():
    plan = make_plan(read_config(load_recipe(ROOT / "recipes" / "tiny-cpu.yaml").model),
                     load_recipe(ROOT / "recipes" / "tiny-cpu.yaml"), Device("cpu"))
    t4 = dataclasses.replace(plan, device_capability=(7, 5), rollout_engine="vllm")
    assert fp16_range.fallback(dataclasses.replace(plan, device_capability=(9, 0))) == "model.dtype: bfloat16"
    assert fp16_range.fallback(t4).startswith("model.dtype: float32 with rollout.engine: hf")
    assert fp16_range.fallback(dataclasses.replace(t4, rollout_engine="hf")) == (
        "model.dtype: float32; this card has no bfloat16")


def test_train_stops_at_start_up_with_exit_2_when_float16_overflows(tmp_path, tiny_model_dir):
    model = _scaled_model(tmp_path, tiny_model_dir, 300.0)
    run_dir = tmp_path / "run"
    out = run_train(["recipes/tiny-cpu.yaml", "--set", f"model.name={model}", "--set", "model.shape=null", "--set",
                     "model.dtype=float16", "--set", "train.max_steps=2", "--set", "eval=null",
                     "--output-dir", str(run_dir)])
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "model.dtype" in text and "layer 0 of 2 overflows" in text and "set model.dtype: bfloat16" in text
    assert "Traceback" not in text
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip()
    assert json.loads((run_dir / "plan.json").read_text())["compute_dtype"] == "float16"


def test_where_auto_chose_float16_train_starts_again_in_bfloat16_and_finishes(tmp_path, tiny_model_dir, monkeypatch):
    """model.dtype auto (float16 here through the CPU's stand-in for a GPU's choice) on a checkpoint that overflows
    float16: `train` says so, replaces itself with the same command in bfloat16 over the run dir it had begun, and
    trains; the recipe it ran records the dtype. A recipe that names float16 stops instead (the test above)."""
    model = _scaled_model(tmp_path, tiny_model_dir, 300.0)
    run_dir = tmp_path / "run"
    out = run_train(["recipes/tiny-cpu.yaml", "--set", f"model.name={model}", "--set", "model.shape=null", "--set",
                     "train.max_steps=2", "--set", "eval=null",
                     "--output-dir", str(run_dir)], env={"TRAINER_TEST_CPU_AUTO_DTYPE": "float16"})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "layer 0 of 2 overflows" in text and "model.dtype auto: starting again in bfloat16" in text, text[-3000:]
    assert "Traceback" not in text
    assert json.loads((run_dir / "plan.json").read_text())["compute_dtype"] == "bfloat16"
    assert json.loads((run_dir / "recipe.json").read_text())["model"]["dtype"] == "bfloat16"
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # `train eval` of its checkpoint reads its own prompts first in float16 too, and starts again in bfloat16
    ckpt = next((run_dir / "checkpoints").glob("step-*"))
    out = run_train(["eval", "recipes/tiny-cpu.yaml", "--checkpoint", str(ckpt), "--set", f"model.name={model}",
                     "--set", "model.shape=null", "--set", "eval.max_prompts=4"],
                    env={"TRAINER_TEST_CPU_AUTO_DTYPE": "float16"})
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "model.dtype auto: starting again in bfloat16" in text, text[-3000:]
    assert "Traceback" not in text and (ckpt / "eval.json").is_file()
    # on a GPU, eval of a run that trained in float16 under auto takes float16 from its plan.json (api.trained_dtype,
    # here with an H100 standing in); the recipe still left the dtype to auto, so the overflow offers the restart
    from trainer import api

    (run_dir / "plan.json").write_text(json.dumps({"compute_dtype": "float16"}))
    h100 = Device.elsewhere("80:sm90")
    real = api.trained_dtype
    monkeypatch.setattr(api, "trained_dtype", lambda recipe, adapter, device, console=None: real(recipe, adapter, h100))
    with pytest.raises(fp16_range.Float16Overflow) as stop:
        api.evaluate(ROOT / "recipes" / "tiny-cpu.yaml", ckpt,
                     [f"model.name={model}", "model.shape=null", "eval.max_prompts=4"])
    assert stop.value.restart == ["model.dtype=bfloat16"]
    # under torchrun (or any multi-rank launch) a rank's exec would leave its peers behind: exit 2 as for float16
    out = run_train(["recipes/tiny-cpu.yaml", "--set", f"model.name={model}", "--set", "model.shape=null", "--set",
                     "train.max_steps=2", "--set", "eval=null", "--output-dir", str(tmp_path / "run2")],
                    env={"TRAINER_TEST_CPU_AUTO_DTYPE": "float16", "TORCHELASTIC_RUN_ID": "t"})
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "set model.dtype: bfloat16" in text and "starting again" not in text, text[-3000:]


def test_where_auto_chose_float16_a_run_whose_steps_turn_non_finite_resumes_in_bfloat16(tmp_path):
    """Steps 3 and 4 non-finite in float16 alone (the test hook's float16: prefix; an overflow bfloat16 holds): the
    float16 run stops on them (train.max_nonfinite_steps 2) with its last checkpoint at step 3 (a skipped step leaves
    the weights as they were), and `train` starts again in bfloat16 from it and finishes: metrics.jsonl keeps float16's
    steps 1-3 (3 skipped) and bfloat16's step 4."""
    run_dir = tmp_path / "run"
    out = run_train(["recipes/tiny-cpu.yaml", "--set", "train.max_steps=4", "--set", "checkpoint.save_steps=1",
                     "--set", "train.max_nonfinite_steps=2", "--set", "eval=null", "--output-dir", str(run_dir)],
                    env={"TRAINER_TEST_CPU_AUTO_DTYPE": "float16", "TRAINER_TEST_NAN_AT_STEPS": "float16:3,4"})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "2 consecutive steps with non-finite" in text and "starting again in bfloat16 from the last checkpoint" in text
    assert json.loads((run_dir / "plan.json").read_text())["compute_dtype"] == "bfloat16"
    m = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in m] == [1, 2, 3, 4] and [x["skipped"] for x in m] == [0, 0, 1, 0], m
    assert [("loss_scale" in x) for x in m] == [True, True, True, False]  # float16's steps, then bfloat16's
    # a recipe that names float16 stops there (exit 5), as before
    out = run_train(["recipes/tiny-cpu.yaml", "--set", "train.max_steps=4", "--set", "train.max_nonfinite_steps=2",
                     "--set", "eval=null", "--set", "model.dtype=float16", "--output-dir", str(tmp_path / "named")],
                    env={"TRAINER_TEST_NAN_AT_STEPS": "float16:3,4"})
    assert out.returncode == 5 and "starting again" not in out.stdout, out.stdout[-3000:]


def test_only_a_float16_run_auto_chose_on_a_card_with_bfloat16_resumes_in_bfloat16(tmp_path):
    """fp16_range.overflowed_in_training reads the run's plan.json and recipe.json as `train` wrote them (the
    capability a JSON list)."""
    def stop(dtype, capability, asked="auto"):
        (tmp_path / "plan.json").write_text(json.dumps({"compute_dtype": dtype, "device_capability": capability,
                                                        "rollout_engine": "vllm"}))
        (tmp_path / "recipe.json").write_text(json.dumps({"model": {"dtype": asked}}))
        return fp16_range.overflowed_in_training(tmp_path)

    got = stop("float16", [9, 0])
    assert (got.restart, got.resume, got.field) == (["model.dtype=bfloat16"], "auto", "model.dtype")
    assert stop("float16", [7, 5]) is None  # a T4: float32 with the HF engine is the user's call
    assert stop("float16", [9, 0], "float16") is None and stop("bfloat16", [9, 0]) is None
    assert fp16_range.overflowed_in_training(tmp_path / "absent") is None


def test_a_trained_checkpoint_is_sampled_in_the_dtype_its_run_trained_in(tmp_path):
    """api.trained_dtype: under model.dtype auto, eval and generate take the dtype in the run's plan.json (a run that
    train started again in bfloat16 is not evaluated in float16), where this GPU has it; else the recipe's."""
    from trainer.api import trained_dtype

    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    ckpt.mkdir(parents=True)
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml")
    h100, t4 = Device.elsewhere("80:sm90"), Device.elsewhere("15:fp16:sm75")
    for ran, device, want in (("bfloat16", h100, "bfloat16"), ("float16", h100, "float16"),
                              ("bfloat16", t4, "auto"), ("float16", t4, "float16"), ("float32", h100, "auto"),
                              ("bfloat16", Device("cpu"), "auto")):
        (tmp_path / "run" / "plan.json").write_text(json.dumps({"compute_dtype": ran}))
        assert trained_dtype(recipe, ckpt, device).model.dtype == want, (ran, device.name)
    named = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", ["model.dtype=float16"])
    assert trained_dtype(named, ckpt, h100).model.dtype == "float16"  # a dtype the recipe names is kept
    assert trained_dtype(recipe, tmp_path / "adapter", h100) is recipe  # a peft adapter directory: no run beside it
    assert recipe.model.dtype == "auto"  # the caller's recipe is not changed


@pytest.mark.gpu
def test_the_restart_leaves_the_old_images_gpu_memory_behind():
    """cli.exec_clean, the bfloat16 restart's exec: a process holding 2 GB on the GPU replaces itself; the new image
    sees the device as a fresh process does (its own context only), not the old context and its 2 GB beside it."""
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    probe = ("import torch; torch.empty(1, device='cuda'); free, total = torch.cuda.mem_get_info(); "
             "print('USED', total - free)")
    fresh = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    holder = ("import sys, torch; from trainer.cli import exec_clean; "
              "held = torch.empty(2 * 10**9, dtype=torch.uint8, device='cuda'); torch.cuda.synchronize(); "
              f"exec_clean([sys.executable, '-c', {probe!r}])")
    after = subprocess.run([sys.executable, "-c", holder], cwd=ROOT, capture_output=True, text=True, check=True,
                           timeout=120)
    base, got = (int(out.stdout.split("USED")[1]) for out in (fresh, after))
    assert got < base + 0.5e9, (got / 1e9, base / 1e9)


def test_the_check_reads_at_most_TOKENS_of_each_prompt(monkeypatch):
    # a long-context recipe's 32k-token prompt, read whole and untiled, would not fit its plan
    plan, policy = _policy(None)
    seen = []
    handle = policy.backbone.layers[0].register_forward_hook(lambda m, i, o: seen.append(
        (o[0] if isinstance(o, tuple) else o).shape[-2]))
    monkeypatch.setattr(fp16_range, "TOKENS", 5)
    try:
        fp16_range.check(plan, policy, PROMPTS + [[7] * 3])
    finally:
        handle.remove()
    assert seen == [5, 5, 3], seen  # 20 and 12 tokens cut to 5; 3 kept
