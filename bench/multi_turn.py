"""Multi-turn on the GPU (issue 28): bench/recipes/multi-turn-1.5b.yaml (three-turn conversations with an
environment, vLLM, 1.5B shape) under nvidia-smi; the plan's peak against the measured one, and the step time.

    python bench/multi_turn.py OUT_DIR [--set key=value ...]   # on the device: OUT_DIR/multi_turn.json
{"device", "command", "budget_gb", "predicted_peak_gb", "measured_peak_gb", "error_frac", "within_budget",
 "predicted_step_s", "step_s", "step_s_steady" (median of steps 3 on: 1-2 compile), "turns_mean", "engine_calls",
 "model_token_frac", "ends" (per step), "phase_s" (per step), "rc"}
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = "bench/recipes/multi-turn-1.5b.yaml"


def main(out: Path, sets: list[str]) -> None:
    from bench.smi import watched
    from trainer.metrics import read_metrics

    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path("/root/runs/multi_turn") if Path("/root").is_dir() else out / "run"
    smi = out / "smi_multi_turn.json"
    cmd = [sys.executable, "-m", "trainer.cli", RECIPE, "--output-dir", str(run_dir), "--overwrite", *sets]
    rc = watched(smi, out / "multi_turn.log", cmd)
    plan = json.loads((run_dir / "plan.json").read_text())
    peak = json.loads(smi.read_text())["peak_gb"]
    m = read_metrics(run_dir)
    steps = [x["time_step_s"] for x in m]
    row = {"device": plan["device_name"], "command": "python bench/multi_turn.py OUT_DIR " + " ".join(sets), "rc": rc,
           "budget_gb": plan["budget_bytes"] / 1e9 if plan.get("budget_bytes") else None,
           "predicted_peak_gb": plan["peak_bytes"] / 1e9, "measured_peak_gb": peak,
           "error_frac": peak / (plan["peak_bytes"] / 1e9) - 1,
           "within_budget": plan.get("budget_bytes") is None or peak <= plan["budget_bytes"] / 1e9,
           "predicted_step_s": plan.get("predicted_step_s"), "step_s": steps,
           "step_s_steady": statistics.median(steps[2:]) if len(steps) >= 3 else None,
           "turns_mean": [x.get("multi_turn/turns_mean") for x in m],
           "engine_calls": [x.get("multi_turn/engine_calls") for x in m],
           "model_token_frac": [x.get("multi_turn/model_token_frac") for x in m],
           "ends": [{k.split("/")[-1]: v for k, v in x.items() if k.startswith("multi_turn/ends/") and v} for x in m],
           "phase_s": [{k[5:-2]: round(v, 3) for k, v in x.items() if k.startswith("time_") and k.endswith("_s")}
                       for x in m],
           "knobs": {k: plan.get(k) for k in ("weight_format", "kv_release", "micro_batch_tokens",
                                              "gradient_checkpointing", "max_num_seqs", "max_model_len")}}
    (out / "multi_turn.json").write_text(json.dumps(row, indent=1))
    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
