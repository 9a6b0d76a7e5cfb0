"""The fused nf4 GEMM (trainer/kernels/nf4_gemm.py) at decode sizes on the 1.5B, 7B and 8B shapes, on the GPU: its
level lookups (0: a select tree in registers, 1: tl.gather from a 16-entry table; 2, a load per weight from the table
in global memory, was dropped; 3: a gather from each block's levels scaled and rounded once), x's columns split
into two dots on the nibbles' halves (xsplit), its split-K sums (partials summed in order by two more kernels, the default; in order
inside the kernel by the last program of each tile, `fixup`; or fp32 atomics) and a few tilings, against
bitsandbytes' matmul_4bit as vLLM calls it.

    python bench/nf4_bench.py OUT.json [--defaults]     # --defaults: the default tiling only
Weights are quantised on the GPU with bitsandbytes' quantize_4bit (nf4, blocksize 64: what vLLM's in-flight
quantisation does). Each variant is first checked against dequantize_4bit + matmul in fp64 (output poisoned with NaN
before the call; a variant that fails to compile or to match is recorded as such), then timed inside a CUDA graph
(triton.testing.do_bench_cudagraph, as vLLM replays decode steps). GB/s counts the nf4 bytes and absmax read.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # shard (N, K) per model shape: q and o, k and v, gate and up, down
    "qwen2.5-1.5b": {"q/o": (1536, 1536), "k/v": (256, 1536), "gate/up": (8960, 1536), "down": (1536, 8960)},
    "qwen2.5-7b": {"q/o": (3584, 3584), "k/v": (512, 3584), "gate/up": (18944, 3584), "down": (3584, 18944)},
    "llama-3.1-8b": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
}
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}
ROWS = (8, 16)
LOOKUPS = (0, 1)  # 2 (a load per weight from global memory) was measured 4-6x slower and dropped
# (lookup, ordered split-K, fixup, xsplit) at the default tiling under --defaults; every tiling is timed ordered, the
# default (trainer/kernels/nf4_gemm.py: lookup 3 gathers from each block's scaled levels, xsplit runs two dots on the
# nibbles' halves, fixup sums the split-K partials in the kernel)
DEFAULT_VARIANTS = ((1, True, False, False), (1, False, False, False), (0, True, False, False), (1, True, True, False),
                    (3, True, False, False), (1, True, False, True), (3, True, False, True), (3, True, True, True))
TILINGS = ((32, 128, 2, 4), (64, 128, 3, 4), (32, 256, 3, 4), (64, 256, 3, 8))  # BLOCK_N, BLOCK_K, stages, warps


def main(out: Path, defaults: bool = False) -> None:
    import triton.testing
    from bitsandbytes import matmul_4bit
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from trainer.kernels.nf4_gemm import config, nf4_matmul

    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bench = lambda f: triton.testing.do_bench_cudagraph(f, rep=20, return_mode="median") * 1e3  # noqa: E731
    rows, t0 = [], time.time()
    for model, shapes in SHAPES.items():
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            q, st = quantize_4bit(w, blocksize=64, quant_type="nf4")
            wd = dequantize_4bit(q, st)
            nbytes = n * k * (0.5 + 1 / 16)
            for m in ROWS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.double() @ wd.double().T
                with torch.no_grad():
                    row = dict(model=model, shard=name, n=n, k=k, m=m, default=list(config(m, n, k, sms)),
                               bnb_us=round(bench(lambda: matmul_4bit(x, q.t(), st)), 2), variants=[])
                todo = ([(lk, od, fx, xs, None, None, None, 4) for lk, od, fx, xs in DEFAULT_VARIANTS] if defaults
                        else [(lk, True, False, False, *t) for lk in LOOKUPS for t in TILINGS])
                for lookup, ordered, fixup, xsplit, bn, bk, stages, warps in todo:
                    cfg = config(m, n, k, sms, block_n=bn, block_k=bk)  # the kernel's own split-K rule
                    v = dict(lookup=lookup, ordered=ordered, fixup=fixup, xsplit=xsplit, cfg=list(cfg), stages=stages,
                             warps=warps)
                    try:
                        call = lambda: nf4_matmul(x, q.view(-1), st.absmax, n, cfg=cfg,  # noqa: E731
                                                  lookup=lookup, num_stages=stages, num_warps=warps,
                                                  ordered=ordered, fixup=fixup, xsplit=xsplit)
                        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
                        nf4_matmul(x, q.view(-1), st.absmax, n, out=y, cfg=cfg, lookup=lookup, num_stages=stages,
                                   num_warps=warps, ordered=ordered, fixup=fixup, xsplit=xsplit)
                        if ordered and not torch.equal(y, call()):
                            v["error"] = "not bit-reproducible"
                        v["rel_err"] = float((y.double() - ref).norm() / ref.norm())
                        if "error" in v:
                            pass
                        elif not v["rel_err"] < 1e-2:
                            v["error"] = "mismatch"
                        else:
                            v["us"] = round(bench(call), 2)
                            v["gbps"] = round(nbytes / (v["us"] * 1e-6) / 1e9, 1)
                    except Exception as e:  # a tiling or lookup Triton cannot build here: recorded, not fatal
                        v["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    row["variants"].append(v)
                ok = [v for v in row["variants"] if "us" in v]
                row["best"] = min(ok, key=lambda v: v["us"]) if ok else None
                rows.append(row)
                out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
                print(json.dumps({k: row[k] for k in ("model", "shard", "m", "bnb_us")}),
                      [(v["lookup"], v["ordered"], v["fixup"], v["xsplit"], v["cfg"][1:],
                        v.get("us", v.get("error", "")[:40]))
                       for v in row["variants"]], f"{time.time() - t0:.0f}s", flush=True)
    layer = per_layer(rows)
    res = {"device": torch.cuda.get_device_name(), "command": "python bench/nf4_bench.py OUT.json" + (" --defaults" if defaults else ""),
           "timing": "triton.testing.do_bench_cudagraph, median", "rows": rows, "one_layer_us": layer}
    out.write_text(json.dumps(res, indent=1))
    print("per layer (us):", json.dumps(layer, indent=1), flush=True)


def per_layer(rows: list[dict]) -> dict:
    """One decoder layer's 4-bit GEMM time (us) per model and row count: bitsandbytes', each variant's at its best
    tiling per shard (None where a shard has no timing for it), and the select tree at the tiling that was the default
    until 2026-12-02 (32 columns, K tile 128, 2 stages, 4 warps)."""
    layer = {}
    for model in SHAPES:
        for m in ROWS:
            rs = [r for r in rows if r["model"] == model and r["m"] == m]
            if not rs:
                continue
            entry = {"bnb_us": round(sum(r["bnb_us"] * PER_LAYER[r["shard"]] for r in rs), 1)}
            for key in dict.fromkeys([(lk, True, False, False) for lk in LOOKUPS] + list(DEFAULT_VARIANTS)):
                best = [min((v["us"] for v in r["variants"] if "us" in v and (
                    v["lookup"], v["ordered"], v.get("fixup", False), v.get("xsplit", False)) == key), default=None)
                        for r in rs]
                if any(b is not None for b in best):
                    lookup, ordered, fixup, xsplit = key
                    mode = ("_fixup" if fixup else "" if ordered else "_atomic") + ("_xsplit" if xsplit else "")
                    entry[f"lookup{lookup}{mode}_best_us"] = (
                        round(sum(b * PER_LAYER[r["shard"]] for b, r in zip(best, rs)), 1) if None not in best else None)
            default = [next((v.get("us") for v in r["variants"] if v["lookup"] == 0 and v["cfg"][1:3] == [32, 128]
                             and v["stages"] == 2 and v["warps"] == 4), None) for r in rs]
            entry["old_default_us"] = (round(sum(b * PER_LAYER[r["shard"]] for b, r in zip(default, rs)), 1)
                                       if None not in default else None)
            layer[f"{model} m={m}"] = entry
    return layer


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--defaults" in sys.argv[2:])
