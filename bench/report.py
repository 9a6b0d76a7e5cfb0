"""Turn GPU run directories into the result files that checks read (bench/results/*.json, see DESIGN.md).

    python bench/report.py hf   RUN_DIR SMI_JSON OUT.json     # issue 2: hf_gpu.json
    python bench/report.py sync RUN_DIR SMI_JSON GPU_TESTS_JSON OUT.json   # issue 3: sync.json
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from trainer.metrics import read_metrics


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def window_peak(m, lo, hi):
    return max(x["peak_memory_gb"] for x in m if lo <= x["step"] <= hi)


def hf(run: Path, smi: dict, out: Path) -> dict:
    m = read_metrics(run)
    plan = json.loads((run / "plan.json").read_text())
    shape = json.loads((run / "recipe.json").read_text())["model"]["shape"]
    res = {"device": plan["device_name"], "model_shape": shape, "engine": "hf", "quantized": plan["quantized"],
           "steps": len(m), "step_s_median": statistics.median(x["time_step_s"] for x in m[1:]),
           "rollout_s_median": statistics.median(x["time_rollout_s"] for x in m[1:]),
           "peak_gb": smi["peak_gb"], "reward_first5": mean(x["reward_mean"] for x in m[:5]), "learning_rate": json.loads(
               (run / "recipe.json").read_text())["train"]["learning_rate"],
           "reward_last5": mean(x["reward_mean"] for x in m[-5:]), "rewards": [round(x["reward_mean"], 4) for x in m],
           "command": "python bench/smi.py smi_hf.json -- train bench/recipes/toy-digits-0.5b-hf.yaml"}
    out.write_text(json.dumps(res, indent=2))
    return res


def sync(run: Path, smi: dict, tests: dict, out: Path) -> dict:
    m = read_metrics(run)
    plan = json.loads((run / "plan.json").read_text())
    engine = json.loads((run / "engine.json").read_text())
    gaps = [x["logp_gap_mean"] for x in m]
    first, last = mean(gaps[:50]), mean(gaps[-50:])
    shape = json.loads((run / "recipe.json").read_text())["model"]["shape"]
    res = {"device": plan["device_name"], "model_shape": shape, "lora_rank": 16,
           "weight_format": plan["weight_format"], "kv_release": plan["kv_release"],
           "sync_ms_median": statistics.median(x["sync_ms"] for x in m),
           "base_copies": engine.get("base_copies"), "logp_gap_mean": mean(gaps),
           "logp_gap_max": max(x["logp_gap_max"] for x in m),
           "logp_gap_mean_last50_over_first50": last / first if first else None, "steps": len(m),
           "reward_first10": mean(x["reward_mean"] for x in m[:10]), "reward_last10": mean(x["reward_mean"] for x in m[-10:]),
           "peak_gb_steps_10_50": window_peak(m, 10, 50), "peak_gb_steps_150_200": window_peak(m, 150, 200),
           "step_s_median": statistics.median(x["time_step_s"] for x in m[1:]),
           "smi_peak_gb": smi["peak_gb"], "engine_startup_s": engine.get("startup_s"),
           "time_split_median_s": {k[5:-2]: statistics.median(x[k] for x in m[1:]) for k in m[-1] if k.startswith("time_")},
           "gpu_tests": tests,
           "command": "python bench/smi.py smi_sync.json -- train bench/recipes/toy-digits-1.5b-vllm.yaml"}
    res["peak_growth_frac"] = res["peak_gb_steps_150_200"] / res["peak_gb_steps_10_50"] - 1
    out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "hf":
        r = hf(Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()), Path(sys.argv[4]))
    else:
        r = sync(Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()),
                 json.loads(Path(sys.argv[4]).read_text()) if Path(sys.argv[4]).is_file() else {}, Path(sys.argv[5]))
    print(json.dumps({k: v for k, v in r.items() if not isinstance(v, (list, dict))}, indent=1))
