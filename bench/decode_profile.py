"""Where a decode step goes (issue 15): the colocated vLLM engine exactly as `train` builds it (bench/peers/ours.yaml,
Qwen2.5-1.5B shape, LoRA r16 all-linear registered and synced, per-request seeds), for the shared nf4 base, the
shared nf4 base with the fused nf4 GEMM (trainer/kernels/nf4_gemm.py) and the bf16 mirror, at batch 8 and 64.

    python bench/decode_profile.py OUT_DIR [VARIANT ...]     # on the device after staging; default: all variants
Per variant (each in its own process): wall ms per decode step (B x 256 tokens, ignore_eos, median of 3), the same
without per-request seeds, and a torch.profiler pass over B x 64 tokens: GPU kernel time per step by kernel family,
GPU busy fraction (union of kernel intervals over the wall time) and the top kernels and CPU ops. The nf4 variants
also time the 4-bit matmul alone at the model's shard shapes (bitsandbytes' path as vLLM calls it vs the fused
kernel, M = 1..256) after checking the kernel against dequantize + matmul. Writes OUT_DIR/decode_profile.json.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {  # name: recipe overrides (bench/peers/ours.yaml at the users' max_prompt_length: 128)
    "shared_nf4": ["rollout.weight_format=shared_nf4", "rollout.nf4_gemm=bitsandbytes"],
    "shared_nf4_fused": ["rollout.weight_format=shared_nf4", "rollout.nf4_gemm=fused"],
    "bf16_mirror": ["rollout.weight_format=bf16_mirror"],
}
BATCHES = (8, 64)
TOKENS, PROFILE_TOKENS = 256, 64
FAMILIES = [  # (family, substrings of kernel names), first match wins
    ("nf4_fused", ("_nf4_gemm_kernel",)),
    ("bnb_gemm_4bit", ("gemm_4bit", "kgemm_4bit", "gemm_4bit_inference")),
    ("bnb_dequant", ("kDequantize", "dequantize")),
    ("lora", ("lora", "sgmv", "bgmv", "punica")),
    ("attention", ("flash", "fmha", "attn", "attention")),
    ("gemm_bf16", ("nvjet", "gemm", "cutlass", "sm90_xmma", "Kernel2", "cublas")),
    ("norm", ("rms_norm", "rmsnorm", "layernorm")),
    ("rotary", ("rotary",)),
    ("activation", ("act_and_mul", "silu", "gelu")),
    ("sampler", ("softmax", "exponential", "argmax", "topk", "sort", "distribution", "log_softmax", "random")),
    ("memcpy_memset", ("Memcpy", "Memset", "memcpy", "memset")),
    ("elementwise_reduce", ("elementwise", "reduce", "copy", "fill", "index", "gather", "scatter", "cat")),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return fam
    return "other"


def build(variant: str, batch: int):
    """The engine and policy as trainer.grpo.run builds them, for a recipe whose step has `batch` completions."""
    from trainer.plan import Device, make_plan
    from trainer.policy import load_policy, read_config, resolve_model_path
    from trainer.recipe import load_recipe
    from trainer.rollout import make_engine

    sets = VARIANTS[variant] + [f"train.generation_batch_size={batch}", "data.max_prompt_length=128",
                                f"grpo.max_completion_length={TOKENS}"]
    recipe = load_recipe("bench/peers/ours.yaml", sets)
    plan = make_plan(read_config(recipe.model), recipe, Device.detect())
    engine = make_engine(recipe, plan, resolve_model_path(recipe.model))
    policy = load_policy(recipe, plan, engine)
    engine.attach(policy)
    engine.sync(policy)
    return recipe, plan, engine, policy


def timed_generate(engine, prompts, n, tokens, seeded=True):
    import torch

    from trainer.types import Sampling

    s = Sampling(n=n, max_tokens=tokens, seed=1234 if seeded else None, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    gens = engine.generate(prompts, s)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    assert all(len(c) == tokens for c in gens.completion_ids)
    return dt


def profile_generate(engine, prompts, n, tokens):
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from trainer.types import Sampling

    s = Sampling(n=n, max_tokens=tokens, seed=99, ignore_eos=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        engine.generate(prompts, s)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    fam: dict[str, float] = {}
    names: dict[str, float] = {}
    spans = []
    for e in events:
        us = e.time_range.end - e.time_range.start
        fam[family(e.name)] = fam.get(family(e.name), 0.0) + us
        names[e.name[:90]] = names.get(e.name[:90], 0.0) + us
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for a, b in spans:
        if cur_e is None or a > cur_e:
            busy += (cur_e - cur_s) if cur_e is not None else 0.0
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    busy += (cur_e - cur_s) if cur_e is not None else 0.0
    avg = prof.key_averages()
    cpu_top = sorted(((a.key[:90], a.self_cpu_time_total / 1e3, a.count) for a in avg), key=lambda x: -x[1])[:25]
    per = lambda us: round(us / 1e3 / tokens, 4)  # noqa: E731  ms per decode step
    return {"wall_ms_per_step": round(wall * 1e3 / tokens, 4), "gpu_kernel_ms_per_step": per(sum(fam.values())),
            "gpu_busy_ms_per_step": per(busy), "gpu_busy_fraction": round(busy / 1e6 / wall, 3),
            "kernels_per_step": round(len(events) / tokens, 1),
            "families_ms_per_step": {k: per(v) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": [(k, per(v)) for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:25]],
            "top_cpu_ops_self_ms_total": [(k, round(ms, 2), c) for k, ms, c in cpu_top]}


def gemm_bench(vmodel) -> list[dict]:
    """The 4-bit matmul alone at this model's shard shapes: bitsandbytes as vLLM calls it vs the fused kernel."""
    import torch
    import triton.testing
    from bitsandbytes import matmul_4bit
    from bitsandbytes.functional import dequantize_4bit

    from trainer.kernels.nf4_gemm import config, nf4_matmul
    from trainer.rollout import vllm_internals as vi

    shapes = {}
    for name, sh in vi.packed_shards(vmodel).items():
        st = sh.quant_state
        shapes.setdefault((st.shape[0], st.shape[1]), (name, sh))
    rows = []
    for (n, k), (name, sh) in sorted(shapes.items()):
        st = sh.quant_state
        w = dequantize_4bit(sh.data, st)
        for m in (1, 8, 16, 32, 64, 128, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ w.float().T)
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            nf4_matmul(x, sh.data.view(-1), st.absmax, n, out=out)
            rel = float((out.float() - ref).norm() / ref.norm())
            with torch.no_grad():
                t_bnb = triton.testing.do_bench(lambda: matmul_4bit(x, sh.data.t(), st), warmup=25, rep=100,
                                                return_mode="median")
                t_deq = triton.testing.do_bench(lambda: x @ dequantize_4bit(sh.data, st).T, warmup=25, rep=100,
                                                return_mode="median")
                t_bf16 = triton.testing.do_bench(lambda: x @ w.T, warmup=25, rep=100, return_mode="median")
            alts = {}
            for bn in (32, 64, 128):
                for waves in (1.0, 2.0, 4.0):
                    cfg = config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count, bn, waves)
                    key = "x".join(map(str, cfg))
                    if key not in alts:
                        try:
                            alts[key] = triton.testing.do_bench(
                                lambda: nf4_matmul(x, sh.data.view(-1), st.absmax, n, cfg=cfg), warmup=25,
                                rep=100, return_mode="median")
                        except Exception as e:  # a config past the GPU's shared memory
                            print("config", key, "failed:", str(e)[:120], flush=True)
            t_def = triton.testing.do_bench(lambda: nf4_matmul(x, sh.data.view(-1), st.absmax, n),
                                            warmup=25, rep=100, return_mode="median")
            nbytes = n * k // 2 + n * k // 16 + m * k * 2 + m * n * 2
            rows.append(dict(module=name, n=n, k=k, m=m, rel_err=rel, bnb_us=round(t_bnb * 1e3, 2),
                             dequant_matmul_us=round(t_deq * 1e3, 2), bf16_us=round(t_bf16 * 1e3, 2),
                             fused_default_us=round(t_def * 1e3, 2), default_cfg="x".join(map(str, config(m, n, k))),
                             fused_alternatives_us={c: round(t * 1e3, 2) for c, t in alts.items()},
                             fused_gbps=round(nbytes / (t_def * 1e-3) / 1e9, 1)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_variant(variant: str, out: Path) -> None:
    import torch

    from trainer.data import load_prompts

    res: dict = {"variant": variant, "device": torch.cuda.get_device_name()}
    recipe, plan, engine, policy = build(variant, max(BATCHES))
    res["plan"] = {k: getattr(plan, k) for k in ("weight_format", "nf4_gemm_max_rows", "cudagraph_capture_sizes",
                                                  "max_num_seqs", "kv_cache_memory_bytes")
                   if hasattr(plan, k)}
    res["engine_startup_s"] = engine.startup_s
    prompts = load_prompts(recipe.data, policy.tokenizer, Path(recipe.base_dir)).prompt_ids
    g = recipe.grpo.num_generations
    timed_generate(engine, prompts[:1], g, 16)  # warm-up
    for b in BATCHES:
        p = prompts[:b // g]
        seeded = [timed_generate(engine, p, g, TOKENS) for _ in range(3)]
        unseeded = [timed_generate(engine, p, g, TOKENS, seeded=False) for _ in range(2)]
        res[f"batch{b}"] = {"decode_ms_per_step": round(statistics.median(seeded) * 1e3 / TOKENS, 3),
                            "decode_ms_per_step_runs": [round(x * 1e3 / TOKENS, 3) for x in seeded],
                            "decode_ms_per_step_unseeded": round(statistics.median(unseeded) * 1e3 / TOKENS, 3),
                            "profile": profile_generate(engine, p, g, PROFILE_TOKENS)}
        print(variant, b, json.dumps({k: v for k, v in res[f"batch{b}"].items() if k != "profile"}), flush=True)
        print(variant, b, json.dumps(res[f"batch{b}"]["profile"]["families_ms_per_step"]), flush=True)
    if variant.startswith("shared_nf4") and os.environ.get("GEMM_BENCH", "1") == "1":
        res["gemm_bench"] = gemm_bench(engine.vmodel)
    if os.environ.get("TRAIN_PROBE") == variant:  # the train phase's micro-batch cost on this very policy
        from bench import train_probe

        engine.release()
        log = lambda r: print("train", json.dumps(r), flush=True)  # noqa: E731
        res["train_memory"] = train_probe.memory(policy, plan, log=log)
        (out / f"{variant}.json").write_text(json.dumps(res, indent=1))
        res["train_speed"] = train_probe.speed(policy, plan, log=log)
    (out / f"{variant}.json").write_text(json.dumps(res, indent=1))


def main(out: Path, variants: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GEMM_BENCH": "1"}
    for v in variants:
        t = time.time()
        rc = subprocess.call([sys.executable, __file__, "--variant", v, str(out)], env=env)
        print(f"{v}: rc {rc}, {time.time() - t:.0f} s", flush=True)
        env["GEMM_BENCH"] = "0"  # the matmul table once
    report = {"command": "python bench/decode_profile.py OUT_DIR " + " ".join(variants), "variants": {}}
    for v in variants:
        f = out / f"{v}.json"
        if f.exists():
            report["variants"][v] = json.loads(f.read_text())
            report["device"] = report["variants"][v]["device"]
    (out / "decode_profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--variant":
        run_variant(sys.argv[2], Path(sys.argv[3]))
    else:
        main(Path(sys.argv[1]), sys.argv[2:] or list(VARIANTS))
