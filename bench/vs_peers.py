"""Side by side with TRL and Unsloth (issue 10): each system in its own process on the same model files, prompts,
reward and LoRA; ours through the same `train` entry users run. Every run is wrapped by bench/smi.py (nvidia-smi
every 0.15 s on its GPU); startup is launch to the end of the first step; step time is the median gap between step
ends after the first step, for every system alike.

    python bench/vs_peers.py OUT_DIR [GPUS]     # on the device after staging (and stage-unsloth.sh); GPUS "0" or "0,1"
With two GPUs the systems run in two lanes at once (Unsloth on one GPU; TRL, then ours, on the other); each run
still has its GPU to itself. Writes OUT_DIR/raw/<run>.{log,smi.json,result.json} and OUT_DIR/vs_peers.json
(bench/peers/report.py builds the table and the plot from them).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.peers import report  # noqa: E402
from bench.smi import watched  # noqa: E402

CONFIGS = report.CONFIGS
# The lowest peer peak per config from the 2026-11-25 sitting (../shared/device/README.md): ours_fast's budget.
# This sitting's peer peaks are measured alongside, and the goals are checked against those.
FAST_BUDGET_GB = {"A": 6.6, "B": 14.5}
PEERS = [("unsloth", "A", 0.1), ("unsloth_tuned", "A", 0.06), ("unsloth", "B", 0.1), ("trl", "A", 0.1), ("trl", "B", 0.1)]
SITE, UNSLOTH_SITE = os.environ.get("SITE", "/root/site"), os.environ.get("UNSLOTH_SITE", "/root/site_unsloth")
RUNS = Path(os.environ.get("RUNS", "/root/runs"))
STEPS = int(os.environ.get("STEPS", "7"))
H100_MIB = 81559  # memory.total of the H100 80GB HBM3 the peers' utilisations were tuned on


def util_scale(gpu: str) -> float:
    """Peers size vLLM as a fraction of the card: on a larger card, scale it so they get the H100's bytes."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", gpu],
                         capture_output=True, text=True).stdout.strip()
    return min(1.0, H100_MIB / float(out)) if out else 1.0


def ours_sets(cfg: str) -> list[str]:
    c = CONFIGS[cfg]
    return [f"train.generation_batch_size={c['completions']}", f"grpo.max_completion_length={c['completion_tokens']}",
            f"train.max_steps={STEPS}"]


def smallest_budget(cfg: str) -> float:
    """The smallest budget the planner accepts: what its refusal of a 0.1 GB budget names."""
    cmd = [sys.executable, "-m", "trainer.cli", "bench/peers/ours.yaml", "--plan", "--set", "budget.vram_gb=0.1"]
    for s in ours_sets(cfg):
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    m = re.search(r"set budget\.vram_gb: ([0-9.]+)", out.stdout.replace("\n", " "))
    if not m:
        raise SystemExit(f"no smallest budget in the planner's answer:\n{out.stdout}\n{out.stderr[-2000:]}")
    return float(m.group(1))


def job_cmd(system: str, cfg: str, knob, model: str, raw: Path, name: str) -> tuple[list[str], dict]:
    c = CONFIGS[cfg]
    env = {"GRPO_BS": str(c["completions"]), "GRPO_LEN": str(c["completion_tokens"]), "STEPS": str(STEPS)}
    if system.startswith("unsloth"):
        env["PYTHONPATH"] = f"{UNSLOTH_SITE}:{SITE}:{os.getcwd()}"
        return [sys.executable, "bench/peers/unsloth_grpo.py", model, str(knob), str(raw / f"{name}.result.json")], env
    if system == "trl":
        return [sys.executable, "bench/peers/trl_grpo.py", model, str(knob), str(raw / f"{name}.result.json")], env
    cmd = [sys.executable, "-m", "trainer.cli", "bench/peers/ours.yaml", "--output-dir", str(RUNS / name),
           "--overwrite", "--set", f"budget.vram_gb={knob}"]
    for s in ours_sets(cfg):
        cmd += ["--set", s]
    return cmd, env


def lane(gpu: str, jobs: list, model: str, raw: Path) -> None:
    for system, cfg, knob in jobs:
        name = f"{system}_{cfg}"
        cmd, extra = job_cmd(system, cfg, knob, model, raw, name)
        env = {**os.environ, **extra, "CUDA_VISIBLE_DEVICES": gpu, "SMI_GPUS": gpu}
        print(f"[gpu {gpu}] {name}: {' '.join(cmd)}", flush=True)
        rc = watched(raw / f"{name}.smi.json", raw / f"{name}.log", cmd, env)
        if not system.startswith(("trl", "unsloth")):
            report.collect_ours(RUNS / name, raw / f"{name}.result.json", system, f"budget.vram_gb={knob}")
        print(f"[gpu {gpu}] {name}: rc {rc}", flush=True)


def main(out: Path, gpus: list[str]) -> None:
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    build = subprocess.run([sys.executable, "-c", "from trainer.shapes import model_dir; print(model_dir('qwen2.5-1.5b'))"],
                           capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus[0]})
    model = build.stdout.strip().splitlines()[-1]
    small = {cfg: smallest_budget(cfg) for cfg in CONFIGS}
    scale = util_scale(gpus[0])
    peers = [(system, cfg, round(util * scale, 4)) for system, cfg, util in PEERS]
    ours = [(f"ours_{op}", cfg, FAST_BUDGET_GB[cfg] if op == "fast" else small[cfg]) for cfg in CONFIGS
            for op in ("fast", "small")]
    device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", gpus[0]],
                            capture_output=True, text=True).stdout.strip()
    meta = {"device": device, "util_scale_to_h100_bytes": scale, "model": model, "steps": STEPS, "fast_budget_gb": FAST_BUDGET_GB, "small_budget_gb": small, "gpus": gpus}
    (raw / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta), flush=True)
    jobs = peers + ours
    lanes = [[j for j in jobs if j[0].startswith("unsloth")], [j for j in jobs if not j[0].startswith("unsloth")]] \
        if len(gpus) > 1 else [jobs]
    threads = [threading.Thread(target=lane, args=(g, js, model, raw)) for g, js in zip(gpus, lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.build(raw, out / "vs_peers.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "0").split(","))
