"""Fixed vs token-budgeted micro-batches on the GPU (issue 11), at the same worst-case tokens per micro-batch, on a
long-tailed mix of completion lengths (per-request max_tokens ~ log-normal; random-init models never stop).

    python bench/microbatch.py OUT_DIR      # on the device, after staging; writes OUT_DIR/microbatch.json
Config B of the peers benchmark: 64 completions of up to 512 tokens, Qwen2.5-1.5B shape, vLLM rollouts.
Also one forced OOM: a fixed micro-batch far too large for the card, checkpointing off.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.smi import watched  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402

BASE = "bench/recipes/toy-digits-1.5b-vllm.yaml"
TOKENS = 4096  # worst-case padded tokens per micro-batch in both modes
MIX = {"median": 80, "sigma": 1.0, "min_tokens": 8}
COMMON = ["model.shape=qwen2.5-1.5b", "train.generation_batch_size=64", "grpo.max_completion_length=512",
          "train.max_steps=8", "checkpoint.save_final=false", "model.gradient_checkpointing=true",
          f"rollout.length_mix={{median: {MIX['median']}, sigma: {MIX['sigma']}, min_tokens: {MIX['min_tokens']}}}"]
MODES = {"fixed": [f"train.per_device_train_batch_size={TOKENS // (30 + 512)}"],
         "token_budget": [f"train.micro_batch_tokens={TOKENS}"]}
OOM = ["train.micro_batch_tokens=400000", "model.gradient_checkpointing=false", "train.max_steps=2"]


def train(out: Path, name: str, sets: list[str]) -> tuple[int, Path]:
    run = Path("/root/runs") / f"mb-{name}"
    cmd = [sys.executable, "-m", "trainer.cli", BASE, "--output-dir", str(run), "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    return watched(out / f"smi_{name}.json", out / f"{name}.log", cmd), run


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": None, "length_mix": dict(MIX, dist="lognormal, clipped to [min_tokens, 512]", completions=64,
                                                 max_tokens=512), "worst_case_tokens_per_micro_batch": TOKENS,
           "command": "python bench/microbatch.py OUT_DIR"}
    for mode, sets in MODES.items():
        rc, run = train(out, mode, COMMON + sets)
        m = read_metrics(run)
        res["device"] = json.loads((run / "plan.json").read_text())["device_name"]
        later = m[1:]  # step 1 runs at worst-case shapes on purpose
        res[mode] = {"rc": rc, "step_s_median": statistics.median(x["time_step_s"] for x in later),
                     "train_s_median": statistics.median(x["time_train_s"] for x in later),
                     "peak_gb": json.loads((out / f"smi_{mode}.json").read_text())["peak_gb"],
                     "padding_frac": statistics.mean(x["padding_frac"] for x in later),
                     "micro_batches_mean": statistics.mean(x["micro_batches"] for x in later),
                     "completion_length_mean": statistics.mean(x["completion_length_mean"] for x in later)}
        print(mode, res[mode], flush=True)
    res["token_budget_over_fixed_step"] = res["token_budget"]["step_s_median"] / res["fixed"]["step_s_median"]
    res["token_budget_over_fixed_train"] = res["token_budget"]["train_s_median"] / res["fixed"]["train_s_median"]
    rc, run = train(out, "forced_oom", COMMON + OOM)
    text = (out / "forced_oom.log").read_text()
    res["forced_oom"] = {"rc": rc, "sets": OOM, "message": text[text.find("out of memory"):][:1500]}
    (out / "microbatch.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "forced_oom"}, indent=1))
    print(res["forced_oom"]["message"])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
