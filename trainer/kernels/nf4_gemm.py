"""A fused nf4 GEMM for small batches: y = x @ dequant(W).T reading the 4-bit bytes once, never writing bf16 weights.

Why: at decode batch sizes (M = 1..64 rows) bitsandbytes 0.50 on an H100 mostly dequantises each weight to bf16
in memory and then runs a bf16 matmul (its `gemm_4bit` heuristic prefers that on sm90 for large weights), so every
decode step writes and re-reads 2 bytes per parameter instead of reading 0.56. This kernel dequantises in registers:
each program loads a [BLOCK_N, BLOCK_K/2] tile of packed bytes, splits the nibbles (bitsandbytes packs element 2j in
the high nibble and 2j+1 in the low one), looks both up in the 16-entry nf4 code, scales by the fp32 absmax of
their 64-element block, rounds to the activation dtype (exactly bitsandbytes' dequantised value) and accumulates
x_even @ W_hi.T + x_odd @ W_lo.T in fp32. Split-K (fp32 atomics) keeps the GPU busy when N is small.

Layout contract (bitsandbytes nf4, blocksize 64, not nested; what vLLM's in-flight bnb quantisation produces):
W [N, K] row-major, flattened, quantised in blocks of 64 consecutive elements (K % 64 == 0, so no block straddles
rows); `packed` holds N*K/2 bytes, `absmax` N*K/64 fp32 values, `code` the 16 fp32 nf4 levels.
Tested against bitsandbytes' dequantize_4bit + matmul on the CPU with TRITON_INTERPRET=1
(tests/test_nf4_gemm.py) and timed against bitsandbytes on the GPU by bench/decode_profile.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

QBLOCK = 64  # bitsandbytes' blocksize for nf4 weights (vLLM and HF both use 64)
# Software-pipelining depth. Triton's default (3) overflows the H100's 227 KB of shared memory at BLOCK_M 64 x
# BLOCK_K 256 (248 KB asked, seen 2026-11-26); 2 stages with BLOCK_K <= 128 above BLOCK_M 16 fit.
NUM_STAGES = 2


@triton.jit
def _nf4_gemm_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // 64
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_g = tl.arange(0, GROUPS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 2)
    a_rows = absmax_ptr + offs_n.to(tl.int64)[:, None] * (K // 64)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    for it in range(pid_k, K // BLOCK_K, SPLIT_K):  # split-K: program k takes every SPLIT_K-th tile of K
        k0 = it * BLOCK_K
        packed = tl.load(w_rows + (k0 // 2 + offs_h)[None, :], mask=n_ok[:, None], other=0)
        hi = ((packed >> 4) & 0xF).to(tl.int32)
        lo = (packed & 0xF).to(tl.int32)
        scale = tl.load(a_rows + (k0 // 64 + offs_g)[None, :], mask=n_ok[:, None], other=0.0)  # [BN, GROUPS]
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, GROUPS, 32)), (BLOCK_N, HALF))
        w_hi = (tl.load(code_ptr + hi) * scale).to(x_ptr.dtype.element_ty)
        w_lo = (tl.load(code_ptr + lo) * scale).to(x_ptr.dtype.element_ty)
        x_even = tl.load(x_rows + (k0 + 2 * offs_h)[None, :], mask=m_ok[:, None], other=0.0)
        x_odd = tl.load(x_rows + (k0 + 1 + 2 * offs_h)[None, :], mask=m_ok[:, None], other=0.0)
        acc = tl.dot(x_even, tl.trans(w_hi), acc)
        acc = tl.dot(x_odd, tl.trans(w_lo), acc)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def config(m: int, n: int, k: int, num_sms: int = 132, block_n: int = 64, waves: float = 2.0
           ) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) for an [m, k] x [n, k].T product: enough programs to fill the GPU about
    `waves` times over, split-K only when the N tiles alone cannot (each split keeps >= 2 K tiles)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_k = 256 if k % 256 == 0 and block_m == 16 else (128 if k % 128 == 0 else 64)  # shared memory: <= ~100 KB
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = 1
    while tiles * split < waves * num_sms and k // block_k >= 4 * split:
        split *= 2
    return block_m, block_n, block_k, split


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int,
               out: torch.Tensor | None = None, cfg: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, rows contiguous) @ dequant(W [n, K]).T -> [M, n] in x's dtype, written into `out` when
    given (it may be a column slice of a wider tensor: its rows are strided, its columns contiguous)."""
    m, k = x.shape
    if k % QBLOCK:
        raise ValueError(f"nf4_matmul needs K % {QBLOCK} == 0, got K={k}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if out.stride(1) != 1:
        raise ValueError("nf4_matmul: out's columns must be contiguous")
    bm, bn, bk, split = cfg or config(m, n, k, _num_sms(x.device))
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    if split == 1:
        _nf4_gemm_kernel[grid](x, packed, absmax, code, out, m, n, k, x.stride(0), out.stride(0), BLOCK_M=bm,
                               BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, ATOMIC=False, num_warps=4, num_stages=NUM_STAGES)
        return out
    acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    _nf4_gemm_kernel[grid](x, packed, absmax, code, acc, m, n, k, x.stride(0), acc.stride(0), BLOCK_M=bm,
                           BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, ATOMIC=True, num_warps=4, num_stages=NUM_STAGES)
    out.copy_(acc)
    return out


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]
