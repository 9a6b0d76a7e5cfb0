"""Rewards in worker processes: a call that hangs is killed at its timeout and scores per on_error, the run goes on,
several functions score at once, and the values equal those computed in the training process."""
from __future__ import annotations

import json
import math
import os
import textwrap
import time

import pytest

from tests.conftest import ROOT, run_train
from trainer.errors import UserError
from trainer.recipe import validate
from trainer.rewards import close_rewards, load_rewards, score

TINY = ROOT / "recipes" / "tiny-cpu.yaml"
QUICK = ["--set", "logging.plots=false", "--set", "checkpoint.save_final=false"]

SLOW = textwrap.dedent("""
    import os, subprocess, time

    def forever(prompts, completions, **kw):
        time.sleep(1e9)

    def nap(prompts, completions, seconds=1.0, **kw):
        time.sleep(seconds)
        return [1.0] * len(completions)

    def hangs_on(prompts, completions, word="hang", **kw):
        if any(word in c for c in completions):
            time.sleep(1e9)
        return [float(len(c)) for c in completions]

    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 3) for c in completions]

    def dies(prompts, completions, **kw):
        os._exit(3)

    def sometimes_none(prompts, completions, target, **kw):
        return [None if t == "vowels" else float(len(c)) for c, t in zip(completions, target)]

    def starts_a_program(prompts, completions, pidfile, **kw):
        child = subprocess.Popen(["sleep", "1000"])
        with open(pidfile, "w") as f:
            f.write(str(child.pid))
        time.sleep(1e9)
""")


@pytest.fixture
def rewards_dir(tmp_path):
    (tmp_path / "slow.py").write_text(SLOW)
    return tmp_path


def funcs(base_dir, *specs):
    r = validate({"model": {"shape": "tiny"}, "data": {"dataset": "x.jsonl"}, "base_dir": str(base_dir),
                  "rewards": list(specs)})
    return load_rewards(r)


def scored(fs, completions, columns=None):
    try:
        return score(fs, ["p"] * len(completions), completions, columns or {})
    finally:
        close_rewards(fs)


COMPLETIONS = ["abc", "12 34", "aeiou", "x1y2", "", "hang", "999", "ooo oo"]
TARGETS = ["digits", "vowels"] * 4


def test_workers_give_the_same_rewards_as_the_training_process(rewards_dir):
    specs = [{"function": "trainer.rewards.builtin:char_class_fraction"},
             {"function": "trainer.rewards.builtin:length", "kwargs": {"target": 4}},
             {"function": "slow.py:sometimes_none"}]
    here, _ = scored(funcs(rewards_dir, *specs), COMPLETIONS, {"target": TARGETS})
    for extra in ({"num_workers": 2}, {"num_workers": 3, "chunk_size": 1}, {"timeout_s": 30}):
        pooled, counts = scored(funcs(rewards_dir, *[{**s, **extra} for s in specs]), COMPLETIONS,
                                {"target": TARGETS})
        assert pooled.shape == here.shape and pooled.isnan().equal(here.isnan()), extra
        assert pooled.nan_to_num(-7).equal(here.nan_to_num(-7)), (extra, pooled, here)
        assert all(v == 0 for v in counts.values()), counts


def test_a_hanging_call_is_killed_at_its_timeout_and_scores_zero(rewards_dir):
    fs = funcs(rewards_dir, {"function": "slow.py:hangs_on", "timeout_s": 1, "on_error": "zero", "num_workers": 2,
                             "chunk_size": 1},
               {"function": "slow.py:forever", "timeout_s": 1, "on_error": "zero"})
    t0 = time.monotonic()
    table, counts = scored(fs, COMPLETIONS)
    assert time.monotonic() - t0 < 20
    assert table[:, 0].tolist() == [float(len(c)) if c != "hang" else 0.0 for c in COMPLETIONS]
    assert table[:, 1].tolist() == [0.0] * len(COMPLETIONS)
    assert counts == {"rewards/hangs_on/failures": 1, "rewards/hangs_on/timeouts": 1,
                      "rewards/forever/failures": len(COMPLETIONS), "rewards/forever/timeouts": len(COMPLETIONS)}


def test_the_pool_goes_on_after_a_timeout_with_a_fresh_worker(rewards_dir):
    fs = funcs(rewards_dir, {"function": "slow.py:hangs_on", "timeout_s": 1, "on_error": "zero"})
    pool = fs[0].workers
    try:
        first, _ = score(fs, ["p"] * 2, ["hang", "ab"], {})
        killed = [w.proc for w in pool.workers]
        second, counts = score(fs, ["p"] * 2, ["abc", "ab"], {})
        fresh = [w.proc for w in pool.workers]
    finally:
        close_rewards(fs)
    assert first.tolist() == [[0.0], [0.0]] and second.tolist() == [[3.0], [2.0]]
    assert killed == [] and len(fresh) == 1 and fresh[0].exitcode is not None  # closed at the end
    assert counts == {"rewards/hangs_on/failures": 0, "rewards/hangs_on/timeouts": 0}


