"""A/B of a switch of the compiled decoder layers (trainer/policy.py), one sitting, one GPU.

    python bench/compile_ab.py OUT [STEPS] [SWITCH]     # on the device; default 10 steps a run, SWITCH dynamic
    python bench/compile_ab.py OUT STEPS A+B+C          # a ladder: default, A, A+B, A+B+C, default again, on the
                                                        # configs all of them are measured on -> OUT/ladder_A+B+C_ab.json

SWITCH dynamic: TRAINER_COMPILE_DYNAMIC (policy.COMPILE_DYNAMIC: torch's automatic dynamic shapes, recompiling as
lengths change, against dynamic from the first compile), on config A of the side-by-side (bench/peers/ours.yaml: 1.5B
shape, 8 x 256) at the fast budget (6.6 GB: all 8 sequences in one micro-batch) and the small one (3.3 GB, issue 26's
small budget for A: short micro-batches). SWITCH ckpt_in_graph: `train.checkpoint_in_graph` true against false (the
checkpoint inside each compiled layer's graph wherever it applies, against HF's around it always; unset, the planner
chooses; before 2026-12-05 TRAINER_CKPT_IN_GRAPH=1 against unset), on config A at 6.6 GB without activation offload
(which keeps HF's checkpoint): eight 286-token micro-batches on the shared nf4 base (the profiled host-bound row of
2026-12-04), the planner's micro-batches, and the 0.5B shape's eight 286-token ones (its memory term's second
shape). SWITCH nf4_traced: TRAINER_NF4_TRACED (policy.NF4_TRACED: the nf4 layers as torch ops in the compiled graphs, trainer/nf4_linear.py) on the same eight 286-token micro-batches and on config A
at issue 26's small budget (3.3 GB, the planner's knobs). SWITCH eager_rounding: TRAINER_COMPILE_EAGER_ROUNDING=0
(policy.COMPILE_OPTIONS: inductor's own rounding instead of eager's, the default before 2026-12-04) on config A at
6.6 GB (one large micro-batch) and the eight 286-token ones: what matching eager's numerics costs. SWITCH hf_compile:
`train.torch_compile: true` with HF-generate rollouts (config A at 6.6 GB, `rollout.engine: hf`; the planner compiles
the layers only with vLLM, the Colab path trains eagerly; generate runs the layers eagerly either way). SWITCH
hf_decode: `rollout.hf_compile: true` on the same config (trainer/rollout/hf.py: a static KV cache and HF's compiled,
CUDA-graphed decode step instead of eager generate, ~2.4 ms a layer and token of host time). SWITCH sampler_rounding: TRAINER_SAMPLER_ROUNDING=1 against =0 (trainer/sampler_rounding.py: the trainer's RMSNorm,
rotary and 4-bit q/k/v bias rounding where vLLM's kernels do) on config A at 6.6 GB and the eight 286-token
micro-batches: its step-time cost and, in each run's gap_mean, what it removes of the sampler/trainer gap. SWITCH
fp16: `model.dtype: float16` on both sides (the loss scaled, as on a T4) on the same two configs: the gap of each step
and the step time against bfloat16 (bench/fidelity.py's fp16 engines say why). SWITCH
lora_tuned: VLLM_TUNED_CONFIG_FOLDER at bench/lora_tune.py's configs (the queue item `lora_tune` runs first) on config
A at 6.6 and 3.3 GB: vLLM's LoRA kernels tuned for the shape against its defaults. SWITCH lora_merge: `rollout.sync:
merge` against vLLM's LoRA slots (inplace) on the bf16 mirror, config A at 6.6 GB and B (64 x 512) at 14.5 GB: the
adapter merged into the mirror's weights each step (trainer/sync.py MergedSync), so the decode step runs no LoRA
kernels; each run's gap_mean says what the merge's rounding costs in fidelity. SWITCH mirror_views:
TRAINER_MIRROR_VIEWS (trainer/sync.py view_mirror_linears: with the LoRA slots, the trainer's linears as views of the
mirror's rows, its nf4 copy freed) on the same two configs: the train phase without bitsandbytes' dequantisation, and
in steady_phase_peaks_gb the memory it frees (the plan still counts it); in the ladder lora_merge+mirror_views, with
merge, the trainer's adapted linears compute on the merged rows instead (trainer/merged_linear.py: the function vLLM
samples, peft's gradients), whose gap_mean is the point. On by default since 2026-12-05 (trainer/plan.py
MIRROR_VIEWS): its off runs set it to 0, and as auto then plans merge only with it on, `mirror_views` alone now sets
the shipped default (merge + rows) against the slots with the trainer on its nf4. SWITCH mirror_direct: TRAINER_MIRROR_DIRECT (trainer/sync.py
load_mirror: vLLM on dummy weights, the trainer's base written into them on the device, no checkpoint staged) on the
same two configs: first_two_s (start-up) and gap_mean (the same weights: unchanged). SWITCH gc_freeze:
TRAINER_GC_FREEZE (trainer/grpo.py GC_FREEZE: the heap frozen after the first two steps, so full collections walk
only what the run allocates later; time_gc_s in each run's metrics shows the pauses either way). SWITCH
dynamic_dims: TRAINER_COMPILE_DYNAMIC_DIMS (trainer/compile_shapes.py: the layers' inputs dynamic in batch and length
from the first compile; each run's compile_s says where the compiles went). SWITCH input_grad:
TRAINER_COMPILE_INPUT_GRAD (compile_shapes.first_input_needs_grad: the first layer's train-pass input needs grad as
the later layers' do, one guard variant fewer) on B at 14.5 GB (the H200 row that compiled ten graphs for that
variant) and A at 3.3 GB (short micro-batches): first_two_s and compile_s say what it saves. SWITCH
train_cudagraphs: TRAINER_COMPILE_CUDAGRAPHS (Plan.train_cudagraphs: the compiled layers replayed from inductor's
CUDA graph trees, where plan.cudagraphs_apply) on the 1.5B's eight 286-token micro-batches, the host-bound train
phase with the checkpoint inside the layers, with sampled completion lengths (A-mb286-mix: every micro-batch padded
to the plan's longest length, trainer/graph_lengths.py, since the ladder of 14 lost 2.98x on 2026-12-07;
cuda_graphs, the graphs held after each step, flat from step 2 or 3), and on the 0.5B shape's (a second shape for
cost.py's GRAPHED_LAYER_FLOOR_S and memory.TRAIN_GRAPH_POOL_BYTES, both from A-mb286's H100 runs, twice 0.60-0.66x
the step): steady_train_ratio and the peaks against the plan are the point. A at 3.3 GB ran with it
on 2026-12-07 (HF's checkpoint with offload: re-recorded every step); the plan now keeps the graphs off there. SWITCH
small_graphs: both TRAINER_COMPILE_CUDAGRAPHS and TRAINER_CKPT_RECOMPUTE_ALL (the checkpoint inside the layers
recomputing every op, Plan.checkpoint_recompute_all, at HF's checkpoint's memory) on A at 3.3 GB, which the planner
then takes (279-token micro-batches, one sequence each, as `train` plans them from the data; 2.99 GB planned with the
trees' pool, predicted 1.84 s against 2.34 on the H200's costs):
steady_step_ratio and the peak against the plan are the point. Both on by default since 2026-12-08 (the 1.5B's
sampled lengths 0.625x, the 0.5B's 0.504x on one H100): their off runs set the variables to 0. Each config
trained with the switch unset and set, the two variants alternated so neither always runs on a warmer machine. Each run under bench/smi.py; per step the step, rollout and
train seconds from metrics.jsonl. OUT/compile_ab.json (SWITCH dynamic) or OUT/SWITCH_ab.json:
{"device", "steps", "switch", "runs": [{"config", "budget_gb", "variant", "rc", "peak_gb", "step_s": [...],
"train_s": [...], "first_two_s", "steady_step_s" (median of steps 3+), "steady_train_s", "steady_step_min_s" (the
fastest of steps 3+), "planned_phases_gb" (the
run's plan.json), "steady_phase_peaks_gb" (the trainer's torch-allocated and nvidia-smi peaks of the rollout and train
phases over steps 3+)}], "by_config": {config:
{"first_two_s_saved", "steady_step_ratio" (switch on / default), "steady_train_ratio", "steady_step_min_ratio"}}}. Keep a switch on by
default only where its steady step is not slower (ratio <= 1.02), its peak within the plan, and, for dynamic, where it
saves time in the first steps. eager_rounding runs the other way round (the switch restores inductor's rounding, the
old default): eager rounding stays the default while it costs at most 5% (ratio >= 0.95, issue 27's bar).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# 2.9 GB was refused on the H200 (2026-12-03, rc 2): the planner now asks at least 3.11 GB for config A
NO_OFFLOAD = ["train.activation_offload=false", "model.gradient_checkpointing=true"]
CONFIGS = {"A-fast": (6.6, []), "A-small": (3.3, []),
           "A-mb286": (6.6, NO_OFFLOAD + ["train.micro_batch_tokens=286", "rollout.kv_release=false",
                                          "rollout.weight_format=shared_nf4"]),
           # the same with sampled completion lengths (log-normal, median 120 of 256 tokens: the random-init model
           # never stops on its own), as real GRPO's: the micro-batches' shapes change every step
           "A-mb286-mix": (6.6, NO_OFFLOAD + ["train.micro_batch_tokens=286", "rollout.kv_release=false",
                                              "rollout.weight_format=shared_nf4",
                                              "rollout.length_mix={median: 120, sigma: 0.6, min_tokens: 16}"]),
           "A-no-offload": (6.6, NO_OFFLOAD), "A-hf": (6.6, ["rollout.engine=hf"]),
           # config A and B (64 x 512) at their fast budgets on the bf16 mirror (the format the planner took there on
           # the H200, 2026-12-02), for rollout.sync merge against vLLM's LoRA slots
           "A-mirror": (6.6, ["rollout.weight_format=bf16_mirror"]),
           "B-mirror": (14.5, ["rollout.weight_format=bf16_mirror", "train.generation_batch_size=64",
                               "grpo.max_completion_length=512"]),
           # the same eight 286-token micro-batches on the 0.5B shape: a second shape for a switch's memory term
           "0.5b-mb286": (6.6, NO_OFFLOAD + ["train.micro_batch_tokens=286", "rollout.kv_release=false",
                                             "rollout.weight_format=shared_nf4", "model.shape=qwen2.5-0.5b"])}
# switch: (environment variable, its value when on, the configs it is measured on); "--set": a recipe override
SWITCHES = {"dynamic": ("TRAINER_COMPILE_DYNAMIC", "1", ["A-fast", "A-small"]),
            "ckpt_in_graph": ("--set", "train.checkpoint_in_graph=true", ["A-mb286", "A-no-offload", "0.5b-mb286"]),
            "nf4_traced": ("TRAINER_NF4_TRACED", "1", ["A-mb286", "A-small"]),
            "eager_rounding": ("TRAINER_COMPILE_EAGER_ROUNDING", "0", ["A-fast", "A-mb286"]),
            "hf_compile": ("--set", "train.torch_compile=true", ["A-hf"]),
            "hf_decode": ("--set", "rollout.hf_compile=true", ["A-hf"]),
            "gc_freeze": ("TRAINER_GC_FREEZE", "1", ["A-mb286", "A-fast"]),
            "dynamic_dims": ("TRAINER_COMPILE_DYNAMIC_DIMS", "1", ["A-fast", "A-small"]),
            "input_grad": ("TRAINER_COMPILE_INPUT_GRAD", "1", ["B-mirror", "A-small"]),
            "sampler_rounding": ("TRAINER_SAMPLER_ROUNDING", "1", ["A-fast", "A-mb286"]),
            "fp16": ("--set", "model.dtype=float16", ["A-fast", "A-mb286"]),
            "lora_merge": ("--set", "rollout.sync=merge", ["A-mirror", "B-mirror"]),
            "mirror_views": ("TRAINER_MIRROR_VIEWS", "1", ["A-mirror", "B-mirror"]),
            "mirror_direct": ("TRAINER_MIRROR_DIRECT", "1", ["A-mirror", "B-mirror"]),
            "train_cudagraphs": ("TRAINER_COMPILE_CUDAGRAPHS", "1", ["A-mb286-mix", "0.5b-mb286"]),
            # CUDA graphs at a small budget: with the in-graph checkpoint recomputing every op
            # (TRAINER_CKPT_RECOMPUTE_ALL) they fit config A at 3.3 GB, where the graphs alone are not planned
            "small_graphs": (("TRAINER_COMPILE_CUDAGRAPHS", "TRAINER_CKPT_RECOMPUTE_ALL"), "1", ["A-small"]),
            # vLLM's LoRA kernels under the configs bench/lora_tune.py wrote earlier in the sitting (queue item
            # `lora_tune` before it), against vLLM's defaults: the fast budget (bf16 mirror) and the small one
            "lora_tuned": ("VLLM_TUNED_CONFIG_FOLDER", os.environ.get("SITTING_ROOT", "/root") + "/results/lora_tune/configs",
                           ["A-fast", "A-small"])}
# a switch's value in the runs that leave it off, where unset is not off (the checkpoint in graph is the planner's
# choice since 2026-12-05: unset, the default run could take it too; input_grad on by default since 2026-12-06;
# mirror_views on by default since 2026-12-05, trainer/plan.py MIRROR_VIEWS; sampler_rounding the plan's choice on the
# mirror's rows since 2026-12-07, Plan.sampler_rounding)
OFF = {"ckpt_in_graph": "train.checkpoint_in_graph=false", "lora_merge": "rollout.sync=inplace",
       "mirror_views": "0", "input_grad": "0", "sampler_rounding": "0",
       # model.dtype auto plans float16 where vLLM samples since 2026-12-07 (trainer/plan.py FLOAT16_WHERE_VLLM_SAMPLES)
       "fp16": "model.dtype=bfloat16",
       # the shipped configs (trainer/rollout/lora_kernels.py) cover config A on an H100 since 2026-12-07: a folder
       # that does not exist gives vLLM's defaults (a folder the user set is left as it is)
       "lora_tuned": "/nonexistent/vllm-default-lora-configs",
       # the plan weighs CUDA graphs and the checkpoint recomputing every op by default since 2026-12-08
       # (trainer/plan.py CUDAGRAPHS, RECOMPUTE_ALL): the off runs set them to 0
       "train_cudagraphs": "0", "small_graphs": "0"}


def _vars(var: str | tuple) -> tuple:
    """A switch's environment variables: one, or several set together (small_graphs)."""
    return var if isinstance(var, tuple) else (var,)


