"""bench/lora_tune.py calls vLLM's own LoRA shrink/expand kernels as the engine does (checked against torch's matmuls
before any config is timed) and writes configs that vLLM's own loader (VLLM_TUNED_CONFIG_FOLDER) reads back.
On the CPU the kernels run under Triton's interpreter (float16: it has no bfloat16), two configs a kernel."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LOAD = """
import json, os, sys, torch
torch.cuda.get_device_name = lambda *a: "cpu"  # the file name vLLM looks for on this machine: cpu_SHRINK.json
os.environ["VLLM_TUNED_CONFIG_FOLDER"] = sys.argv[1]
import vllm.lora.ops.triton_ops.utils as u
print(json.dumps([u.get_lora_op_configs("shrink", 2, 4, 128, 16, 3),
                  u.get_lora_op_configs("expand", 2, 4, 256, 16, 2, add_inputs=True),
                  u.get_lora_op_configs("shrink", 2, 5, 256, 16, 1)]))
"""


def test_the_tuner_times_vllms_kernels_as_the_engine_calls_them_and_vllm_reads_its_configs(tmp_path):
    if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    env = {**os.environ, "LORA_TUNE_SMOKE": "1", "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "bench/lora_tune.py", str(tmp_path), "tiny"], cwd=ROOT, env=env, check=True,
                   timeout=600, capture_output=True)
    res = json.loads((tmp_path / "lora_tune.json").read_text())
    rows = {(r["layer"], r["op"]): r for r in res["rows"]}
    assert set(rows) == {(layer, op) for layer in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
                         for op in ("shrink", "expand")}
    assert all(r["configs_timed"] == 2 for r in rows.values())  # both grid configs gave the default's output
    out = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "configs")], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300)
    qkv_shrink, gate_up_expand, down_shrink = json.loads(out.stdout.strip().splitlines()[-1])
    # what vLLM reads for the tiny shape's qkv shrink (3 slices, K 128) and gate_up expand (2 slices, N 256: the
    # tiny intermediate) at 4 rows, and down's shrink (K 256) at 5 rows, the nearest batch tuned being 4
    assert qkv_shrink == rows["qkv_proj", "shrink"]["best"]
    assert gate_up_expand == rows["gate_up_proj", "expand"]["best"] and down_shrink == rows["down_proj", "shrink"]["best"]
