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


SHIPPED_READ = """
import json, os, sys, torch
torch.cuda.get_device_name = lambda *a: "NVIDIA H100 80GB HBM3"
import vllm.lora.ops.triton_ops.utils as u
from trainer.rollout import vllm_internals as vi
default = u.get_lora_op_configs("shrink", 2, 8, 1536, 16, 3)  # no folder yet: vLLM's default, cached
os.environ["VLLM_TUNED_CONFIG_FOLDER"] = sys.argv[1]
assert vi.forget_lora_op_configs()  # what the engine calls before it starts
print(json.dumps([default, u.get_lora_op_configs("shrink", 2, 8, 1536, 16, 3),
                  u.get_lora_op_configs("expand", 2, 8, 8960, 16, 2, add_inputs=True)]))
"""


def test_shipped_configs_are_used_only_where_they_cover_the_card_and_the_models_shapes(monkeypatch):
    """trainer/rollout/lora_kernels.py: the configs tuned on an H100 for the 1.5B, 7B and 8B shapes at r16 apply there
    and nowhere else (vLLM would take another shape's nearest K / N, or raise on a missing slice count), a folder the user set is
    kept, and vLLM's own loader reads the shipped files for that card, again after its process cache is cleared."""
    from trainer.rollout import lora_kernels as lk
    from trainer.shapes import config_dict

    h100, c15 = "NVIDIA H100 80GB HBM3", config_dict("qwen2.5-1.5b")
    assert lk.tuned_folder(c15, 16, h100) == lk.SHIPPED
    assert lk.tuned_folder(c15, 64, h100) is None  # another rank: the stacks' N (shrink) and K (expand)
    for shipped in ("qwen2.5-7b", "llama-3.1-8b"):  # lora_tune on an H100, 2026-12-07 (queue_2026-12-07/h)
        assert lk.tuned_folder(config_dict(shipped), 16, h100) == lk.SHIPPED
    assert lk.tuned_folder(config_dict("qwen2.5-0.5b"), 16, h100) is None  # another model's widths
    assert lk.tuned_folder(c15, 16, "NVIDIA H200") is None  # no files for the card
    shrink = json.loads((lk.SHIPPED / "NVIDIA_H100_80GB_HBM3_SHRINK.json").read_text())
    need = lk.lookups(c15, 16)["shrink"]
    assert lk.covers(shrink, need)
    del shrink["2"]["3"]["8"]["1536"]  # one batch without the qkv shape: vLLM would take another K there
    assert not lk.covers(shrink, need)
    monkeypatch.delenv(lk.ENV, raising=False)
    assert "vLLM's default" in lk.use_tuned(config_dict("qwen2.5-0.5b"), 16, h100) and lk.ENV not in os.environ
    assert "tuned for" in lk.use_tuned(c15, 16, h100) and os.environ[lk.ENV] == str(lk.SHIPPED)
    # a second engine in the same process, on a model without configs: its own decision, not the first one's
    assert "vLLM's default" in lk.use_tuned(config_dict("qwen2.5-0.5b"), 16, h100) and lk.ENV not in os.environ
    monkeypatch.setenv(lk.ENV, "/the/users/own")
    assert "set by the user" in lk.use_tuned(c15, 16, h100) and os.environ[lk.ENV] == "/the/users/own"
    if os.environ.get("TRAINER_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    out = subprocess.run([sys.executable, "-c", SHIPPED_READ, str(lk.SHIPPED)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300)
    default, qkv_shrink, gate_up_expand = json.loads(out.stdout.strip().splitlines()[-1])
    assert default != qkv_shrink  # read again after the cache was cleared (vLLM caches per process)
    expand = json.loads((lk.SHIPPED / "NVIDIA_H100_80GB_HBM3_EXPAND_TRUE.json").read_text())
    assert qkv_shrink == json.loads((lk.SHIPPED / "NVIDIA_H100_80GB_HBM3_SHRINK.json").read_text())["2"]["3"]["8"][
        "1536"]["16"]
    assert gate_up_expand == expand["2"]["2"]["8"]["16"]["8960"]


def test_shipping_merges_a_sittings_configs_into_the_cards_files(tmp_path):
    """bench/lora_tune.py --ship: a second shape tuned on the same card joins the file beside the first; the same
    shape tuned again replaces its own entries only."""
    from bench.lora_tune import ship

    cfg = lambda m: {"block_m": m, "block_n": 16}  # noqa: E731
    shipped, sitting = tmp_path / "shipped", tmp_path / "sitting"
    shipped.mkdir(), sitting.mkdir()
    (shipped / "X_SHRINK.json").write_text(json.dumps({"2": {"3": {"8": {"1536": {"16": cfg(16)}}}}}))
    (sitting / "X_SHRINK.json").write_text(json.dumps({"2": {"3": {"8": {"3584": {"16": cfg(32)},
                                                                         "1536": {"16": cfg(64)}}}}}))
    (sitting / "Y_SHRINK.json").write_text(json.dumps({"2": {"1": {"1": {"8": {"8": cfg(16)}}}}}))
    assert [p.name for p in ship(sitting, shipped)] == ["X_SHRINK.json", "Y_SHRINK.json"]
    merged = json.loads((shipped / "X_SHRINK.json").read_text())["2"]["3"]["8"]
    assert merged == {"1536": {"16": cfg(64)}, "3584": {"16": cfg(32)}}
    assert json.loads((shipped / "Y_SHRINK.json").read_text()) == {"2": {"1": {"1": {"8": {"8": cfg(16)}}}}}
