"""The fused nf4 GEMM (trainer/kernels/nf4_gemm.py) computes bitsandbytes' dequantize_4bit + matmul, on the CPU through
Triton's interpreter. numpy has no bfloat16, so the interpreter runs fp32 and fp16 activations here; bf16 is checked
against bitsandbytes on the GPU by bench/decode_profile.py before any timing."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CHECK = r"""
import os, json, torch, bitsandbytes.functional as F
from trainer.kernels.nf4_gemm import nf4_matmul, nf4_tickets
torch.manual_seed(int(os.environ["SEED"]))
rows = []
# (M, N, K, config or None): decode sizes, ragged N and M, split-K (its partials summed in order, and by atomics: the
# A/B baseline), a column slice of a wider output
for m, n, k, cfg in [(8, 96, 256, None), (1, 64, 128, (16, 64, 64, 1)), (3, 64, 512, (16, 64, 128, 2)),
                     (20, 130, 192, (32, 64, 64, 1)), (5, 70, 320, (16, 64, 64, 3)), (40, 64, 128, (64, 64, 128, 1)), (8, 48, 256, (16, 32, 128, 1)), (16, 100, 640, (16, 32, 128, 5))]:
    # lookup 1: tl.gather, 0: select tree, 3: gather from each block's scaled levels; ordered False: split-K by fp32
    # atomics; fixup: the ordered sum in the kernel; xsplit: x's even / odd columns against the two nibbles' halves
    for dt, lookup, ordered, fixup, xsplit in ((torch.float32, 1, True, False, False), (torch.float16, 1, True, False, False),
                                               (torch.float32, 0, True, False, False), (torch.float32, 1, False, False, False),
                                               (torch.float32, 1, True, True, False), (torch.float16, 1, True, True, False),
                                               (torch.float32, 3, True, False, False), (torch.float16, 3, True, False, True),
                                               (torch.float32, 1, True, False, True), (torch.float16, 3, True, True, True)):
        w = torch.randn(n, k)
        q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        x = torch.randn(m, k).to(dt)
        ref = x.double() @ F.dequantize_4bit(q, st).double().T
        wide = torch.full((m, n + 9), float("nan"), dtype=dt)  # poisoned: every element of the slice must be written
        nf4_matmul(x, q.view(-1), st.absmax, n, out=wide[:, 4:4 + n], cfg=cfg, lookup=lookup, ordered=ordered,
                   fixup=fixup, xsplit=xsplit)
        y = wide[:, 4:4 + n].double()
        row = dict(m=m, n=n, k=k, dtype=str(dt), lookup=lookup, ordered=ordered, fixup=fixup, xsplit=xsplit,
                   rel=float((y - ref).norm() / ref.norm()),
                   untouched=bool(wide[:, :4].isnan().all() and wide[:, 4 + n:].isnan().all()))
        if ordered:  # the same bits on a second call (fixup: its tickets were left at zero), and fixup = the two-kernel sum
            again = nf4_matmul(x, q.view(-1), st.absmax, n, cfg=cfg, lookup=lookup, fixup=fixup, xsplit=xsplit)
            other = nf4_matmul(x, q.view(-1), st.absmax, n, cfg=cfg, lookup=lookup, fixup=not fixup, xsplit=xsplit)
            if lookup == 3:  # the scaled table holds bitsandbytes' rounded values: the same bits as lookup 1
                row["same_as_lookup1"] = bool(torch.equal(again, nf4_matmul(x, q.view(-1), st.absmax, n, cfg=cfg, lookup=1,
                                                                             fixup=fixup, xsplit=xsplit)))
            row.update(repeats=bool(torch.equal(again, wide[:, 4:4 + n])),
                       same_as_other_sum=bool(torch.equal(again, other)),
                       tickets_zero=bool((nf4_tickets(x.device) == 0).all()))
        rows.append(row)
