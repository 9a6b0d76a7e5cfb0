"""Custom kernels, each proven against the library result it replaces (tests) and kept only where a profile showed
the library's kernel was the bottleneck (bench/results/decode_profile.json)."""

# The 16 nf4 levels: bitsandbytes' NF4 code (fp32), as its CUDA kernels spell them (dDequantizeNF4). The fused GEMM
# (nf4_gemm.py) selects them in registers; the layers it and trainer/nf4_linear.py take over must carry them.
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def standard_nf4(quant_state) -> bool:
    """A bitsandbytes quant state of nf4 with the standard levels above (what HF and vLLM quantise to; fp4 is not)."""
    return quant_state.quant_type == "nf4" and quant_state.code.float().cpu().tolist() == list(NF4)