def test_a_timeout_with_on_error_raise_names_the_reward_and_the_timeout(rewards_dir):
    fs = funcs(rewards_dir, {"function": "slow.py:forever", "timeout_s": 1})
    with pytest.raises(UserError) as e:
        scored(fs, COMPLETIONS)
    assert e.value.field == "reward forever" and "timeout_s=1 s" in e.value.problem and "on_error" in e.value.fix


def test_errors_in_a_worker_raise_or_score_zero(rewards_dir):
    with pytest.raises(UserError) as e:
        scored(funcs(rewards_dir, {"function": "slow.py:picky", "num_workers": 1, "chunk_size": 1}), ["aaaaa", "bbb"])
    assert e.value.field == "reward picky" and "ZeroDivisionError" in e.value.problem and "'bbb'" in e.value.problem
    table, counts = scored(funcs(rewards_dir, {"function": "slow.py:picky", "num_workers": 1, "chunk_size": 1,
                                               "on_error": "zero"},
                                 {"function": "slow.py:dies", "num_workers": 1, "on_error": "zero"}), ["aaaaa", "bbb"])
    assert table.tolist() == [[0.5, 0.0], [0.0, 0.0]]
    assert counts == {"rewards/picky/failures": 1, "rewards/dies/failures": 2}


def test_a_killed_call_takes_the_programs_it_started_with_it(rewards_dir):
    pidfile = rewards_dir / "child.pid"
    fs = funcs(rewards_dir, {"function": "slow.py:starts_a_program", "timeout_s": 2, "on_error": "zero",
                             "kwargs": {"pidfile": str(pidfile)}})
    scored(fs, ["a"])
    pid = int(pidfile.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        pytest.fail(f"the reward's child {pid} outlived the killed worker")


def test_several_functions_score_at_once(rewards_dir):
    specs = [{"function": "slow.py:nap", "name": f"nap{k}", "num_workers": 1, "kwargs": {"seconds": 1.5}}
             for k in range(3)]
    fs = funcs(rewards_dir, *specs)
    try:
        score(fs, ["p"], ["a"], {})  # workers up (the first start imports the module)
        t0 = time.monotonic()
        table, _ = score(fs, ["p"] * 2, ["a", "b"], {})
        took = time.monotonic() - t0
    finally:
        close_rewards(fs)
    assert table.tolist() == [[1.0] * 3] * 2 and 1.5 <= took < 3.5, took


def test_the_step_line_shows_the_reward_time():
    from trainer.metrics import line

    m = {"step": 3, "reward_mean": 0.5, "reward_std": 0.1, "loss": 0.0, "completion_length_mean": 9,
         "time_step_s": 2.0, "time_rollout_s": 0.5, "time_reward_s": 1.25, "tokens_per_s": 100}
    assert "reward 1.25" in line(m)


def _train(tmp_path, reward: str, steps: int = 2):
    rewards = f"[{{function: 'trainer.rewards.builtin:char_class_fraction'}}, {reward}]"
    return run_train([str(TINY), "--set", f"rewards={rewards}", "--set", f"train.max_steps={steps}",
                      "--output-dir", str(tmp_path / "run")] + QUICK, cwd=tmp_path)


def test_a_run_goes_on_past_a_reward_that_hangs(rewards_dir):
    out = _train(rewards_dir, f"{{function: '{rewards_dir / 'slow.py'}:forever', timeout_s: 1, on_error: zero}}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [json.loads(x) for x in (rewards_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for m in lines:
        assert m["rewards/forever/timeouts"] == m["rewards/forever/failures"] == 64
        assert m["rewards/forever/mean"] == 0.0 and math.isfinite(m["reward_mean"])
        assert 1.0 <= m["time_reward_s"] < 15, m["time_reward_s"]
    assert "reward 1." in out.stdout  # the reward phase's time in each step's line


def test_a_hanging_reward_with_on_error_raise_stops_the_run_naming_it(rewards_dir):
    out = _train(rewards_dir, f"{{function: '{rewards_dir / 'slow.py'}:forever', timeout_s: 1}}")
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    assert "reward forever" in text and "timeout_s=1 s" in text and "fix:" in text, text[-3000:]
