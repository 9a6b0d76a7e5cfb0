"""A/B of the decoder layers' torch.compile shape handling (trainer/policy.py COMPILE_DYNAMIC), one sitting, one GPU.

    python bench/compile_ab.py OUT [STEPS]     # on the device; default 10 steps a run

Config A of the side-by-side (bench/peers/ours.yaml: 1.5B shape, 8 x 256) at the fast budget (6.6 GB: all 8 sequences
in one micro-batch) and the small one (3.3 GB, issue 26's small budget for A: short micro-batches), each trained with TRAINER_COMPILE_DYNAMIC
unset (torch's automatic dynamic shapes: recompiles as lengths change) and =1 (dynamic from the first compile),
the two variants alternated so neither always runs on a warmer machine. Each run under bench/smi.py; per step the
step, rollout and train seconds from metrics.jsonl. OUT/compile_ab.json:
{"device", "steps", "runs": [{"config", "budget_gb", "variant", "rc", "peak_gb", "step_s": [...], "train_s": [...],
"first_two_s", "steady_step_s" (median of steps 3+), "steady_train_s"}], "by_config": {config: {"first_two_s_saved",
"steady_step_ratio" (dynamic / default)}}}. Keep dynamic as the default only where it saves time in the first steps
and its steady step is not slower (ratio <= 1.02).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# 2.9 GB was refused on the H200 (2026-12-03, rc 2): the planner now asks at least 3.11 GB for config A
CONFIGS = {"A-fast": 6.6, "A-small": 3.3}
VARIANTS = {"default": None, "dynamic": "1"}


def run_one(out: Path, config: str, budget: float, variant: str, steps: int) -> dict:
    from bench.smi import watched
    from trainer.metrics import read_metrics

    name = f"{config}_{variant}"
    run_dir = Path(os.environ.get("RUNS", "/root/runs")) / f"compile_ab_{name}"
    env = {k: v for k, v in os.environ.items() if k != "TRAINER_COMPILE_DYNAMIC"}
    if VARIANTS[variant]:
        env["TRAINER_COMPILE_DYNAMIC"] = VARIANTS[variant]
    cmd = [sys.executable, "-m", "trainer.cli", "bench/peers/ours.yaml", "--output-dir", str(run_dir), "--overwrite",
           "--set", f"train.max_steps={steps}", "--set", f"budget.vram_gb={budget}"]
    rc = watched(out / f"{name}.smi.json", out / f"{name}.log", cmd, {**env, "SMI_GPUS": "0"})
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    smi = json.loads((out / f"{name}.smi.json").read_text()) if (out / f"{name}.smi.json").exists() else {}
    step = [r["time_step_s"] for r in rows]
    train = [r["time_step_s"] - r.get("time_rollout_s", 0.0) for r in rows]
    return {"config": config, "budget_gb": budget, "variant": variant, "rc": rc, "command": " ".join(cmd[1:]),
            "peak_gb": smi.get("peak_gb"), "step_s": step, "train_s": train,
            "first_two_s": sum(step[:2]) if len(step) >= 2 else None,
            "steady_step_s": statistics.median(step[2:]) if len(step) > 2 else None,
            "steady_train_s": statistics.median(train[2:]) if len(train) > 2 else None}


def compare(runs: list[dict]) -> dict:
    by: dict = {}
    for config in dict.fromkeys(r["config"] for r in runs):
        got = {r["variant"]: r for r in runs if r["config"] == config and r["steady_step_s"]}
        if set(got) == set(VARIANTS):
            d, x = got["default"], got["dynamic"]
            by[config] = {"first_two_s_saved": round(d["first_two_s"] - x["first_two_s"], 2),
                          "steady_step_ratio": round(x["steady_step_s"] / d["steady_step_s"], 3),
                          "steady_train_ratio": round(x["steady_train_s"] / d["steady_train_s"], 3)}
    return by


def main(out: Path, steps: int) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, (config, budget) in enumerate(CONFIGS.items()):
        order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            r = run_one(out, config, budget, variant, steps)
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("step_s", "train_s", "command")}), flush=True)
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "steps": steps,
           "command": f"python bench/compile_ab.py OUT {steps}", "runs": runs, "by_config": compare(runs)}
    (out / "compile_ab.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["by_config"]), flush=True)
    return res


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10)
