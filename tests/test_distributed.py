"""Data parallel on the CPU: `torchrun --nproc_per_node 2` (gloo) trains the tiny recipe with LoRA weights equal on
both ranks, and the same losses as one process over the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

ARGS = ["recipes/tiny-cpu.yaml", "--set", "train.max_steps=4", "--set", "rollout.hf_batch_size=8",
        "--set", "logging.plots=false"]


def train(out, nproc: int, dump=None, extra=()):
    env = {**os.environ, **({"TRAINER_TEST_DUMP_LORA": str(dump)} if dump else {})}
    # --standalone: the rendezvous takes a free port (the fixed --master_port=29517 failed with EADDRINUSE twice on
    # 2026-12-04 with other test files running beside this one)
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    res = subprocess.run([*pre, "-m", "trainer.cli", *ARGS, *extra, "--output-dir", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]  # e.g. process groups torn down twice at exit
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_two_ranks_equal_one_process_and_agree_on_lora(tmp_path):
    two = train(tmp_path / "two", 2, dump=tmp_path)
    one = train(tmp_path / "one", 1)
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["reward_mean"] - b["reward_mean"]) < 1e-6, (a, b)
    # The final evaluation: each rank samples half of the eval prompts with the global rows' seeds; gathered, the
    # numbers are one process's.
    assert two[-1]["eval/prompts"] == one[-1]["eval/prompts"] == 32
    for k in ("eval/reward_mean", "eval/rewards/char_class_all/pass@4", "eval/completion_length_mean"):
        assert abs(one[-1][k] - two[-1][k]) < 1e-6, k
    r0, r1 = torch.load(tmp_path / "lora_rank0.pt"), torch.load(tmp_path / "lora_rank1.pt")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(v.abs().sum() > 0 for k, v in r0.items() if "lora_B" in k)  # they trained, and identically
    assert not (tmp_path / "two" / "metrics.jsonl.rank1").exists()  # one process logs


def test_two_ranks_with_a_vllm_engine_each(tmp_path):
    """One colocated vLLM engine per rank (external_launcher, joined to the trainer's process group): the same
    losses as one process with one engine, equal adapters, and a clean shutdown of vLLM's groups before ours."""
    if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    extra = ("--set", "rollout.engine=vllm", "--set", "train.max_steps=3")
    two = train(tmp_path / "two", 2, dump=tmp_path, extra=extra)
    one = train(tmp_path / "one", 1, extra=extra)
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["reward_mean"] - b["reward_mean"]) < 1e-6, (a, b)
    r0, r1 = torch.load(tmp_path / "lora_rank0.pt"), torch.load(tmp_path / "lora_rank1.pt")
    assert r0 and r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(v.abs().sum() > 0 for k, v in r0.items() if "lora_B" in k)  # they trained, and identically
