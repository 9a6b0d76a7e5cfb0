"""Long contexts on one GPU (issue 17): for each row (a shape, G, a budget), find with the planner alone the longest
prompt + completion it accepts, then train two steps at exactly that length and record the plan against nvidia-smi.

    python bench/long_context.py --search                 # here (no GPU): each row's longest accepted length
    python bench/long_context.py --price                  # here: the planner's price of 8K-128K tokens at each row
    python bench/long_context.py OUT_DIR [ROW ...]        # on the device: search, write data, run, record
    python bench/long_context.py --collect OUT_DIR [ROW]  # re-read run dirs (a run cut off keeps its finished steps;
                                                          # RUNS=DIR/runs here, from a sitting's tar)
    python bench/long_context.py --write-data             # bench/recipes/data/long_prompts.jsonl (131K-token prompts)
Rows (ROWS): llama-8b-78gb (G=8, 4K-token completions after the longest prompt that fits 78 GB), llama-8b-24gb (the
same at 24 GB; llama-8b-24gb-65k: at 65,536 tokens), qwen-7b-15gb (the longest accepted at 15 GB). The search is a
binary search over data.max_prompt_length in multiples of STEP tokens with the completion held
(trainer.plan.longest_length); when no prompt fits beside the completion, over the completion with a PROMPT_MIN-token
prompt. The run's prompts are written longer than the length and cut to it from the left (data.max_prompt_length), so
every prompt is exactly that long; the first step samples every completion to max_completion_length
(worst_case_first_step), and random-init models rarely stop early in the second. Each row is one `train` process
under bench/smi.py (nvidia-smi every 0.15 s); OUT_DIR/long_context.json is rewritten after each row (rows already
there are kept, so rows can run in separate commands). With
TRAINER_MEMORY_HISTORY=start in the environment an OOM at start-up also leaves OUT_DIR/ROW.memory_snapshot.pickle.gz
(`python bench/memory_snapshot.py` on it prints what held the memory):
    {"device", "runs": [{"name", "shape", "num_generations", "tokens", "prompt_tokens", "completion_tokens",
      "budget_gb", "predicted_peak_gb", "measured_peak_gb", "steps", "step_s", "tokens_per_s", "phase_s", "knobs",
      "offload_gb", "predicted_step_s", "rc", "command"}]}
tokens_per_s: the step's tokens (prompt + completion, x G) over its wall time, per step; phase_s: the metrics'
time_<phase>_s per step (rollout, reward, recompute, train, optimizer, sync, kv); per_step[i]["phase_peaks_gb"]:
torch's allocated and the device's in-use peak per phase (the 15 GB row of 2026-12-03 went 6.1% over its plan without
them). The row's shape is built first, in a process of its own (bf16 on the GPU, ~16 GB for the 8B written in 4 GB shards to TRAINER_CACHE): built inside
the run (2026-12-03) its 16 GB sat in the row's nvidia-smi series for 50 s, more than the 15 GB row's budget.
Device time: `--search` prints the planner's predicted step (trainer/cost.py; its long-sequence terms are data-sheet
estimates): 8-11 minutes a step at these lengths, mostly 8 x 4K tokens of decode at 1-8 sequences in flight. With a
10-minute limit per command, run one row per command, STEPS=1 where two steps do not fit (the first step is the
worst case), or start the row in the background and `--collect` it later: metrics.jsonl is written step by step.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEP = 256  # the search's grain in tokens (a 16-token KV block is finer than anything measured here)
PROMPT_MIN = 256
G = 8  # completions per prompt: grpo.num_generations of both long recipes
STEPS = int(os.environ.get("STEPS", "2"))
RUNS = Path(os.environ.get("RUNS", "/root/runs"))
# The device machine: one H100 80GB, 128 GB of host memory (the search here plans for it; on the device it reads both).
H100_TOTAL, HOST_BYTES = 85_520_000_000, 120 * 10**9
# cap_tokens: the run's length is the longest accepted up to this (78 GB accepts the model's whole 131,072-token context,
# predicted at ~11 minutes a step; the mark is 65,536). 24 GB accepts 88,832 with the tiled MLP and four
# sequences in flight (~8 minutes a step: two fit a sitting's 30 device minutes); llama-8b-24gb-65k is the same model
# and budget at 65,536, a point of the price of length. LONG_CAP=N caps any row at N tokens, LONG_CAP=0 runs the
# longest accepted.
ROWS = {
    "llama-8b-78gb": dict(recipe="bench/recipes/long-llama-8b.yaml", budget_gb=78, completion=4096, cap_tokens=65536),
    "llama-8b-24gb": dict(recipe="bench/recipes/long-llama-8b.yaml", budget_gb=24, completion=4096),
    "llama-8b-24gb-65k": dict(recipe="bench/recipes/long-llama-8b.yaml", budget_gb=24, completion=4096,
                              cap_tokens=65536, price=False),  # llama-8b-24gb's prices
    "qwen-7b-15gb": dict(recipe="bench/recipes/long-qwen-7b.yaml", budget_gb=15, completion=4096),
}


def h100(host_bytes: int = HOST_BYTES):
    from trainer.plan import Device

    return Device("cuda", "NVIDIA H100 80GB HBM3", H100_TOTAL, H100_TOTAL - 10**9, True, host_free_bytes=host_bytes,
                  capability=(9, 0))


def row_recipe(name: str, prompt: int | None = None, completion: int | None = None, extra=()):
    from trainer.recipe import load_recipe

    row = ROWS[name]
    sets = [f"budget.vram_gb={row['budget_gb']}", f"grpo.max_completion_length={completion or row['completion']}"]
    if prompt is not None:
        sets.append(f"data.max_prompt_length={prompt}")
    return load_recipe(ROOT / row["recipe"], sets + list(extra))


def search(name: str, device=None, step: int = STEP, cap: bool = False) -> dict:
    """The longest (prompt, completion) of a row that the planner accepts, the planner alone (nothing loads).
    cap: at most the row's cap_tokens (what the run uses); the uncapped length is kept as longest_accepted_tokens."""
    from trainer.plan import longest_length
    from trainer.policy import read_config

    device = device or h100()
    r = row_recipe(name)
    config = read_config(r.model)
    completion = r.grpo.max_completion_length
    prompt = longest_length(config, r, device, "prompt", step)
    if prompt == 0:  # not even `step` prompt tokens beside the completion: shorten the completion instead
        r = row_recipe(name, prompt=PROMPT_MIN)
        prompt, completion = PROMPT_MIN, longest_length(config, r, device, "completion", step)
    longest = prompt + completion if completion else 0
    limit = int(os.environ.get("LONG_CAP", ROWS[name].get("cap_tokens") or 0)) if cap else 0
    if limit and longest > limit:
        prompt = (limit - completion) // step * step
    return {"name": name, "shape": r.model.shape, "prompt_tokens": prompt, "completion_tokens": completion,
            "tokens": prompt + completion if completion else 0, "longest_accepted_tokens": longest,
            "budget_gb": ROWS[name]["budget_gb"]}


