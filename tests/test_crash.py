"""Crash safety through the `train` command: kill -9 at random moments (inside steps and inside checkpoint writes)
never leaves a partial checkpoint that --resume would take, and the resumed run's losses equal an uninterrupted
run's; SIGTERM finishes the step, checkpoints and exits with code 3; non-finite steps are skipped, then stop."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, run_train
from trainer import checkpoint

ARGS = ["recipes/tiny-cpu.yaml", "--set", "train.max_steps=40", "--set", "checkpoint.save_steps=1",
        "--set", "train.lr_scheduler_type=linear", "--set", "logging.plots=false"]


def lines(run_dir) -> int:
    """Complete lines in metrics.jsonl (read while the run may be writing it)."""
    f = run_dir / "metrics.jsonl"
    return f.read_text().count("\n") if f.exists() else 0


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def start(out_dir, extra=(), env=None):
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *ARGS, "--output-dir", str(out_dir), *extra],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_kill_9_at_random_moments_loses_nothing(tmp_path):
    ref = run_train(ARGS + ["--output-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stdout[-2000:]
    run_dir, rng, kills, attempts, kept = tmp_path / "crashy", random.Random(7), 0, 0, []
    while True:
        attempts += 1
        assert attempts < 40, "the run never finished"
        resume = checkpoint.latest(run_dir) is not None
        if resume:  # the lines the checkpoint covers, as this attempt finds them: a resume must keep them as they are
            step = json.loads((checkpoint.latest(run_dir) / "state.json").read_text())["step"]
            text = (run_dir / "metrics.jsonl").read_text()  # a kill may leave a partial last line: complete ones only
            kept = [m for m in map(json.loads, filter(str.strip, text.split("\n")[:-1])) if m["step"] <= step]
            assert [m["step"] for m in kept] == list(range(1, step + 1))
        # every other attempt stretches the window between writing a checkpoint and renaming it into place
        env = {"TRAINER_TEST_SLOW_CHECKPOINT": "0.4"} if kills % 2 else {}
        proc = start(run_dir, ["--resume"] if resume else ["--overwrite"], env)
        if kills < 10:
            # Kill once this attempt has logged a new step, after a random delay: inside a step or a checkpoint
            # write, whatever the machine's speed (a fixed sleep let a fast machine finish the run before 10 kills).
            logged = lines(run_dir)
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline and lines(run_dir) <= logged:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                latest = checkpoint.latest(run_dir)
                if latest is not None:  # what --resume would take is always complete and loadable
                    assert checkpoint._valid(latest)
                    json.loads((latest / "state.json").read_text())
                continue
        out, _ = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        assert False, out[-3000:]
    assert kills >= 10
    a, b = metrics(tmp_path / "ref"), metrics(run_dir)
    assert [m["step"] for m in b] == list(range(1, 41))
    assert kept and b[:len(kept)] == kept  # the last attempt went on from its checkpoint, it did not start over
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and abs(x["reward_mean"] - y["reward_mean"]) < 1e-6, (x, y)


def test_sigterm_finishes_the_step_checkpoints_and_exits_3(tmp_path):
    run_dir = tmp_path / "term"
    proc = start(run_dir, ["--set", "checkpoint.save_steps=100", "--set", "train.max_steps=200"])
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out[-3000:]
    done = len(metrics(run_dir))
    latest = checkpoint.latest(run_dir)
    assert latest is not None and json.loads((latest / "state.json").read_text())["step"] == done


def test_nonfinite_steps_are_skipped_then_the_run_stops_keeping_its_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    out = run_train(ARGS + ["--output-dir", str(run_dir), "--set", "train.max_nonfinite_steps=3", "--set",
                            "train.max_steps=8",
                            "--set", "checkpoint.save_steps=2"], env={"TRAINER_TEST_NAN_AT_STEPS": "3,5,6,7"})
    assert out.returncode == 5, out.stdout[-3000:]
    m = metrics(run_dir)
    assert [x["skipped"] for x in m] == [0, 0, 1, 0, 1, 1, 1]  # step 4 recovered; 5-7: three in a row -> stop
    # skipped steps leave the weights untouched, so step 6's checkpoint is good; the stop at 7 writes nothing newer
    assert checkpoint.latest(run_dir).name == "step-0000006"
    assert "non-finite" in out.stdout and "float16" not in out.stdout  # the float16 hint is for float16 runs


def test_a_float16_run_counts_a_nan_loss_as_non_finite_whatever_its_loss_scale_and_says_why_it_may_happen(tmp_path):
    """Under float16's loss scale a non-finite gradient at a scale above 1 is an overflow (skipped, not counted); a
    non-finite loss is the model's and counts. The stop names float16's range as a cause."""
    run_dir = tmp_path / "nan16"
    out = run_train(ARGS + ["--output-dir", str(run_dir), "--set", "train.max_nonfinite_steps=2", "--set",
                            "train.max_steps=5", "--set", "model.dtype=float16", "--set", "eval=null"],
                    env={"TRAINER_TEST_NAN_AT_STEPS": "2,3"})
    assert out.returncode == 5, out.stdout[-3000:]
    m = metrics(run_dir)
    assert [x["skipped"] for x in m] == [0, 1, 1] and [x["loss_scale"] for x in m] == [2.0 ** 16, 2.0 ** 15, 2.0 ** 14]
    assert "float16" in out.stdout and "65,504" in out.stdout
    assert "try model.dtype: bfloat16" in out.stdout  # the CPU (and an Ampere or later card) has bfloat16


def test_the_float16_stop_names_the_dtype_this_card_and_engine_can_go_back_to():
    """bfloat16 where the card has it; on a T4 (sm75) float32, with the HF engine where the run used vLLM (its LoRA
    kernels take 16-bit activations only, and the plan refuses float32 with vLLM)."""
    from types import SimpleNamespace

    from trainer.fp16_range import stop_hint

    def hint(dtype, capability, engine):
        return stop_hint(SimpleNamespace(compute_dtype=dtype, device_capability=capability, rollout_engine=engine))

    assert hint("float16", (9, 0), "vllm").endswith("try model.dtype: bfloat16")
    assert "try model.dtype: float32 with rollout.engine: hf" in hint("float16", (7, 5), "vllm")
    assert "try model.dtype: float32;" in hint("float16", (7, 5), "hf")
    assert hint("bfloat16", (9, 0), "vllm") == "" and hint("float32", None, "hf") == ""
