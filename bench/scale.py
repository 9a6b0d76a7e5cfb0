"""7-8B models inside the budget on one GPU (issue 23): each row is one `train bench/recipes/scale.yaml` process under
bench/smi.py (nvidia-smi every 0.15 s), every memory knob left to the planner; the row records the plan against what
the device showed, step time by phase, the logprob gap and the start-up.

    python bench/scale.py --plans                   # here (no GPU): each row's plan on an H200-sized device
    python bench/scale.py --build                   # on the device: build the random-init shapes (own process each)
    python bench/scale.py OUT_DIR [ROW ...]         # on the device: run the rows, OUT_DIR/scale.json after each
    python bench/scale.py --collect OUT_DIR         # re-read the run dirs (a row cut off keeps its finished steps)
Rows: qwen-7b-15gb (Qwen2.5-7B shape, 8 x 1024 tokens at 15 GB), llama-8b-24gb (Llama-3.1-8B shape, 16 x 2048 at
24 GB), llama-8b-40gb (the same at 40 GB: the planner's fast choice there). LoRA r16 on every linear layer, G = 8.
The user recipes for a 24 GB card, as shipped (recipes/gsm8k-qwen2.5-7b.yaml, gsm8k-llama3.1-8b.yaml: 4 x 8 x 512
tokens, their eval at the end included), with the random-init shape for the hub model and GSM8K's local sample
(tests/data) for the hub dataset: qwen-7b-gsm8k-24gb, llama-8b-gsm8k-24gb.
Each row trains STEPS steps (5); the first compiles and samples every completion to its full length; step_s and
phase_s are the medians of steps 2..5 (the last step is profiled where PROFILE names the row: TRAINER_PROFILE_STEP, its
torch.profiler tables kept beside the results). startup_s: launch to the end of step 1. The shapes are built before the
rows (--build), so no row's peak holds a model being built.
OUT_DIR/scale.json: {"device", "runs": [{"name", "shape", "completions", "completion_tokens", "budget_gb",
"predicted_peak_gb", "measured_peak_gb", "steps", "step_s", "phase_s", "gap_mean", "gap_p99", "startup_s",
"weight_format", "adjustments", "command", ...}]}; each run dir also keeps memory.jsonl (the sampler's timeline).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = "bench/recipes/scale.yaml"
STEPS = int(os.environ.get("STEPS", "5"))
RUNS = Path(os.environ.get("RUNS", "/root/runs"))
PROFILE = os.environ.get("PROFILE", "")  # a row whose last step is profiled (torch.profiler: slow over a long step)
ROWS = {
    "qwen-7b-15gb": dict(shape="qwen2.5-7b", completions=8, completion_tokens=1024, budget_gb=15),
    "llama-8b-24gb": dict(shape="llama-3.1-8b", completions=16, completion_tokens=2048, budget_gb=24),
    "llama-8b-40gb": dict(shape="llama-3.1-8b", completions=16, completion_tokens=2048, budget_gb=40),
    "qwen-7b-gsm8k-24gb": dict(shape="qwen2.5-7b", completions=32, completion_tokens=512, budget_gb=24,
                               recipe="recipes/gsm8k-qwen2.5-7b.yaml"),
    "llama-8b-gsm8k-24gb": dict(shape="llama-3.1-8b", completions=32, completion_tokens=512, budget_gb=24,
                                recipe="recipes/gsm8k-llama3.1-8b.yaml"),
}
GSM8K = ROOT / "tests" / "data" / "gsm8k_sample.parquet"  # the hub dataset's format, local
PHASES = ("kv", "rollout", "reward", "recompute", "train", "optimizer", "sync")
H200_TOTAL = 150_754_820_096


def overrides(name: str) -> list[str]:
    r = ROWS[name]
    if "recipe" in r:  # a user recipe as shipped: only the hub's model and data stood in for, and the run's length
        return ["model.name=", f"model.shape={r['shape']}", f"data.dataset={GSM8K}", f"eval.dataset={GSM8K}",
                "logging.wandb=false", f"train.max_steps={STEPS}"]
    return [f"model.shape={r['shape']}", f"train.generation_batch_size={r['completions']}",
            f"grpo.max_completion_length={r['completion_tokens']}", f"budget.vram_gb={r['budget_gb']}",
            f"train.max_steps={STEPS}"]


def command(name: str) -> list[str]:
    sets = [x for o in overrides(name) for x in ("--set", o)]
    return [sys.executable, "-m", "trainer.cli", ROWS[name].get("recipe", RECIPE), "--output-dir", str(RUNS / name),
            "--overwrite", *sets]


def plans() -> None:
    """Each row's plan on an H200-sized device, the planner alone."""
    from trainer.plan import Device, make_plan
    from trainer.policy import read_config
    from trainer.recipe import load_recipe

    dev = Device("cuda", "NVIDIA H200", H200_TOTAL, H200_TOTAL - 10**9, True, host_free_bytes=120 * 10**9,
                 capability=(9, 0))
    for name, row in ROWS.items():  # recipe rows: planned for data.max_prompt_length (the run: its longest prompt)
        r = load_recipe(ROOT / row.get("recipe", RECIPE), overrides(name))
        p = make_plan(read_config(r.model), r, dev, max_prompt_tokens=None if "recipe" in row else 24)
        print(json.dumps({"name": name, "predicted_peak_gb": round(p.peak_bytes / 1e9, 3),
                          "phases_gb": {k: round(v / 1e9, 2) for k, v in p.phase_peaks.items()},
                          "weight_format": p.weight_format, "gradient_checkpointing": p.gradient_checkpointing,
                          "kv_release": p.kv_release, "micro_batch_tokens": p.micro_batch_tokens,
                          "predicted_step_s": p.predicted_step_s}))


