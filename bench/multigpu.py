"""Data-parallel GRPO on two GPUs of one host (issue 8): the same recipe on one GPU, then under torchrun on two,
one colocated vLLM engine per rank. Reports reward, throughput, per-GPU peaks against the plan, and whether the
LoRA weights of the two ranks are equal after training.

    python bench/multigpu.py OUT_DIR      # on the device (2 GPUs), after staging; writes OUT_DIR/multigpu.json
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.smi import watched  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402

RECIPE = os.environ.get("MG_RECIPE", "bench/recipes/multigpu-1.5b.yaml")
SETS = [x for s in os.environ.get("MG_SETS", "").split() for x in ("--set", s)]  # CPU dry runs of this script
RUNS = Path(os.environ.get("RUNS", "/root/runs"))


def run(out: Path, name: str, rundir: Path, gpus: str, nproc: int) -> int:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus, "SMI_GPUS": gpus, "NCCL_NVLS_ENABLE": "0",
           "TRAINER_TEST_DUMP_LORA": str(RUNS)}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launch, "-m", "trainer.cli", RECIPE, "--output-dir", str(rundir), "--overwrite", *SETS]
    return watched(out / f"smi_{name}.json", out / f"{name}.log", cmd, env)


def summary(rc: int, rundir: Path, smi: dict, nproc: int) -> dict:
    m = read_metrics(rundir) if (rundir / "metrics.jsonl").exists() else []
    plan = json.loads((rundir / "plan.json").read_text()) if (rundir / "plan.json").exists() else {}
    after = m[2:] or m  # steps 1-2: worst-case lengths and first-call warm-up
    completions = sum(x["completion_length_mean"] for x in after) * plan.get("generation_batch_size", 0) * nproc
    wall = sum(x["time_step_s"] for x in after)
    return {"rc": rc, "steps": len(m), "reward_first5": statistics.fmean(x["reward_mean"] for x in m[:5]) if m else None,
            "reward_last5": statistics.fmean(x["reward_mean"] for x in m[-5:]) if m else None,
            "reward_per_step": [round(x["reward_mean"], 4) for x in m],
            "step_s_median": statistics.median(x["time_step_s"] for x in after) if after else None,
            "rollout_s_median": statistics.median(x["time_rollout_s"] for x in after) if after else None,
            "train_s_median": statistics.median(x["time_train_s"] for x in after) if after else None,
            "sync_ms_median": statistics.median(x.get("sync_ms", 0) for x in after) if after else None,
            "per_rank_completions": plan.get("generation_batch_size"),
            "planned_peak_gb_per_gpu": plan.get("peak_bytes", 0) / 1e9, "budget_gb": (plan.get("budget_bytes") or 0) / 1e9,
            "smi_peak_gb_per_gpu": smi.get("peak_gb_per_gpu"), "wall_s": smi.get("wall_s"),
            "weight_format": plan.get("weight_format"), "_wall_tokens": (completions, wall)}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    import torch

    res = {"device": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"],
           "recipe": RECIPE, "command": "python bench/multigpu.py OUT_DIR  (one GPU: train RECIPE; two: NCCL_NVLS_ENABLE=0 "
           "torchrun --nproc_per_node 2 -m trainer.cli RECIPE)"}
    for name, gpus, nproc in (("one_gpu", "0", 1), ("two_gpus", "0,1", 2)):
        rc, rundir = 0, RUNS / f"mg-{name}"
        if name not in os.environ.get("MG_REUSE", "").split(","):  # else: summarise an earlier run of this sitting
            for f in RUNS.glob("lora_rank*.pt"):
                f.unlink()
            rc = run(out, name, rundir, gpus, nproc)
        smi = json.loads((out / f"smi_{name}.json").read_text()) if (out / f"smi_{name}.json").exists() else {}
        res[name] = summary(rc, rundir, smi, nproc)
        if nproc > 1:
            r = [torch.load(RUNS / f"lora_rank{k}.pt") for k in range(nproc)] if (RUNS / "lora_rank1.pt").exists() else []
            res[name]["lora_equal_across_ranks"] = bool(r) and all(torch.equal(r[0][k], r[1][k]) for k in r[0])
            res[name]["lora_tensors_compared"] = len(r[0]) if r else 0
        print(name, json.dumps({k: v for k, v in res[name].items() if k != "reward_per_step"}), flush=True)
    one, two = res["one_gpu"], res["two_gpus"]
    if one["step_s_median"] and two["step_s_median"]:
        res["speedup_step"] = one["step_s_median"] / two["step_s_median"]
        (c1, w1), (c2, w2) = one["_wall_tokens"], two["_wall_tokens"]
        res["completion_tokens_per_s"] = {"one_gpu": c1 / w1, "two_gpus": c2 / w2}
    for r in (one, two):
        r.pop("_wall_tokens")
        peaks = (r.get("smi_peak_gb_per_gpu") or {}).values()
        r["peak_within_budget"] = bool(peaks) and max(peaks) <= r["budget_gb"]
        r["peak_over_planned"] = max(peaks) / r["planned_peak_gb_per_gpu"] if peaks and r["planned_peak_gb_per_gpu"] else None
    (out / "multigpu.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