def run_one(out: Path, config: str, switch: str, variant: str, steps: int) -> dict:
    from bench.smi import watched
    from trainer.metrics import read_metrics
    from trainer.plan import run_plan

    budget, overrides = CONFIGS[config]
    # a switch's own default run, so that two switches' A/Bs in one sitting keep both
    name = f"{config}_{variant}" if variant != "default" or "+" in switch else f"{config}_default_for_{switch}"
    run_dir = Path(os.environ.get("RUNS", "/root/runs")) / f"compile_ab_{name}"
    switch_vars = {v for var, _, _ in SWITCHES.values() for v in _vars(var)}  # each run sets the ones it measures
    env = {k: v for k, v in os.environ.items() if k not in switch_vars}
    on = [] if variant.startswith("default") else variant.split("+")  # a ladder's rung sets several
    for part in switch.split("+"):
        var, value, _ = SWITCHES[part]
        value = value if part in on else OFF.get(part)
        if value is None:  # off, and unset is off
            continue
        if var == "--set":
            overrides = overrides + [value]
        else:
            env.update(dict.fromkeys(_vars(var), value))
    cmd = [sys.executable, "-m", "trainer.cli", "bench/peers/ours.yaml", "--output-dir", str(run_dir), "--overwrite",
           "--set", f"train.max_steps={steps}", "--set", f"budget.vram_gb={budget}"]
    for o in overrides:
        cmd += ["--set", o]
    rc = watched(out / f"{name}.smi.json", out / f"{name}.log", cmd, {**env, "SMI_GPUS": "0"})
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    smi = json.loads((out / f"{name}.smi.json").read_text()) if (out / f"{name}.smi.json").exists() else {}
    step = [r["time_step_s"] for r in rows]
    train = [r["time_step_s"] - r.get("time_rollout_s", 0.0) for r in rows]
    plan = run_plan(run_dir) or {}
    return {"config": config, "budget_gb": budget, "variant": variant, "rc": rc, "command": " ".join(cmd[1:]),
            "peak_gb": smi.get("peak_gb"), "step_s": step, "train_s": train,
            "planned_phases_gb": {k: round(v / 1e9, 3) for k, v in (plan.get("phase_peaks") or {}).items()},
            "steady_phase_peaks_gb": steady_phase_peaks(rows),
            # what torch.compile spent in each step (trainer/metrics.py CompileWatch): a steady step that compiles
            # is the guard variants, not the switch's kernels
            "compile_s": [r.get("time_compile_s") for r in rows],
            # the train phase's CUDA graphs held after each step (trainer/graph_lengths.py): flat after the first
            # steps where they replay, growing where each step records anew
            "cuda_graphs": [r.get("cuda_graphs") for r in rows],
            "first_two_s": sum(step[:2]) if len(step) >= 2 else None,
            "steady_step_s": statistics.median(step[2:]) if len(step) > 2 else None,
            "steady_train_s": statistics.median(train[2:]) if len(train) > 2 else None,
            # the fastest steady step: a host's hiccup (the sync or optimizer doubling in one step, H100 2026-12-07)
            # moves a median of six steps by several percent, the minimum not
            "steady_step_min_s": min(step[2:]) if len(step) > 2 else None,
            # the sampler/trainer log-prob gap of each step (what sampler_rounding is for)
            "gap_mean": [r["logp_gap_mean"] for r in rows if "logp_gap_mean" in r]}