def build() -> None:
    """Build each shape once, in its own process (its GPU memory goes with it), before any watched row."""
    from trainer.shapes import model_dir_apart

    for shape in sorted({r["shape"] for r in ROWS.values()}):
        model_dir_apart(shape)


def collect(name: str, out: Path) -> dict:
    from trainer.metrics import read_metrics
    from trainer.plan import run_plan

    run_dir, smi = RUNS / name, out / f"{name}.smi.json"
    s = json.loads(smi.read_text()) if smi.exists() else {}
    plan = run_plan(run_dir) or {}
    m = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    timed = m[1:5] or m  # steps 2..5: past the first step's compiling, before the profiled step

    def med(key: str):
        vals = [x[key] for x in timed if x.get(key) is not None]
        return round(statistics.median(vals), 4) if vals else None

    row = ROWS[name]
    return {"name": name, "shape": row["shape"], "completions": row["completions"],
            "completion_tokens": row["completion_tokens"], "budget_gb": row["budget_gb"],
            "predicted_peak_gb": round(plan["peak_bytes"] / 1e9, 3) if plan else None,
            "measured_peak_gb": s.get("peak_gb"), "rc": s.get("rc"), "steps": len(m),
            "step_s": med("time_step_s"), "phase_s": {p: med(f"time_{p}_s") for p in PHASES},
            "step_s_each": [round(x["time_step_s"], 2) for x in m],
            "gap_mean": med("logp_gap_mean"), "gap_p99": med("logp_gap_p99"),
            "gap_mean_each": [x.get("logp_gap_mean") for x in m],
            "startup_s": round(m[0]["unix_time"] - s["t0_unix"], 1) if m and s else None,
            "weight_format": plan.get("weight_format"),
            "knobs": {k: plan.get(k) for k in ("gradient_checkpointing", "activation_offload", "micro_batch_tokens",
                                               "kv_release", "max_num_seqs", "kv_cache_memory_bytes",
                                               "cudagraph_capture_sizes", "compile_layers")},
            "predicted_phases_gb": {k: round(v / 1e9, 3) for k, v in plan.get("phase_peaks", {}).items()},
            "components_gb": {k: round(v / 1e9, 3) for k, v in plan.get("components", {}).items()},
            "predicted_step_s": plan.get("predicted_step_s"),
            "measured_phase_peaks_gb": [{k[5:-3]: round(v, 3) for k, v in x.items()
                                         if k.startswith("peak_used_")} for x in m],
            "outside_torch_gb": [x.get("budget/outside_torch_gb") for x in m],
            "cap_gb": [x.get("budget/cap_gb") for x in m],
            "adjustments": [a for x in m for a in x.get("budget/changes", [])],
            "retries": sum(x.get("budget/retries", 0) for x in m),
            "wall_s": s.get("wall_s"), "command": " ".join(["train", *command(name)[3:]])}


def write(out: Path, rows: list[dict]) -> None:
    path = out / "scale.json"
    old = json.loads(path.read_text())["runs"] if path.exists() else []
    names = {r["name"] for r in rows}
    device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.strip().splitlines()[:1] if shutil.which("nvidia-smi") else []
    path.write_text(json.dumps({"device": device[0] if device else "unknown",
                                "runs": [r for r in old if r["name"] not in names] + rows}, indent=2))


def run(out: Path, names: list[str]) -> None:
    from bench.smi import watched

    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        env = dict(os.environ)
        if name == PROFILE:
            env["TRAINER_PROFILE_STEP"] = str(STEPS)
        rc = watched(out / f"{name}.smi.json", out / f"{name}.log", command(name), env)
        for f in ("memory.jsonl", "plan.json", "summary.json", "engine.json", f"profile_step{STEPS}.txt"):
            if (RUNS / name / f).exists():
                shutil.copy(RUNS / name / f, out / f"{name}.{f}")
        row = collect(name, out)
        write(out, [row])
        print(json.dumps({k: row[k] for k in ("name", "rc", "budget_gb", "predicted_peak_gb", "measured_peak_gb",
                                              "steps", "step_s", "gap_mean", "startup_s", "weight_format")}),
              f"rc={rc}", flush=True)


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--plans"]:
        plans()
    elif args[:1] == ["--build"]:
        build()
    elif args[:1] == ["--collect"]:
        out = Path(args[1])
        write(out, [collect(n, out) for n in (args[2:] or ROWS) if (RUNS / n).exists()])
    elif args:
        run(Path(args[0]), args[1:] or list(ROWS))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