def plan_for(name: str, found: dict, device=None):
    from trainer.plan import make_plan
    from trainer.policy import read_config

    r = row_recipe(name, found["prompt_tokens"], found["completion_tokens"])
    return make_plan(read_config(r.model), r, device or h100())


def write_prompts(path: Path, shape: str, tokens: int, n: int = 4, seed: int = 0) -> None:
    """`n` prompts of random words, each at least `tokens` tokens with the shape's tokenizer (cut to the length by
    data.max_prompt_length, from the left, when the run loads them)."""
    from transformers import AutoTokenizer

    from trainer.shapes import corpus, tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(shape))
    lines = corpus(n_lines=2000, seed=seed)
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            parts, have = [], 0
            while have < tokens + 64:
                chunk = " ".join(rng.choice(lines) for _ in range(200))
                parts.append(chunk)
                have += len(tok(chunk)["input_ids"])
            f.write(json.dumps({"prompt": f"Document {i}: " + " ".join(parts) + "\nSummarise the document."}) + "\n")


def collect(name: str, found: dict, run_dir: Path, smi: Path, cmd: list[str]) -> dict:
    from bench.smi import partial_path
    from trainer.metrics import read_metrics
    from trainer.plan import run_plan

    partial = partial_path(smi)  # a run cut off with the machine has only the peak so far
    s = json.loads(smi.read_text()) if smi.exists() else json.loads(partial.read_text()) if partial.exists() else {}
    plan = run_plan(run_dir) or {}
    m = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    g = G
    phases = ("kv", "rollout", "reward", "recompute", "train", "optimizer", "sync")
    steps = [{"step_s": round(x["time_step_s"], 2),
              "tokens": int(g * found["prompt_tokens"] + x["completion_length_mean"] * g),
              "phase_s": {p: round(x.get(f"time_{p}_s", 0.0), 2) for p in phases},
              "completion_length_mean": x["completion_length_mean"],
              "peak_memory_gb": x.get("peak_memory_gb"),
              # torch's allocated peak and the device's in-use peak per phase (the budget loop's peak_torch_alloc_<phase>_gb
              # and peak_used_<phase>_gb): which phase set the row's peak, and how much of it torch allocated
              "phase_peaks_gb": {k.removeprefix("peak_").removesuffix("_gb"): round(v, 3) for k, v in x.items()
                                 if k.startswith("peak_") and k != "peak_memory_gb"}} for x in m]
    for st in steps:
        st["tokens_per_s"] = round(st["tokens"] / st["step_s"], 1) if st["step_s"] else None
    return {**found, "num_generations": g,
            "predicted_peak_gb": round(plan.get("peak_bytes", 0) / 1e9, 3) or None,
            "measured_peak_gb": s.get("peak_gb"), "rc": s.get("rc"), "steps": len(m),
            "step_s": [x["step_s"] for x in steps], "tokens_per_s": [x["tokens_per_s"] for x in steps],
            "phase_s": [x["phase_s"] for x in steps], "per_step": steps,
            "predicted_step_s": plan.get("predicted_step_s"),
            "predicted_phases_gb": {k: round(v / 1e9, 3) for k, v in plan.get("phase_peaks", {}).items()},
            "components_gb": {k: round(v / 1e9, 3) for k, v in plan.get("components", {}).items()},
            "offload_gb": round(plan.get("host_offload_bytes", 0) / 1e9, 2),  # pinned host memory for checkpoints
            "knobs": {k: plan.get(k) for k in ("micro_batch_tokens", "micro_batch_seqs", "gradient_checkpointing",
                                               "activation_offload", "weight_format", "kv_release",
                                               "kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens",
                                               "max_model_len", "cudagraph_capture_sizes", "compile_layers",
                                               "mlp_tile_tokens")},
            "wall_s": s.get("wall_s"), "command": " ".join(cmd)}


