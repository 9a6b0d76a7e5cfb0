"""Planner check on the GPU (issue 4): run configs across shape, length, group size, rank, graphs and budget;
compare nvidia-smi's peak (sampled every 0.2 s) with the plan's predicted peak.

    python bench/planner.py OUT_DIR [NAME ...]       # on the device, after staging; writes OUT_DIR/planner.json
    python bench/planner.py --predict                 # here: the plans only (no GPU needed)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.smi import watched  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402

BASE = "bench/recipes/toy-digits-1.5b-vllm.yaml"
# data.max_prompt_length = the longest prompt of the data (30 tokens with the chat template), as users should set it
FREE = ["rollout.weight_format=", "rollout.kv_release=", "checkpoint.save_final=false", "train.max_steps=6",
        "data.max_prompt_length=30"]
CONFIGS = {
    "seed-1.5b-7gb": ["budget.vram_gb=7", "grpo.max_completion_length=256", "train.generation_batch_size=8"],
    "0.5b-6gb-16x512": ["model.shape=qwen2.5-0.5b", "budget.vram_gb=6", "grpo.max_completion_length=512",
                        "train.generation_batch_size=16"],
    "1.5b-10gb-32x384-r32": ["budget.vram_gb=10", "grpo.max_completion_length=384", "train.generation_batch_size=32",
                             "lora.r=32", "lora.lora_alpha=64"],
    "1.5b-8gb-eager": ["budget.vram_gb=8", "grpo.max_completion_length=128", "train.generation_batch_size=8",
                       "rollout.enforce_eager=true", "train.max_steps=3"],
    "0.5b-hf-6gb-32x256": ["model.shape=qwen2.5-0.5b", "rollout.engine=hf", "budget.vram_gb=6",
                           "grpo.max_completion_length=256", "train.generation_batch_size=32"],
    "1.5b-12gb-16x1024-kvrelease": ["budget.vram_gb=12", "grpo.max_completion_length=1024",
                                    "train.generation_batch_size=16", "rollout.kv_release=true", "train.max_steps=4"],
    "1.5b-20gb-64x512": ["budget.vram_gb=20", "grpo.max_completion_length=512", "train.generation_batch_size=64",
                         "train.max_steps=4"],
}


def overrides(name: str) -> list[str]:
    import os

    return FREE + CONFIGS[name] + os.environ.get("GPU_SETS", "").split()


def predict() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from trainer.plan import Device, make_plan
    from trainer.policy import read_config
    from trainer.recipe import load_recipe

    dev = Device("cuda", "NVIDIA H100 80GB HBM3", 85_000_000_000, 84_000_000_000, True)
    for name in CONFIGS:
        r = load_recipe(BASE, overrides(name))
        p = make_plan(read_config(r.model), r, dev)
        print(f"{name:24s} peak {p.peak_bytes / 1e9:6.2f} GB  {p.phase_peaks}  fmt {p.weight_format} "
              f"rel {p.kv_release} mbt {p.micro_batch_tokens} gc {p.gradient_checkpointing}")


def run(out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        run_dir = Path("/root/runs") / f"plan-{name}"
        smi = out / f"smi_{name}.json"
        cmd = [sys.executable, "-m", "trainer.cli", BASE, "--output-dir", str(run_dir), "--overwrite"]
        for o in overrides(name):
            cmd += ["--set", o]
        watched(smi, out / f"{name}.log", cmd)
        try:
            plan = json.loads((run_dir / "plan.json").read_text())
            s = json.loads(smi.read_text())
            m = read_metrics(run_dir)
            row = {"name": name, "budget_gb": plan["budget_bytes"] / 1e9, "predicted_peak_gb": plan["peak_bytes"] / 1e9,
                   "measured_peak_gb": s["peak_gb"], "rc": s["rc"], "predicted_phases_gb":
                   {k: v / 1e9 for k, v in plan["phase_peaks"].items()}, "components_gb":
                   {k: v / 1e9 for k, v in plan["components"].items()},
                   "knobs": {k: plan[k] for k in ("weight_format", "kv_release", "micro_batch_tokens",
                                                  "gradient_checkpointing", "kv_cache_memory_bytes", "max_num_seqs",
                                                  "max_num_batched_tokens", "cudagraph_capture_sizes", "enforce_eager",
                                                  "token_chunk", "vocab_chunk", "rollout_engine")},
                   "measured_phase_peaks_gb": {k: max(x.get(k, 0) for x in m) for k in m[-1] if k.startswith("peak_")},
                   "step_s_median": sorted(x["time_step_s"] for x in m[1:])[len(m[1:]) // 2] if len(m) > 1 else None,
                   "overrides": overrides(name)}
            row["error_frac"] = row["measured_peak_gb"] / row["predicted_peak_gb"] - 1
        except Exception as e:  # keep going: one failed config must not hide the others
            row = {"name": name, "error": repr(e)[:300], "overrides": overrides(name)}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}), flush=True)
        (out / "planner_rows.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--predict":
        predict()
    else:
        run(Path(sys.argv[1]), sys.argv[2:] or list(CONFIGS))
