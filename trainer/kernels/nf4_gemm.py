"""A fused nf4 GEMM for small batches: y = x @ dequant(W).T reading the 4-bit bytes once, never writing bf16 weights.

Why: at decode batch sizes (M = 1..64 rows) bitsandbytes 0.50 on an H100 mostly dequantises each weight to bf16
in memory and then runs a bf16 matmul (its `gemm_4bit` heuristic prefers that on sm90 for large weights), so every
decode step writes and re-reads 2 bytes per parameter instead of reading 0.56. This kernel dequantises in registers:
each program loads a [BLOCK_N, BLOCK_K/2] tile of packed bytes, splits the nibbles (bitsandbytes packs element 2j in
the high nibble and 2j+1 in the low one), maps both to their nf4 level (tl.gather from a 16-entry table loaded
once per program), scales by the fp32 absmax of their 64-element block, rounds to the activation dtype (exactly
bitsandbytes' dequantised value), interleaves them back into [BLOCK_N, BLOCK_K] and accumulates x @ W.T in fp32 on
the tensor cores. Split-K keeps the GPU busy when N is small: each split writes its fp32 partial to its own slice
of a [split, M, N] buffer, summed in a fixed order afterwards, so the same inputs give the same bits on every call
(a seeded rollout repeats exactly: tests/test_gpu.py's zero-LoRA check). fp32 atomics into one [M, N] buffer, the
first version, added in no fixed order; kept only as bench/nf4_bench.py's A/B baseline (`ordered=False`). The fixed
order costs 2% of a 7B layer's 4-bit GEMM time at 8 rows, 4% of an 8B's, 7% of a 1.5B's (one H200, 2026-12-02,
bench/results/nf4_bench_defaults.json); a seeded rollout that does not repeat cost more than that to debug.
The fixed-order sum costs two more kernels a GEMM (the sum over splits, the copy into `out`): in one H200 rollout of
the 1.5B shape (8 x 256 tokens, 2026-12-04 profile) 50k sums took 130 ms, and an elementwise kernel as frequent as
the copies 69 ms, beside 418 ms of the GEMM kernel itself. `fixup` (TRAINER_NF4_FIXUP=1, off until
bench/nf4_bench.py's A/B on the H200) sums in the kernel: each split stores its partial, takes a ticket from a
per-tile counter, and the program that draws the last ticket adds the partials in split order (the same bits
whichever program finishes last), writes `out` and resets the counter for the next call (a per-device buffer made
before graph capture, as the level table).

Layout contract (bitsandbytes nf4, blocksize 64, not nested; what vLLM's in-flight bnb quantisation produces):
W [N, K] row-major, flattened, quantised in blocks of 64 consecutive elements (K % 64 == 0, so no block straddles
rows); `packed` holds N*K/2 bytes, `absmax` N*K/64 fp32 values; the levels are bitsandbytes' NF4 code (`NF4`).
Tested against bitsandbytes' dequantize_4bit + matmul on the CPU with TRITON_INTERPRET=1
(tests/test_nf4_gemm.py); timed against bitsandbytes on the GPU at the 7B/8B shard shapes by bench/nf4_bench.py
and inside the engine by bench/decode_profile.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from trainer.kernels import NF4

QBLOCK = 64  # bitsandbytes' blocksize for nf4 weights (vLLM and HF both use 64)
# Software-pipelining depth. Triton's default (3) overflows the H100's 227 KB of shared memory at BLOCK_M 64 x
# BLOCK_K 256 (248 KB asked, seen 2026-11-26); 2 stages with BLOCK_K <= 128 above BLOCK_M 16 fit. At BLOCK_M 16
# (decode) 3 stages fit and were faster on the H200.
NUM_STAGES = 2
# How a 4-bit code becomes its nf4 level: 1 = tl.gather from the 16 levels (default), 0 = a select tree in registers,
# the previous default, kept as the A/B baseline (TRAINER_NF4_LOOKUP=0): 1.52x slower per 7B layer at 8 rows on the
# H200 (343 vs 226 us; bench/results/nf4_bench.json). A load per weight from the table in global memory was 4-6x
# slower than either and was dropped.
LOOKUP = int(os.environ.get("TRAINER_NF4_LOOKUP", "1"))
FIXUP = os.environ.get("TRAINER_NF4_FIXUP") == "1"
# Two more candidates for the dequantisation's instruction count, measured by bench/nf4_bench.py before either becomes
# a default (the 7B's decode GEMM ran at ~13% of the H200's bandwidth, 2026-12-02; dequantising is the likely limit):
# TRAINER_NF4_LOOKUP=3 scales and rounds each block's 16 levels once (16 multiplies per 64 weights) and gathers the
# weights from that [BLOCK_N, G, 16] table, instead of a multiply and a rounding per weight (bitsandbytes' values
# either way: the same fp32 product, rounded once). TRAINER_NF4_XSPLIT=1 loads x's even and odd columns apart and
# runs two dots on the high- and low-nibble halves, instead of interleaving them into one weight tile (tl.join +
# reshape, a register shuffle or a trip through shared memory, as Triton lays it out).
XSPLIT = os.environ.get("TRAINER_NF4_XSPLIT") == "1"
COUNTERS = 16384  # per-tile tickets for `fixup` (output tiles of one GEMM; more fall back to the two-kernel sum)




@triton.jit
def _nf4_level(q):
    """The nf4 level of 4-bit codes q (int32 in [0, 16)) by a select tree on the code's bits: register-only, where a
    table lookup would be a memory gather per weight (the first version's gathers were staged through shared memory
    by Triton's pipeliner and ran 2-4x slower than bitsandbytes)."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    v0 = tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367),
                  tl.where(b0, -0.6961928009986877, -1.0))
    v1 = tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495),
                  tl.where(b0, -0.18477343022823334, -0.28444138169288635))
    v2 = tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634),
                  tl.where(b0, 0.16093020141124725, 0.07958029955625534))
    v3 = tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023), tl.where(b0, 0.5626170039176941, 0.44070982933044434))
    return tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0))


