"""Side by side with TRL and Unsloth on ONE GPU, one sitting (issues 10 and 15): each system in its own process on
the same model files, prompts, reward, LoRA and optimizer; ours through the same `train` entry users run, with the
benchmark recipe at `max_prompt_length: 128` as the peers' scripts set it. Every run is wrapped by bench/smi.py
(nvidia-smi every 0.15 s); startup is launch to the end of the first step; step time is the median gap between step
ends after the first step, for every system alike.

    python bench/vs_peers.py OUT_DIR        # on the device after staging (scripts/device_stage.sh unsloth)
Order: the peers first, then ours at budgets taken from the peers' peaks measured in this sitting:
- ours_fast: budget = the lowest peer peak (the goal: step <= 0.6x the fastest peer at a peak <= that);
- ours_small: budget = half the lowest peer peak (the goal: step <= the fastest peer's at <= half its peak);
- with VS_PEERS_AB=1, the A/B levers of issue 15 in the same sitting: ours_fast_eager (train.torch_compile=false) and
  ours_small_bnb (rollout.nf4_gemm=bitsandbytes: vLLM's own bitsandbytes path instead of the fused nf4 GEMM); off by
  default, so that the peers and ours fit one device sitting (~18 minutes of runs on the H200 of 2026-12-02).
Caches (Triton, inductor, vLLM, Unsloth's compiled cache, __pycache__ of the staged packages) are cleared before
each system's first run, so its startup is a machine's-first-run (cold) startup. Writes OUT_DIR/raw/<run>.{log,
smi.json,result.json} and OUT_DIR/vs_peers_<card>.json, the card named as nvidia-smi names it (vs_peers_h200.json on
an H200; bench/peers/report.py builds the table and plot from them).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.peers import report  # noqa: E402
from bench.smi import watched  # noqa: E402

CONFIGS = report.CONFIGS
PEERS = [("unsloth", "A", 0.1), ("unsloth_tuned", "A", 0.06), ("unsloth", "B", 0.1), ("trl", "A", 0.1), ("trl", "B", 0.1)]
SITE, UNSLOTH_SITE = os.environ.get("SITE", "/root/site"), os.environ.get("UNSLOTH_SITE", "/root/site_unsloth")
RUNS = Path(os.environ.get("RUNS", "/root/runs"))
STEPS = int(os.environ.get("STEPS", "7"))
H100_MIB = 81559  # memory.total of the H100 80GB HBM3 the peers' utilisations were tuned on
# every cache a run writes that a later system's run could load: ours keeps its compiled layers in
# ~/.cache/trainer/torch_compile (trainer/compile_cache.py) since 2026-12-06, vLLM's FlashInfer its JIT in
# ~/.cache/flashinfer
CACHES = ["~/.triton/cache", "~/.cache/vllm", "/tmp/torchinductor_root", "~/.cache/torch/kernels",
          "unsloth_compiled_cache", "~/.cache/trainer", "~/.cache/flashinfer"]


def util_scale() -> float:
    """Peers size vLLM as a fraction of the card: on a larger card, scale it so they get the H100's bytes."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True).stdout.strip()
    return min(1.0, H100_MIB / float(out)) if out else 1.0


def clear_caches() -> None:
    for c in CACHES:
        shutil.rmtree(Path(c).expanduser(), ignore_errors=True)
    for root in (SITE, UNSLOTH_SITE, "."):
        for d in Path(root).rglob("__pycache__"):
            shutil.rmtree(d, ignore_errors=True)


def ours_sets(cfg: str) -> list[str]:
    c = CONFIGS[cfg]
    return [f"train.generation_batch_size={c['completions']}", f"grpo.max_completion_length={c['completion_tokens']}",
            f"train.max_steps={STEPS}"]