def steady_phase_peaks(rows: list[dict]) -> dict:
    """The trainer's own per-phase peaks (trainer/metrics.py: torch's allocated bytes and nvidia-smi's used) over steps
    3+, the rollout phase and the train phase apart (trainer/replan.py's sub-phases of each): what a plan is held to."""
    from trainer.replan import SUBPHASES

    out = {}
    for kind in ("torch_alloc", "used"):
        for ph, subs in SUBPHASES.items():
            got = [r[f"peak_{kind}_{s}_gb"] for r in rows[2:] for s in subs if f"peak_{kind}_{s}_gb" in r]
            if got:
                out[f"{kind}_{ph}"] = round(max(got), 3)
    return out


def compare(runs: list[dict]) -> dict:
    by: dict = {}
    for config in dict.fromkeys(r["config"] for r in runs):
        got = {r["variant"]: r for r in runs if r["config"] == config and r["steady_step_s"]}
        if len(got) == 2 and "default" in got:
            d, x = got.pop("default"), got.popitem()[1]
            by[config] = {"first_two_s_saved": round(d["first_two_s"] - x["first_two_s"], 2),
                          "steady_step_ratio": round(x["steady_step_s"] / d["steady_step_s"], 3),
                          "steady_train_ratio": round(x["steady_train_s"] / d["steady_train_s"], 3)}
            if d.get("steady_step_min_s") and x.get("steady_step_min_s"):
                by[config]["steady_step_min_ratio"] = round(x["steady_step_min_s"] / d["steady_step_min_s"], 3)
    return by