def detected_device():
    """Device.detect() in a child process: detecting in this one would open a CUDA context that stays on the GPU
    beside every watched run and counts in nvidia-smi's peak."""
    from dataclasses import asdict

    from trainer.plan import Device

    code = "import dataclasses, json; from trainer.plan import Device; print(json.dumps(dataclasses.asdict(Device.detect())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    fields = json.loads(out.strip().splitlines()[-1])
    assert set(fields) == set(asdict(Device("cpu")))
    return Device(**{**fields, "capability": tuple(fields["capability"]) if fields["capability"] else None})


def run(out: Path, names: list[str]) -> None:
    from bench.smi import watched
    from trainer.shapes import model_dir_apart

    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "long_context.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {"runs": []}
    dev = detected_device()
    result["device"] = dev.name
    for name in names:
        found = search(name, dev, cap=True)
        print(f"{name}: longest accepted {found}", flush=True)
        if not found["tokens"]:
            row = {**found, "num_generations": G, "rc": None, "error": "no length fits this budget"}
        else:
            data = out / "data" / f"{name}.jsonl"
            write_prompts(data, found["shape"], found["prompt_tokens"])
            model_dir_apart(found["shape"])  # built in a process of its own: see docs/benchmarks.md, 24 GB row
            run_dir = RUNS / f"long-{name}"
            cmd = [sys.executable, "-m", "trainer.cli", ROWS[name]["recipe"], "--output-dir", str(run_dir), "--overwrite"]
            for s in (f"budget.vram_gb={ROWS[name]['budget_gb']}", f"data.dataset={data.resolve()}",
                      f"data.max_prompt_length={found['prompt_tokens']}",
                      f"grpo.max_completion_length={found['completion_tokens']}", f"train.max_steps={STEPS}"):
                cmd += ["--set", s]
            # the row as far as it is known, before the run: a machine that goes back mid-run leaves a results file
            # that `--collect` completes from the run dir's files (`queue wait` tars them as the steps finish)
            pending = {**found, "num_generations": G, "rc": None, "command": " ".join(cmd)}
            result["runs"] = [x for x in result["runs"] if x["name"] != name] + [pending]
            result_path.write_text(json.dumps(result, indent=1))
            t0 = time.time()
            watched(out / f"{name}.smi.json", out / f"{name}.log", cmd, {**os.environ, "SMI_GPUS": "0"})
            row = collect(name, found, run_dir, out / f"{name}.smi.json", cmd)
            keep_snapshot(run_dir, out / f"{name}.memory_snapshot.pickle.gz")
            print(f"{name}: rc {row['rc']}, {time.time() - t0:.0f} s, peak {row['measured_peak_gb']} GB "
                  f"(plan {row['predicted_peak_gb']}), steps {row['step_s']}", flush=True)
        result["runs"] = [x for x in result["runs"] if x["name"] != name] + [row]
        result_path.write_text(json.dumps(result, indent=1))


def keep_snapshot(run_dir: Path, dest: Path) -> None:
    """An OOM's allocation history (TRAINER_MEMORY_HISTORY=start|all, trainer/oom.py), gzipped beside the row's log."""
    import gzip

    src = run_dir / "memory_snapshot.pickle"
    if src.exists():
        dest.write_bytes(gzip.compress(src.read_bytes()))