def job_cmd(system: str, cfg: str, knob, model: str, raw: Path, name: str, extra=()) -> tuple[list[str], dict]:
    c = CONFIGS[cfg]
    env = {"GRPO_BS": str(c["completions"]), "GRPO_LEN": str(c["completion_tokens"]), "STEPS": str(STEPS)}
    if system.startswith("unsloth"):
        env["PYTHONPATH"] = f"{UNSLOTH_SITE}:{SITE}:{os.getcwd()}"
        return [sys.executable, "bench/peers/unsloth_grpo.py", model, str(knob), str(raw / f"{name}.result.json")], env
    if system == "trl":
        return [sys.executable, "bench/peers/trl_grpo.py", model, str(knob), str(raw / f"{name}.result.json")], env
    cmd = [sys.executable, "-m", "trainer.cli", "bench/peers/ours.yaml", "--output-dir", str(RUNS / name),
           "--overwrite", "--set", f"budget.vram_gb={knob}"]
    for s in ours_sets(cfg) + list(extra):
        cmd += ["--set", s]
    return cmd, env


def run(system: str, cfg: str, knob, model: str, raw: Path, extra=(), label: str | None = None) -> None:
    name = f"{label or system}_{cfg}"
    cmd, env_extra = job_cmd(system, cfg, knob, model, raw, name, extra)
    env = {**os.environ, **env_extra, "CUDA_VISIBLE_DEVICES": "0", "SMI_GPUS": "0"}
    print(f"{name}: {' '.join(cmd)}", flush=True)
    rc = watched(raw / f"{name}.smi.json", raw / f"{name}.log", cmd, env)
    if system.startswith("ours"):
        report.collect_ours(RUNS / name, raw / f"{name}.result.json", label or system,
                            f"budget.vram_gb={knob}" + "".join(f" {e}" for e in extra))
    print(f"{name}: rc {rc}", flush=True)


def lowest_peer_peak(raw: Path, cfg: str) -> float:
    peaks = [json.loads((raw / f"{s}_{cfg}.smi.json").read_text())["peak_gb"] for s, c, _ in PEERS
             if c == cfg and (raw / f"{s}_{cfg}.smi.json").exists()
             and json.loads((raw / f"{s}_{cfg}.smi.json").read_text())["rc"] == 0]
    if not peaks:
        raise SystemExit(f"no peer finished config {cfg}: nothing to set our budgets from")
    return min(peaks)


def main(out: Path) -> None:
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    from trainer.shapes import model_dir_apart

    model = str(model_dir_apart("qwen2.5-1.5b", env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"}))
    scale = util_scale()
    device = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                            capture_output=True, text=True).stdout.strip()
    meta = {"device": device, "util_scale_to_h100_bytes": scale, "model": model, "steps": STEPS, "cold_runs": []}
    first = set()
    for system, cfg, util in PEERS:
        family = system.split("_")[0]
        if family not in first:
            clear_caches()
            first.add(family)
            meta["cold_runs"].append(f"{system}_{cfg}")
        run(system, cfg, round(util * scale, 4), model, raw)
    fast = {cfg: math.floor(lowest_peer_peak(raw, cfg) * 10) / 10 for cfg in CONFIGS}
    small = {cfg: math.floor(lowest_peer_peak(raw, cfg) * 5) / 10 for cfg in CONFIGS}
    meta.update(fast_budget_gb=fast, small_budget_gb=small)
    (raw / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta), flush=True)
    clear_caches()
    meta["cold_runs"].append("ours_fast_A")
    (raw / "meta.json").write_text(json.dumps(meta, indent=1))
    for cfg in CONFIGS:
        run("ours", cfg, fast[cfg], model, raw, label="ours_fast")
        run("ours", cfg, small[cfg], model, raw, label="ours_small")
    if os.environ.get("VS_PEERS_AB") == "1":
        run("ours", "A", fast["A"], model, raw, extra=["train.torch_compile=false"], label="ours_fast_eager")
        for cfg in CONFIGS:
            run("ours", cfg, small[cfg], model, raw, extra=["rollout.nf4_gemm=bitsandbytes"], label="ours_small_bnb")
    report.build(raw, out / f"vs_peers_{card_slug(device)}.json", command="python bench/vs_peers.py OUT_DIR  (one "
                 "GPU, after scripts/device_stage.sh unsloth; bench/peers/report.py RAW OUT.json PLOT.png)")


def card_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100', 'Tesla T4' -> 't4': the results file's suffix."""
    import re

    m = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
