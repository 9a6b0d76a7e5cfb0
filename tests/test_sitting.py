"""bench/sitting.sh's queue: several benchmark jobs in one detached run on the device (no device call between them, so
no machine goes back idle in between), each with its own environment and results dir, all tarred by `queue wait`.
Dry run on this machine: SITTING_ROOT a temporary dir, PYTHON a script that records how it was called."""
from __future__ import annotations

import os
import subprocess
import tarfile

from tests.conftest import ROOT


def _sitting(tmp_path, python: str):
    """bench/sitting.sh under tmp_path, with `python` (a bash script's body) as its PYTHON."""
    fake = tmp_path / "py"
    fake.write_text("#!/usr/bin/env bash\n" + python + "\n")
    fake.chmod(0o755)
    (tmp_path / "site").mkdir(exist_ok=True)  # the staged GPU stack (scripts/device_unpack.sh) the script checks for
    env = {**os.environ, "SITTING_ROOT": str(tmp_path), "PYTHON": str(fake), "GPU_TESTS": "no",
           "OUT": str(tmp_path / "out")}
    return lambda *a: subprocess.run(["bash", "bench/sitting.sh", *a], cwd=ROOT, env=env, capture_output=True,
                                     text=True, timeout=120)


def test_queue_runs_each_item_in_turn_with_its_own_environment_and_tars_them_all(tmp_path):
    run = _sitting(tmp_path, 'echo "FOO=${FOO:-unset} $*" >> "$SITTING_ROOT/calls"')
    started = run("queue", "start", "compile 4", "FOO=bar fidelity qwen2.5-1.5b:graphs", "planner X@min")
    assert started.returncode == 0 and "a queue of 3" in started.stdout, started.stderr
    waited = run("queue", "wait", "60")
    assert waited.stdout.strip().endswith("done"), waited.stdout
    assert "tar:" not in waited.stderr, waited.stderr  # no run dirs yet: tar failed on a trailing -C (2026-12-05)
    calls = (tmp_path / "calls").read_text().splitlines()
    res = tmp_path / "results"
    assert calls == [f"FOO=unset bench/compile_ab.py {res}/compile 4",  # in order; FOO only where the item set it
                     f"FOO=bar bench/fidelity.py variants {res}/fidelity qwen2.5-1.5b:graphs",
                     f"FOO=unset bench/planner.py {res}/planner X@min"]
    for name in ("compile", "fidelity", "planner"):
        assert (res / name / "done").exists() and (res / name / f"{name}.log").read_text().endswith("rc 0\n")
    with tarfile.open(tmp_path / "out" / "queue.tgz") as t:
        names = set(t.getnames())
    assert {"queue/items", "compile/compile.log", "fidelity/command.txt", "planner/planner.log"} <= names
    assert run("queue", "start", "nosuchbench").returncode == 2


def test_fidelity_items_run_the_drift_and_trl_subcommands_in_the_queue(tmp_path):
    # 2026-12-05: the drift run was started with nohup in a device call of its own and killed at step 145 when that
    # call returned; as queue items they run detached (setsid) like the rest
    run = _sitting(tmp_path, 'echo "$*" >> "$SITTING_ROOT/calls"')
    assert run("queue", "start", "fidelity qwen2.5-7b:fp32", "fidelity train qwen2.5-7b 200 model",
               "fidelity trl 8 qwen2.5-7b").returncode == 0
    assert run("queue", "wait", "60").stdout.strip().endswith("done")
    res = tmp_path / "results"
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"bench/fidelity.py variants {res}/fidelity qwen2.5-7b:fp32",
        f"bench/fidelity.py train {res}/fidelity.2 qwen2.5-7b 200 model",
        f"bench/fidelity.py trl {res}/fidelity.3 8 qwen2.5-7b"]


def test_two_items_of_one_benchmark_keep_their_own_results_dir(tmp_path):
    # 2026-12-03: a queue with two long_context items wrote both into results/long_context, the second item's log
    # truncating the first's; the second now goes to results/long_context.2
    run = _sitting(tmp_path, 'echo "$*"')
    assert run("queue", "start", "long_context a", "planner b", "long_context c").returncode == 0
    waited = run("queue", "wait", "60")
    assert waited.stdout.strip().endswith("done") and "== long_context.2: done" in waited.stdout, waited.stdout
    res = tmp_path / "results"
    assert (res / "long_context" / "long_context.log").read_text().startswith(f"bench/long_context.py {res}/long_context a")
    assert (res / "long_context.2" / "long_context.log").read_text().startswith(
        f"bench/long_context.py {res}/long_context.2 c")
    with tarfile.open(tmp_path / "out" / "queue.tgz") as t:
        assert {"long_context/long_context.log", "long_context.2/long_context.log"} <= set(t.getnames())


def test_queue_wait_tars_the_run_dirs_steps_so_far(tmp_path):
    # 2026-12-03: the machine went back 312 s into the 8B long row; its finished steps (metrics.jsonl in the run dir)
    # were never tarred, only the driver's log. Each wait now takes every run dir's small files (not checkpoints).
    run = _sitting(tmp_path, 'mkdir -p "$SITTING_ROOT/runs/row/checkpoint-1"; echo "{}" > "$SITTING_ROOT/runs/row/metrics.jsonl"; '
                             'echo x > "$SITTING_ROOT/runs/row/plan.json"; echo w > "$SITTING_ROOT/runs/row/checkpoint-1/w.bin"')
    assert run("queue", "start", "long_context row").returncode == 0
    assert run("queue", "wait", "60").stdout.strip().endswith("done")
    with tarfile.open(tmp_path / "out" / "queue.tgz") as t:
        names = set(t.getnames())
    assert {"runs/row/metrics.jsonl", "runs/row/plan.json"} <= names and "runs/row/checkpoint-1/w.bin" not in names


def test_an_item_past_its_time_limit_is_killed_and_the_queue_goes_on(tmp_path):
    run = _sitting(tmp_path, 'if [[ $* == *hang* ]]; then sleep 60; fi; echo "$*" >> "$SITTING_ROOT/calls"')
    assert run("queue", "start", "ITEM_TIMEOUT=2 planner hang", "planner after").returncode == 0
    assert run("queue", "wait", "60").stdout.strip().endswith("done")
    res = tmp_path / "results"
    assert (res / "planner" / "planner.log").read_text().endswith("rc 124\n")
    assert (tmp_path / "calls").read_text().splitlines() == [f"bench/planner.py {res}/planner.2 after"]


def test_nothing_starts_on_a_machine_without_the_staged_stack(tmp_path):
    # a fresh machine (the previous one went back idle): each item would run to a FileNotFoundError on device time
    run = _sitting(tmp_path, 'echo "$*" >> "$SITTING_ROOT/calls"')
    (tmp_path / "site").rmdir()
    for args in (("queue", "start", "planner X@min"), ("planner", "start", "X@min")):
        started = run(*args)
        assert started.returncode == 2 and "not staged" in started.stdout, started.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "calls").exists()
