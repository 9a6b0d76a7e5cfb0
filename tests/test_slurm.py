"""The Slurm scripts on a real local cluster (Debian's slurm-wlm, started here): a job trains the tiny recipe; a
USR1 mid-run (what --signal=B:USR1@120 sends) checkpoints, requeues and resumes to the same final step; the
multi-node script runs 2 nodes x 1 process with c10d rendezvous. CI installs slurm-wlm and sets
TRAINER_REQUIRE_SLURM=1 so these run there; elsewhere they skip when Slurm or root is missing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

REQUIRED = os.environ.get("TRAINER_REQUIRE_SLURM") == "1"
if not REQUIRED and (shutil.which("slurmctld") is None or os.geteuid() != 0):
    pytest.skip("needs Debian's slurm-wlm and root", allow_module_level=True)

pytestmark = pytest.mark.slow
CLUSTER = ROOT / "scripts" / "slurm" / "local_cluster.sh"


def cluster(path, nodes: int):
    subprocess.run(["bash", str(CLUSTER), str(path), str(nodes)], check=True, capture_output=True, timeout=120)
    return {**os.environ, "SLURM_CONF": str(path / "slurm.conf")}


def sh(env, *cmd) -> str:
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def state(env, jid) -> str:
    """The job's JobState; "GONE" only when slurmctld says the id is unknown (purged after the job ended). A busy
    slurmctld that answers nothing, or an error, reads "UNKNOWN", which no wait counts as finished."""
    p = subprocess.run(["scontrol", "show", "job", jid], env=env, capture_output=True, text=True)
    found = next((w.split("=")[1] for w in p.stdout.split() if w.startswith("JobState=")), None)
    if found:
        return found
    return "GONE" if "invalid job id" in p.stderr.lower() else "UNKNOWN"


def wait_for(cond, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def steps(run) -> list[int]:
    p = run / "metrics.jsonl"
    return [json.loads(x)["step"] for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


@pytest.fixture
def single(tmp_path):
    env = cluster(tmp_path / "slurm", 1)
    yield env
    subprocess.run(["bash", str(CLUSTER), str(tmp_path / "slurm"), "stop"])


def submit(env, tmp_path, script, extra, *recipe_args):
    return sh(env, "sbatch", "--parsable", "--cpus-per-task=1" if "multinode" in script else "--cpus-per-task=2",
              f"--chdir={ROOT}", f"--output={tmp_path}/out-%j.txt", *extra,
              f"--export=ALL,PY={sys.executable},RUN_DIR={tmp_path}/run",
              str(ROOT / "scripts" / "slurm" / script), "recipes/tiny-cpu.yaml", "--set", "logging.plots=false",
              *recipe_args)


def test_job_is_preempted_requeued_and_resumes_to_the_end(single, tmp_path):
    env, run = single, tmp_path / "run"
    jid = submit(env, tmp_path, "train.sbatch", [], "--set", "train.max_steps=60")
    wait_for(lambda: len(steps(run)) >= 5, 300, "5 steps")
    sh(env, "scancel", "--signal=USR1", "--batch", jid)
    wait_for(lambda: "Restarts=1" in sh(env, "scontrol", "show", "job", jid), 120, "the requeue")
    # Slurm holds a requeued job for ~2 minutes; let it start now
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env=env, capture_output=True)
    wait_for(lambda: state(env, jid) in ("COMPLETED", "GONE", "FAILED"), 600, "the job to finish")
    log = (tmp_path / f"out-{jid}.txt").read_text()
    assert "requeueing" in log and "restart 1" in log, log[-3000:]
    assert state(env, jid) != "FAILED", log[-3000:]
    assert steps(run) == list(range(1, 61))  # resumed from the checkpoint, ended at the same final step
    assert json.loads((run / "summary.json").read_text())["steps"] == 60


def test_multinode_script_runs_two_nodes_with_c10d_rendezvous(tmp_path):
    env = cluster(tmp_path / "slurm2", 2)
    try:
        run = tmp_path / "run"
        jid = submit(env, tmp_path, "train-multinode.sbatch", ["--nodes=2"],
                     "--set", "train.max_steps=3", "--set", "rollout.hf_batch_size=8")
        wait_for(lambda: state(env, jid) in ("COMPLETED", "GONE", "FAILED"), 900, "the multi-node job")
        log = (tmp_path / f"out-{jid}.txt").read_text()
        assert state(env, jid) != "FAILED" and steps(run) == [1, 2, 3], log[-3000:]
        assert "2 nodes x 1" in log
        assert json.loads((run / "plan.json").read_text())["generation_batch_size"] == 32  # 64 over 2 processes
    finally:
        subprocess.run(["bash", str(CLUSTER), str(tmp_path / "slurm2"), "stop"])