def recollect(out: Path, names: list[str]) -> None:
    """Rows from run directories already there (a run cut off by a time limit keeps the steps it finished); RUNS in
    the environment points at them (on this machine: the runs/ of a sitting's tar)."""
    result_path = out / "long_context.json"
    result = json.loads(result_path.read_text())
    for name in names:
        old = next(x for x in result["runs"] if x["name"] == name)
        found = {k: old[k] for k in ("name", "shape", "prompt_tokens", "completion_tokens", "tokens",
                                     "longest_accepted_tokens", "budget_gb")}
        row = collect(name, found, RUNS / f"long-{name}", out / f"{name}.smi.json", old["command"].split())
        result["runs"] = [x for x in result["runs"] if x["name"] != name] + [row]
    result_path.write_text(json.dumps(result, indent=1))


PRICE_TOKENS = (8192, 16384, 32768, 65536, 98304, 131072)  # prompt + completion of the price table


def price_of_length(names=None) -> list[dict]:
    """The planner's price of each length (PRICE_TOKENS, a 4,096-token completion, G 8) at each row's shape and
    budget: the predicted step by phase, tokens/s, the peak and how it fits; or why it does not. Predictions (cost.py,
    memory.py, fitted on the measured rows), no run."""
    from trainer.errors import UserError

    out = []
    for name in names or [k for k, v in ROWS.items() if v.get("price", True)]:
        comp = ROWS[name]["completion"]
        for total in PRICE_TOKENS:
            row = {"row": name, "tokens": total}
            try:
                plan = plan_for(name, {"prompt_tokens": total - comp, "completion_tokens": comp})
            except UserError as e:
                out.append({**row, "fits": False, "why": e.problem})
                continue
            ph = plan.predicted_phases_s
            out.append({**row, "fits": True, "step_s": round(plan.predicted_step_s), "rollout_s": round(ph["rollout"]),
                        "train_s": round(ph["train"]), "tokens_per_s": round(G * total / plan.predicted_step_s),
                        "peak_gb": round(plan.peak_bytes / 1e9, 1), "offload": plan.activation_offload,
                        "mlp_tiles": bool(plan.mlp_tile_tokens), "seqs_in_flight": plan.max_num_seqs})
    return out


def show_price() -> None:
    print("| row | prompt + completion | predicted step (rollout + train) | tokens/s | peak | how |")
    print("|---|---|---|---|---|---|")
    for x in price_of_length():
        if not x["fits"]:
            print(f"| {x['row']} | {x['tokens']:,} | - | - | - | refused: {x['why']} |")
            continue
        how = ", ".join([f"{x['seqs_in_flight']} in flight"] + ["checkpoints on host"] * x["offload"]
                        + ["MLP tiles"] * x["mlp_tiles"])
        print(f"| {x['row']} | {x['tokens']:,} | {x['step_s']} s ({x['rollout_s']} + {x['train_s']}) | "
              f"{x['tokens_per_s']:,} | {x['peak_gb']} GB | {how} |")


def show_search() -> None:
    for name in ROWS:
        found = search(name, cap=True)
        plan = plan_for(name, found) if found["tokens"] else None
        knobs = (f"peak {plan.peak_bytes / 1e9:.2f} GB, offload {plan.activation_offload} "
                 f"({plan.host_offload_bytes / 1e9:.1f} GB host), seqs in flight {plan.max_num_seqs}, KV "
                 f"{plan.kv_cache_memory_bytes / 1e9:.2f} GB, micro-batch {plan.micro_batch_tokens} tokens x "
                 f"{plan.micro_batch_seqs} seq, predicted step {plan.predicted_step_s:.0f} s") if plan else "-"
        print(f"{name:15s} prompt {found['prompt_tokens']:6d} + completion {found['completion_tokens']:5d} = "
              f"{found['tokens']:6d} tokens (longest accepted {found['longest_accepted_tokens']}) at "
              f"{found['budget_gb']} GB: {knobs}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--search":
        show_search()
    elif len(sys.argv) > 1 and sys.argv[1] == "--price":
        show_price()
    elif len(sys.argv) > 1 and sys.argv[1] == "--write-data":  # the recipes' data file, for `train --plan` here
        write_prompts(ROOT / "bench" / "recipes" / "data" / "long_prompts.jsonl", "llama-3.1-8b", 131072)
    elif len(sys.argv) > 2 and sys.argv[1] == "--collect":
        recollect(Path(sys.argv[2]), sys.argv[3:] or list(ROWS))
    elif len(sys.argv) > 1 and not sys.argv[1].startswith("-"):  # `--help` and typos print this, they run nothing
        run(Path(sys.argv[1]), sys.argv[2:] or list(ROWS))
    else:
        raise SystemExit(__doc__)
