"""Fused LoRA-over-4-bit forward (trainer/fused_lora.py, `lora.fused: true`) against peft's own (`false`), same
sitting, one GPU, on the side-by-side benchmark's configs (bench/vs_peers.py), with Unsloth on config A run in the
same sitting as the reference for the fast point.

    python bench/fused_ab.py OUT_DIR      # on the device after staging (+ stage-unsloth.sh); writes OUT_DIR/fused_ab.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import vs_peers  # noqa: E402
from bench.peers import report  # noqa: E402

# (system, config, knob, fused); budgets as in the 2026-11-26 sitting (bench/results/vs_peers.json)
RUNS = [("ours_fast", "A", 6.6, True), ("ours_fast", "A", 6.6, False), ("unsloth", "A", 0.1, None),
        ("ours_small", "A", 3.0, True), ("ours_small", "A", 3.0, False),
        ("ours_small", "B", 4.3, True), ("ours_small", "B", 4.3, False)]


def main(out: Path) -> None:
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    model = subprocess.run([sys.executable, "-c", "from trainer.shapes import model_dir; print(model_dir('qwen2.5-1.5b'))"],
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    scale = vs_peers.util_scale("0")
    rows = {}
    for system, cfg, knob, fused in RUNS:
        knob = round(knob * scale, 4) if fused is None else knob
        name = f"{system}_{cfg}" + ("" if fused is None else ("_fused" if fused else "_peft"))
        cmd, extra = vs_peers.job_cmd(system, cfg, knob, model, raw, name)
        if fused is not None:
            cmd += ["--set", f"lora.fused={str(fused).lower()}"]
        env = {**os.environ, **extra, "SMI_GPUS": "0"}
        with open(raw / f"{name}.log", "w") as log:
            rc = subprocess.call([sys.executable, "bench/smi.py", str(raw / f"{name}.smi.json"), "--", *cmd],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        if fused is not None:
            report.collect_ours(vs_peers.RUNS / name, raw / f"{name}.result.json", system, f"budget.vram_gb={knob}")
        row = report._row(raw, name) or {"rc": rc}
        rows[name] = row
        print(name, rc, {k: row.get(k) for k in ("step_s_median", "peak_gb", "startup_s", "breakdown_s_median")},
              flush=True)
    res = {"device": subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                                    capture_output=True, text=True).stdout.strip(),
           "command": "python bench/fused_ab.py OUT_DIR", "util_scale_to_h100_bytes": scale, "runs": rows}
    for system, cfg in (("ours_fast", "A"), ("ours_small", "A"), ("ours_small", "B")):
        f, p = rows.get(f"{system}_{cfg}_fused", {}), rows.get(f"{system}_{cfg}_peft", {})
        if f.get("step_s_median") and p.get("step_s_median"):
            res[f"{system}_{cfg}"] = {
                "step_fused_over_peft": f["step_s_median"] / p["step_s_median"],
                "train_fused_over_peft": f["breakdown_s_median"]["train"] / p["breakdown_s_median"]["train"],
                "peak_gb_fused_peft": [f["peak_gb"], p["peak_gb"]]}
    u = rows.get("unsloth_A", {})
    if u.get("step_s_median"):
        for k in ("ours_fast_A_fused", "ours_fast_A_peft", "ours_small_A_fused"):
            if rows.get(k, {}).get("step_s_median"):
                res[f"{k}_step_over_unsloth_A"] = rows[k]["step_s_median"] / u["step_s_median"]
    (out / "fused_ab.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
