"""bench/multigpu.py on the CPU: its comparison and scaling arithmetic on synthetic runs, and a dry run of the whole
script with the tiny recipe at 1 and 2 gloo ranks, the SIGUSR1 stop and `--resume auto` check included."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import multigpu as mg
from tests.conftest import ROOT


def steps(losses, rewards=None):
    return [{"step": i + 1, "loss": x, "reward_mean": (rewards or [0.5] * len(losses))[i]} for i, x in enumerate(losses)]


def test_weak_and_strong_runs_of_the_same_shape_are_one_run():
    runs = mg.runs_to_make([1, 2, 4], ["weak", "strong"], 64, 256)
    assert [(r["nproc"], r["completions"]) for r in runs] == [(1, 64), (2, 128), (4, 256), (1, 256), (2, 256)]
    assert next(r for r in runs if r["nproc"] == 4)["modes"] == ["weak", "strong"]


def test_resume_passes_only_on_the_same_steps_losses_and_adapters():
    lora = {"a": torch.ones(3)}
    full = steps([0.1, 0.2, 0.3, 0.4])
    ok = mg.compare_resume(full, steps([0.1, 0.2, 0.3, 0.4]), lora, [lora, {"a": torch.ones(3)}], stopped_at=2)
    assert ok["passed"] and ok["losses_exactly_equal"] and ok["lora_max_abs_diff_per_rank"] == [0.0, 0.0]
    assert not mg.compare_resume(full, steps([0.1, 0.2, 0.3, 0.5]), lora, [lora], 2)["passed"]  # a loss parted
    assert not mg.compare_resume(full, steps([0.1, 0.2, 0.3, 0.4]), lora, [{"a": torch.zeros(3)}], 2)["passed"]
    assert not mg.compare_resume(full, steps([0.1, 0.2, 0.3]), lora, [lora], 2)["passed"]  # did not reach the end
    assert not mg.compare_resume(full, steps([0.1, 0.2, 0.3, 0.4]), lora, [lora], None)["passed"]  # never stopped
    near = mg.compare_resume(full, steps([0.1, 0.2, 0.3, 0.4 + 1e-7]), lora, [lora], 2)
    assert near["passed"] and not near["losses_exactly_equal"]  # within the stated tolerance, and said so
    assert near["max_abs_loss_diff_before_stop"] == 0.0 and near["max_abs_loss_diff_after_stop"] > 0


def test_scaling_is_per_gpu_for_weak_and_total_for_strong():
    def run(n, c, rate, modes, rollout):
        return {"nproc": n, "completions": c, "modes": modes, "completion_tokens_per_s": rate,
                "completion_tokens_per_s_per_gpu": rate / n, "wall_step_s_median": 1000 * c / rate,
                "breakdown_s_median": {"rollout": rollout, "train": 1.0}, "reward_per_step": [0.5, 0.6]}

    s = mg.scaling([run(1, 64, 1000, ["weak"], 1.0), run(4, 256, 3600, ["weak", "strong"], 1.2),
                    run(1, 256, 2000, ["strong"], 2.0)])
    assert s["weak_efficiency"] == {1: 1.0, 4: 0.9}
    assert s["strong_speedup"] == {1: 1.0, 4: 1.8}
    assert s["phase_ratio_vs_1"]["strong"][4]["rollout"] == 0.6  # the rollout shrank to 0.6x of one GPU's, not 1/4
    assert s["strong_reward_diff_vs_1"][4]["max"] == 0.0


def test_distributed_term_is_fitted_from_the_weak_runs_less_the_plans_own_error():
    runs = [{"nproc": n, "modes": m, "measured_overhead_gb_per_gpu": o}
            for n, m, o in ((1, ["weak"], 0.25), (2, ["weak"], 1.75), (4, ["weak", "strong"], 2.25), (1, ["strong"], 9.0))]
    fit = mg.distributed_fit(runs)
    assert fit["distributed_cost_gb_per_gpu"] == {2: 1.5, 4: 2.0}
    assert fit["distributed_fit"] == {"DISTRIBUTED_FIXED_gb": 1.5, "DISTRIBUTED_PER_PEER_gb": 0.25}


@pytest.mark.slow  # about a minute on 2 idle cores: five short torchrun launches
def test_dry_run_on_cpu_with_two_gloo_ranks_scales_compares_adapters_and_resumes(tmp_path):
    env = {**os.environ, "MG_RECIPE": "recipes/tiny-cpu.yaml", "MG_GPUS": "1,2", "MG_PER_GPU": "32",
           "MG_GLOBAL": "64", "MG_TOKENS": "16", "MG_STEPS": "5", "MG_RESUME_AT": "2",
           "MG_SETS": "rollout.hf_batch_size=8 logging.plots=false eval=", "RUNS": str(tmp_path / "runs")}
    out = subprocess.run([sys.executable, "bench/multigpu.py", str(tmp_path / "out")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "multigpu_x4.json").read_text())
    assert [(r["nproc"], r["completions"], r["rc"], r["steps"]) for r in res["runs"]] == \
        [(1, 32, 0, 5), (2, 64, 0, 5), (1, 64, 0, 5)]
    assert res["adapters_equal"] and res["runs"][1]["lora_tensors_compared"] > 0
    two = res["runs"][1]
    assert {"rollout", "barrier", "train", "optimizer", "grad_wait", "grad_allreduce"} <= two["breakdown_s_median"].keys()
    # The scaling figures are the runs' own rates against the right one-process run (timings on 2 shared cores are
    # no measure of scaling, so the check is which runs they compare, not how fast they were).
    by = {(r["nproc"], r["completions"]): r for r in res["runs"]}
    assert res["weak_efficiency"]["2"] == pytest.approx(by[2, 64]["completion_tokens_per_s_per_gpu"]
                                                        / by[1, 32]["completion_tokens_per_s_per_gpu"])
    assert res["strong_speedup"]["2"] == pytest.approx(by[2, 64]["completion_tokens_per_s"]
                                                       / by[1, 64]["completion_tokens_per_s"])
    for r in res["runs"]:  # tokens per second: the completions' tokens over the wall time between step ends
        assert r["completion_tokens_per_s_per_gpu"] * r["nproc"] == pytest.approx(r["completion_tokens_per_s"])
        assert 0 < r["completion_tokens_per_s"] <= r["completions"] * 16 / r["wall_step_s_median"] * 1.5, r
    assert res["strong_reward_diff_vs_1"]["2"]["max"] < 1e-6  # gloo ranks sample what one process samples
    r = res["resume"]
    assert r["ranks_signalled"] == 2 and 2 <= r["stopped_after_step"] < 5 and r["rc_resumed"] == 0, r
    assert r["passed"] and r["losses_exactly_equal"], r  # on one machine the resumed run is bit-equal
    assert res["goals"]["resume check passed"] and res["goals"]["adapters equal across ranks"]