print("ROWS" + json.dumps(rows))
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_nf4_gemm_equals_bitsandbytes_dequant_matmul(seed):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "SEED": str(seed), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    rows = json.loads(out.stdout.split("ROWS", 1)[1])
    for r in rows:
        tol = 1e-6 if r["dtype"] == "torch.float32" else 2e-3  # fp16 rounds each dequantised weight and x
        assert r["rel"] < tol, r
        assert r["untouched"], r  # columns outside the output slice are left alone
        if r["ordered"]:
            assert r["repeats"] and r["tickets_zero"], r
            assert r["same_as_other_sum"], r  # fp32 partials added in split order, rounded once, either way
            assert r.get("same_as_lookup1", True), r
    assert sum(r["fixup"] and r["k"] // 64 >= 2 for r in rows) >= 6  # split-K rows ran through the fixup
    assert {(r["lookup"], r["xsplit"]) for r in rows} >= {(3, False), (3, True), (1, True)}


FUSED = r"""
import json, torch, bitsandbytes.functional as F
from trainer.rollout.vllm_internals import nf4_apply
torch.manual_seed(0)
# A fused qkv weight laid out as vLLM's bnb loader leaves it: the shards' packed bytes back to back in one uint8
# parameter, one QuantState per shard in `bnb_quant_state`, byte offsets in `bnb_shard_offsets` (a CPU tensor).
k, rows = 128, (64, 32, 32)
parts = [F.quantize_4bit(torch.randn(n, k), blocksize=64, quant_type="nf4") for n in rows]
weight = torch.nn.Parameter(torch.cat([q.view(-1) for q, _ in parts]).view(-1, 1), requires_grad=False)
weight.bnb_quant_state = {i: st for i, (_, st) in enumerate(parts)}
weight.bnb_shard_offsets = torch.tensor([0, *torch.tensor([q.numel() for q, _ in parts]).cumsum(0).tolist()])
x = torch.randn(8, k, dtype=torch.float16)
out = torch.full((8, sum(rows)), float("nan"), dtype=torch.float16)
assert nf4_apply(x, weight, out)
ref = torch.cat([x.double() @ F.dequantize_4bit(q, st).double().T for q, st in parts], dim=1)
print("REL" + json.dumps(float((out.double() - ref).norm() / ref.norm())))
"""


def test_fused_vllm_weight_shards_land_in_their_columns():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", FUSED], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("REL", 1)[1]) < 2e-3


def test_nf4_bench_sums_each_variants_best_tiling_per_layer():
    # bench/nf4_bench.py's per-layer table (GPU-only bench; its arithmetic here): each variant keyed by lookup, sum,
    # fixup and xsplit, at its fastest tiling per shard, times the shard's count per layer
    from bench.nf4_bench import PER_LAYER, per_layer

    def v(lookup, us, fixup=False, xsplit=False, cfg=(16, 64, 128, 4)):
        return dict(lookup=lookup, ordered=True, fixup=fixup, xsplit=xsplit, cfg=list(cfg), stages=None, warps=4, us=us)

    rows = [dict(model="qwen2.5-1.5b", shard=name, m=8, bnb_us=10.0,
                 variants=[v(1, 5.0), v(1, 4.0, cfg=(16, 32, 128, 4)), v(3, 3.0, xsplit=True), v(1, 2.0, fixup=True),
                           dict(lookup=3, ordered=True, fixup=False, xsplit=False, cfg=[16, 64, 128, 4], stages=None,
                                warps=4, error="mismatch")])
            for name in PER_LAYER]
    got = per_layer(rows)["qwen2.5-1.5b m=8"]
    n = sum(PER_LAYER.values())
    assert got["bnb_us"] == 10.0 * n and got["lookup1_best_us"] == 4.0 * n
    assert got["lookup3_xsplit_best_us"] == 3.0 * n and got["lookup1_fixup_best_us"] == 2.0 * n
    assert "lookup3_best_us" not in got and got["old_default_us"] is None  # failed or never timed