@triton.jit
def _nf4_gemm_kernel(x_ptr, w_ptr, absmax_ptr, out_ptr, levels_ptr, M, N, K, stride_xm, stride_om, stride_os,
                     part_ptr, ticket_ptr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     ATOMIC: tl.constexpr, LOOKUP: tl.constexpr, FIXUP: tl.constexpr, XSPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    G: tl.constexpr = BLOCK_K // 64  # quantisation blocks (64 weights = 32 bytes) per K tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, G)
    offs_b = tl.arange(0, 32)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    # packed bytes as [BLOCK_N, G, 32]: one quantisation block per (row, g), so its absmax broadcasts along the last dim
    w_base = w_ptr + rows[:, None, None] * (K // 2) + (offs_g[None, :, None] * 32 + offs_b[None, None, :])
    a_base = absmax_ptr + rows[:, None] * (K // 64) + offs_g[None, :]
    x_base = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    # XSPLIT: x's even and odd columns apart (element 2j of the weight is a byte's high nibble, 2j + 1 its low one),
    # so the two halves of the weight tile go to two dots as they are, never interleaved into [BLOCK_N, BLOCK_K]
    x_even = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + 2 * tl.arange(0, BLOCK_K // 2)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if LOOKUP == 1 or LOOKUP == 3:  # the 16 levels (loaded once) as a [BLOCK_N, G, 16] tensor, gathered along its last dim
        table = tl.broadcast_to(tl.reshape(tl.load(levels_ptr + tl.arange(0, 16)), (1, 1, 16)), (BLOCK_N, G, 16))
    for it in range(pid_k, K // BLOCK_K, SPLIT_K):  # split-K: program k takes every SPLIT_K-th tile of K
        k0 = it * BLOCK_K
        packed = tl.load(w_base + k0 // 2, mask=n_ok[:, None, None], other=0).to(tl.int32)
        scale = tl.load(a_base + k0 // 64, mask=n_ok[:, None], other=0.0)[:, :, None]
        # bitsandbytes' dequantised weight: fp32 level x fp32 absmax, rounded to the activation dtype
        if LOOKUP == 3:  # each block's 16 weights made once (level x absmax, rounded), then one gather per weight
            scaled = (table * scale).to(x_ptr.dtype.element_ty)  # [BLOCK_N, G, 16]: 16 multiplies per 64 weights
            w_hi = tl.gather(scaled, (packed >> 4) & 0xF, 2)  # element 2j
            w_lo = tl.gather(scaled, packed & 0xF, 2)  # element 2j + 1
        else:
            if LOOKUP == 1:  # tl.gather from the 16 levels: one read per weight
                lv_hi = tl.gather(table, (packed >> 4) & 0xF, 2)
                lv_lo = tl.gather(table, packed & 0xF, 2)
            else:  # a select tree in registers: ~25 instructions per weight
                lv_hi = _nf4_level((packed >> 4) & 0xF)
                lv_lo = _nf4_level(packed & 0xF)
            w_hi = (lv_hi * scale).to(x_ptr.dtype.element_ty)  # element 2j
            w_lo = (lv_lo * scale).to(x_ptr.dtype.element_ty)  # element 2j + 1
        if XSPLIT:
            xe = tl.load(x_even + k0, mask=m_ok[:, None], other=0.0)
            xo = tl.load(x_even + k0 + 1, mask=m_ok[:, None], other=0.0)
            acc = tl.dot(xe, tl.trans(tl.reshape(w_hi, (BLOCK_N, BLOCK_K // 2))), acc)
            acc = tl.dot(xo, tl.trans(tl.reshape(w_lo, (BLOCK_N, BLOCK_K // 2))), acc)
        else:
            w = tl.reshape(tl.join(w_hi, w_lo), (BLOCK_N, BLOCK_K))  # [row, g, byte, nibble] -> [row, k]
            x = tl.load(x_base + k0, mask=m_ok[:, None], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
    mask = m_ok[:, None] & n_ok[None, :]
    if FIXUP:  # partials in part [SPLIT_K, M, N]; the last of the tile's programs sums them in split order into out
        part = part_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial stored before the ticket's release
        tile = pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            tl.debug_barrier()
            total = tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                total += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(ticket_ptr + tile, 0)  # the next call starts from zero (graph replays too)
    else:
        # split-K: split pid_k's partial goes to its own [M, N] slice (stride_os; 0 when atomics add into one)
        out = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=mask)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def config(m: int, n: int, k: int, num_sms: int = 132, block_n: int | None = None, waves: float = 2.0,
           block_k: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) for an [m, k] x [n, k].T product: enough programs to fill the GPU about
    `waves` times over, split-K only when the N tiles alone cannot (each split keeps >= 2 K tiles). 64 output
    columns a program, 32 for narrow shards (k/v): the fastest tilings at every 7B/8B shard shape on the H200
    (bench/results/nf4_bench.json)."""
    block_n = block_n or (32 if n <= 512 else 64)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_k = block_k or (128 if k % 128 == 0 else 64)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = 1
    while tiles * split < waves * num_sms and k // block_k >= 4 * split:
        split *= 2
    return block_m, block_n, block_k, split


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, out: torch.Tensor | None = None,
               cfg: tuple[int, int, int, int] | None = None, lookup: int | None = None,
               num_stages: int | None = None, num_warps: int = 4, ordered: bool = True,
               fixup: bool | None = None, xsplit: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, rows contiguous) @ dequant(W [n, K]).T -> [M, n] in x's dtype, written into `out` when
    given (it may be a column slice of a wider tensor: its rows are strided, its columns contiguous). `ordered`:
    split-K partials summed in a fixed order (bit-reproducible); False adds them by atomics (the A/B baseline).
    `fixup` (default FIXUP): the ordered sum inside the kernel, by its last program per tile (module docstring).
    `xsplit` (default XSPLIT): x's even and odd columns into two dots instead of one interleaved weight tile."""
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
    lookup = LOOKUP if lookup is None else lookup
    num_stages = num_stages or (3 if bm == 16 and bk <= 128 else NUM_STAGES)
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    levels = nf4_levels(x.device)
    fixup = (FIXUP if fixup is None else fixup) and ordered and split > 1 and grid[0] * grid[2] <= COUNTERS
    part = tickets = None
    if split == 1 or fixup:
        dst, stride_os = out, 0
        if fixup:
            part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
            tickets = nf4_tickets(x.device)
    elif ordered:
        dst = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        stride_os = dst.stride(0)
    else:
        dst, stride_os = torch.zeros((m, n), dtype=torch.float32, device=x.device), 0
    _nf4_gemm_kernel[grid](x, packed, absmax, dst, levels, m, n, k, x.stride(0), dst.stride(-2), stride_os,
                           part if fixup else dst, tickets if fixup else levels,
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, ATOMIC=split > 1 and not ordered,
                           LOOKUP=lookup, FIXUP=fixup, XSPLIT=XSPLIT if xsplit is None else xsplit,
                           num_warps=num_warps, num_stages=num_stages)
    if split > 1 and not fixup:
        out.copy_(dst.sum(0) if ordered else dst)
    return out


_SMS: dict = {}
_PER_DEVICE: dict = {}


def _per_device(name: str, device, make) -> torch.Tensor:
    """One tensor per (name, device), made by make(device) at the first call."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if (name, device) not in _PER_DEVICE:
        _PER_DEVICE[name, device] = make(device)
    return _PER_DEVICE[name, device]


def nf4_levels(device: torch.device) -> torch.Tensor:
    """The 16 NF4 levels as an fp32 tensor on `device`, made at the first call (a host-to-device copy: make it before
    any CUDA-graph capture, as vllm_internals.install_nf4_gemm does)."""
    return _per_device("levels", device, lambda d: torch.tensor(NF4, dtype=torch.float32, device=d))


def nf4_tickets(device: torch.device) -> torch.Tensor:
    """`fixup`'s per-tile counters on `device` (int32 zeros; every call leaves them zero), made at the first call:
    make them before any CUDA-graph capture, as nf4_levels. Shared by the GEMMs of one stream, which run one after
    another."""
    return _per_device("tickets", device, lambda d: torch.zeros(COUNTERS, dtype=torch.int32, device=d))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]
