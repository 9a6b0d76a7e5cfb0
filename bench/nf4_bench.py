"""The fused nf4 GEMM (trainer/kernels/nf4_gemm.py) against bitsandbytes at the 1.5B shape's shard shapes, on the GPU.

    python bench/nf4_bench.py OUT.json
Weights are quantised on the GPU with bitsandbytes' quantize_4bit (nf4, blocksize 64: what vLLM's in-flight
quantisation does); each product is first checked against dequantize_4bit + matmul (output poisoned with NaN
before the call), then timed with triton.testing.do_bench (median, us): bitsandbytes' matmul_4bit as vLLM calls it,
dequantize + matmul, a bf16 matmul of the dequantised weight, and the fused kernel at its default config.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"q_proj/o_proj": (1536, 1536), "k_proj/v_proj": (256, 1536), "gate_proj/up_proj": (8960, 1536),
          "down_proj": (1536, 8960)}
ROWS = (1, 8, 16, 32, 64)


def main(out: Path) -> None:
    import triton.testing
    from bitsandbytes import matmul_4bit
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from trainer.kernels.nf4_gemm import config, nf4_matmul

    torch.manual_seed(0)
    rows = []
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e3  # noqa: E731
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q, st = quantize_4bit(w, blocksize=64, quant_type="nf4")
        wd = dequantize_4bit(q, st)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ wd.double().T
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            nf4_matmul(x, q.view(-1), st.absmax, n, out=y)
            rel = float((y.double() - ref).norm() / ref.norm())
            with torch.no_grad():
                row = dict(shape=name, n=n, k=k, m=m, rel_err=rel, config="x".join(map(str, config(m, n, k))),
                           bnb_us=round(bench(lambda: matmul_4bit(x, q.t(), st)), 2),
                           dequant_matmul_us=round(bench(lambda: x @ dequantize_4bit(q, st).T), 2),
                           bf16_us=round(bench(lambda: x @ wd.T), 2),
                           fused_us=round(bench(lambda: nf4_matmul(x, q.view(-1), st.absmax, n)), 2))
            row["fused_gbps"] = round((n * k * (0.5 + 1 / 16) + 2 * m * (k + n)) / (row["fused_us"] * 1e-6) / 1e9, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    layer = {m: {key: round(sum(r[key] * (2 if r["shape"] != "down_proj" else 1) for r in rows if r["m"] == m), 1)
                 for key in ("bnb_us", "fused_us", "bf16_us")} for m in ROWS}  # q,k,v,o,gate,up,down of one layer
    res = {"device": torch.cuda.get_device_name(), "command": "python bench/nf4_bench.py OUT.json", "rows": rows,
           "one_layer_us_eager_launches": layer}
    out.write_text(json.dumps(res, indent=1))
    print("per layer (us):", json.dumps(layer), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