def ladder(runs: list[dict]) -> dict:
    """A ladder's rungs (default, a, a+b, ...; default again last): each rung's steady step and train phase against
    the rung below it and against the two defaults' mean (the machine's drift over the ladder shows between them)."""
    by: dict = {}
    for config in dict.fromkeys(r["config"] for r in runs):
        rungs = [r for r in runs if r["config"] == config and r["steady_step_s"]]
        base = [r for r in rungs if r["variant"].startswith("default")]
        if not base:
            continue
        d_step = statistics.mean(r["steady_step_s"] for r in base)
        d_train = statistics.mean(r["steady_train_s"] for r in base)
        prev, rows = base[0], {}
        for r in (r for r in rungs if not r["variant"].startswith("default")):
            step, train = r["steady_step_s"], r["steady_train_s"]
            rows[r["variant"]] = {"steady_step_ratio": round(step / d_step, 3),
                                  "steady_train_ratio": round(train / d_train, 3),
                                  "steady_step_ratio_vs_rung_below": round(step / prev["steady_step_s"], 3),
                                  "steady_train_ratio_vs_rung_below": round(train / prev["steady_train_s"], 3)}
            prev = r
        by[config] = {"defaults_steady_step_s": [r["steady_step_s"] for r in base], "rungs": rows}
    return by


