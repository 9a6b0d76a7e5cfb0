"""End to end through the `train` command: the tiny recipe learns, resume continues exactly, the user recipes'
code paths run on local files of the hub datasets' format."""
from __future__ import annotations

import json
import re

import yaml

from tests.conftest import ROOT, run_train


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_tiny_cpu_recipe_learns(tmp_path):
    out = run_train(["recipes/tiny-cpu.yaml", "--output-dir", str(tmp_path / "run")],
                    env={"TRAINER_PROFILE_STEP": "3", "TRAINER_PROFILE_PYTHON": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    prof = (tmp_path / "run" / "profile_step3.txt").read_text()
    assert "aten::" in prof  # torch.profiler table of step 3 only, led by its phases (rollout, train, ...)
    phases = {line.split()[0] for line in prof.split("\n\n")[0].splitlines()[1:]}
    assert {"rollout", "train", "optimizer", "sync"} <= phases, prof[:600]
    assert sorted(p.name for p in (tmp_path / "run").glob("profile_step*.txt")) == [
        "profile_step3.txt", "profile_step3_python.txt"]
    # each Python function's own time, by file and line (the profiler's Python tracer), beside the ops
    python = (tmp_path / "run" / "profile_step3_python.txt").read_text()
    assert re.search(r"trainer/\w+\.py\(\d+\): \w+", python) and "aten::" in python, python[:2000]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    threshold = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())["success"]["min_last10_reward"]
    assert "mean reward: first 10 steps" in out.stdout
    assert summary["reward_last10"] >= 2 * summary["reward_first10"], summary
    assert summary["reward_last10"] >= threshold, summary
    assert (tmp_path / "run" / "plots" / "reward.png").is_file()
    m = metrics(tmp_path / "run")
    assert {"loss", "reward_std", "clip_ratio_region", "time_rollout_s", "time_train_s", "tokens_per_s",
            "peak_memory_gb", "rewards/char_class_fraction/mean", "logp_gap_mean", "time_kv_s", "time_gc_s",
            "gc_full_collections"} <= m[0].keys()
    ends = [x["unix_time"] for x in m]  # step end times: benchmarks take startup and step gaps from them
    assert all(b > a for a, b in zip(ends, ends[1:]))
    # The HF sampler is the policy; only kernel numerics differ (bitsandbytes decodes one token with a gemv).
    assert max(x["logp_gap_mean"] for x in m) < 0.01


def test_signal_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["recipes/tiny-cpu.yaml", "--set", "train.max_steps=6", "--set", "checkpoint.save_steps=100",
            "--set", "train.lr_scheduler_type=linear"]
    full = run_train(args + ["--output-dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    cut = run_train(args + ["--output-dir", str(tmp_path / "cut")], env={"TRAINER_TEST_SIGNAL_AFTER_STEP": "3"})
    assert cut.returncode == 3, cut.stdout[-2000:] + cut.stderr[-2000:]
    assert "resume with --resume" in cut.stdout
    before = metrics(tmp_path / "cut")  # steps 1-3, each with the time it ended
    assert [m["step"] for m in before] == [1, 2, 3]
    again = run_train(args + ["--output-dir", str(tmp_path / "cut")])
    assert again.returncode == 2 and "--resume" in again.stdout  # an existing run is never silently overwritten
    resumed = run_train(args + ["--output-dir", str(tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    # the resume went on from the checkpoint: steps 1-3 are the cut run's own lines (a run that started over would
    # have rewritten them, with later end times, and the same losses: the runs are deterministic)
    assert b[:3] == before and b[3]["unix_time"] > before[-1]["unix_time"]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and abs(x["reward_mean"] - y["reward_mean"]) < 1e-6


def test_gsm8k_recipe_code_path_on_local_files(tmp_path):
    data = ROOT / "tests" / "data" / "gsm8k_sample.parquet"
    out = run_train(["recipes/gsm8k-qwen2.5-1.5b.yaml", "--output-dir", str(tmp_path / "run"),
                     "--set", "model.name=", "--set", "model.shape=tiny", "--set", f"data.dataset={data}",
                     "--set", "rollout.engine=hf", "--set", "budget.vram_gb=", "--set", "train.max_steps=2",
                     "--set", "train.generation_batch_size=16", "--set", "grpo.max_completion_length=12",
                     "--set", "logging.wandb=false", "--set", "grpo.beta=0.04", "--set", f"eval.dataset={data}",
                     "--set", "eval.max_prompts=4"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = metrics(tmp_path / "run")
    assert len(m) == 2 and "rewards/math_answer/mean" in m[0] and "rewards/think_answer_format/mean" in m[0]
    assert "kl" in m[0]
    assert m[1]["eval/prompts"] == 4 and "eval/rewards/math_answer/pass@1" in m[1]  # greedy accuracy at the end


def test_plan_flag_prints_without_loading(no_weights, capsys):
    from trainer import cli

    assert cli.main([str(ROOT / "recipes" / "tiny-cpu.yaml"), "--plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert no_weights == []
    assert plan["rollout_engine"] == "hf" and plan["quantized"] is True and "lora_and_optimizer" in plan["components"]