def _shape(config: str) -> str:
    """The model shape a config runs: bench/peers/ours.yaml's unless its overrides set another."""
    import yaml

    sets = [o.split("=", 1)[1] for o in CONFIGS[config][1] if o.startswith("model.shape=")]
    return sets[-1] if sets else yaml.safe_load(Path("bench/peers/ours.yaml").read_text())["model"]["shape"]


def main(out: Path, steps: int, switch: str = "dynamic") -> dict:
    """SWITCH a+b+...: a ladder on the configs all of them are measured on: default, a, a+b, ..., default again (one
    run each, ~100 s of start-up apiece: three switches for about the device time of two separate A/Bs)."""
    import torch

    from trainer.shapes import model_dir_apart

    out.mkdir(parents=True, exist_ok=True)
    parts = switch.split("+")
    if len(parts) > 1:
        rungs = ["default"] + ["+".join(parts[:k]) for k in range(1, len(parts) + 1)] + ["default_again"]
        plan = [(c, v) for c in SWITCHES[parts[0]][2] if all(c in SWITCHES[p][2] for p in parts) for v in rungs]
    else:  # the two variants alternated across configs, so neither always runs on a warmer machine
        plan = [(c, v) for i, c in enumerate(SWITCHES[switch][2])
                for v in (["default", switch] if i % 2 == 0 else [switch, "default"])]
    for shape in sorted({_shape(c) for c, _ in plan}):  # the first run of a shape in a sitting would build it on
        model_dir_apart(shape)  # the GPU in the measured process: 4.40 GB against a 3.3 GB budget (H100, 2026-12-07)
    runs = []
    for config, variant in plan:
        runs.append(run_one(out, config, switch, variant, steps))
        print(json.dumps({k: v for k, v in runs[-1].items() if k not in ("step_s", "train_s", "command")}), flush=True)
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "steps": steps,
           "switch": switch, "command": f"python bench/compile_ab.py OUT {steps} {switch}", "runs": runs,
           "by_config": ladder(runs) if len(parts) > 1 else compare(runs)}
    name = (f"ladder_{switch}_ab.json" if len(parts) > 1 else
            "compile_ab.json" if switch == "dynamic" else f"{switch}_ab.json")
    (out / name).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["by_config"]), flush=True)
    return res


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    if len(sys.argv) > 3 and not all(p in SWITCHES for p in sys.argv[3].split("+")):
        raise SystemExit(f"unknown switch {sys.argv[3]!r}: one of {', '.join(SWITCHES)}, or several joined by +")
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10,
         sys.argv[3] if len(sys.argv) > 3 else "dynamic")
