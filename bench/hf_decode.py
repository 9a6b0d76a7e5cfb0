"""HF-generate rollouts, eager decode steps against the compiled one (rollout.hf_compile, trainer/rollout/hf.py): the
seconds a token step takes, and what the first call spends compiling. CPU or GPU; the model of any recipe.

    python bench/hf_decode.py OUT.json [RECIPE] [ROUNDS] [--set KEY=VALUE ...]

RECIPE defaults to bench/peers/ours.yaml (the 1.5B shape of config A) with `rollout.engine: hf`; the plan is made for
this machine (budget none) and the engine takes hf_batch_size rows a call (the recipe's generation_batch_size unless
set). Both engines sample from one policy the same prompts (random token ids of the recipe's prompt length), every
completion to max_completion_length (ignore_eos), sampled at the recipe's temperature: a first call (the compiled one
compiles and captures here), then ROUNDS (default 3) timed calls each, the two alternated. OUT.json: {"device",
"recipe", "command", "layers", "batch", "prompt_tokens", "completion_tokens", "first_call_s": {variant},
"calls_s": {variant: [...]}, "ms_per_token_step": {variant: median / completion_tokens}, "ms_per_layer_and_step",
"speedup" (eager / compiled), "greedy_tokens_equal" (one greedy call of each: the fraction of equal tokens),
"failed" ({variant: the traceback's end} for an engine whose call raised; the other's numbers are kept),
"peak_allocated_gb" (GPU: torch's peak over each engine's calls, the policy included), "planned_gb" (the plan's hf_*
components for the compiled engine's knobs: is its static cache and graph pool priced right)}.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path, recipe_path: Path, rounds: int, overrides: list[str]) -> dict:
    import torch

    from trainer.plan import Device, make_plan
    from trainer.policy import load_policy, read_config
    from trainer.recipe import load_recipe
    from trainer.rollout.hf import HFEngine
    from trainer.types import Sampling

    recipe = load_recipe(recipe_path, ["rollout.engine=hf", "rollout.hf_compile=true", "budget.vram_gb=null",
                                       *overrides])  # planned for the compiled engine; the policy is the same
    device = Device.detect()
    plan = make_plan(read_config(recipe.model), recipe, device)
    policy = load_policy(recipe, plan)
    layers = policy.model.get_base_model().config.num_hidden_layers
    g = recipe.grpo
    prompt_len = min(recipe.data.max_prompt_length, plan.max_model_len - g.max_completion_length)
    gen = torch.Generator().manual_seed(0)
    vocab = min(policy.model.get_base_model().config.vocab_size, len(policy.tokenizer))
    prompts = [torch.randint(10, vocab, (prompt_len,), generator=gen).tolist()
               for _ in range(max(1, plan.hf_batch_size // g.num_generations))]
    engines = {"eager": HFEngine(plan.hf_batch_size),
               "compiled": HFEngine(plan.hf_batch_size, compiled_decode=True, max_len=plan.max_model_len)}
    sampling = Sampling(n=min(g.num_generations, plan.hf_batch_size), max_tokens=g.max_completion_length,
                        temperature=g.temperature, seed=0, ignore_eos=True)

    peaks: dict[str, int] = {}

    def call(name: str, s: Sampling = sampling):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = engines[name].generate(prompts, s)
        if cuda:
            torch.cuda.synchronize()
            peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
        return time.perf_counter() - t, res

    first, calls, failed = {}, {name: [] for name in engines}, {}

    def timed(name: str, s: Sampling = sampling):
        """call(name), or None once that engine has failed (a kernel CUDA graphs cannot capture, say): the other
        engine's numbers are kept and the traceback's end goes into the results."""
        if name in failed:
            return None
        try:
            return call(name, s)
        except Exception as e:  # noqa: BLE001
            import traceback

            failed[name] = "".join(traceback.format_exception(e))[-4000:]
            return None

    for name, e in engines.items():
        e.attach(policy)
        if (t := timed(name)) is not None:
            first[name] = round(t[0], 3)
    for i in range(rounds):
        for name in (engines if i % 2 == 0 else list(engines)[::-1]):
            if (t := timed(name)) is not None:
                calls[name].append(round(t[0], 4))
    greedy = Sampling(n=sampling.n, max_tokens=g.max_completion_length, temperature=0.0, ignore_eos=True)
    a, b = timed("eager", greedy), timed("compiled", greedy)
    same = None if a is None or b is None else sum(
        x == y for ra, rb in zip(a[1].completion_ids, b[1].completion_ids) for x, y in zip(ra, rb)) / max(
        1, sum(len(r) for r in a[1].completion_ids))
    ms = {name: 1e3 * statistics.median(v) / g.max_completion_length for name, v in calls.items() if v}
    res = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "recipe": str(recipe_path), "command": " ".join(["python", "bench/hf_decode.py", *sys.argv[1:]]),
           "layers": layers, "batch": plan.hf_batch_size, "prompt_tokens": prompt_len,
           "completion_tokens": g.max_completion_length, "first_call_s": first, "calls_s": calls,
           "ms_per_token_step": {k: round(v, 3) for k, v in ms.items()},
           "ms_per_layer_and_step": {k: round(v / layers, 4) for k, v in ms.items()},
           "speedup": round(ms["eager"] / ms["compiled"], 3) if len(ms) == 2 else None,
           "greedy_tokens_equal": None if same is None else round(same, 4), "failed": failed,
           "peak_allocated_gb": {k: round(v / 1e9, 3) for k, v in peaks.items()},  # torch's, over each engine's calls
           "planned_gb": {k: round(v / 1e9, 3) for k, v in plan.components.items() if k.startswith("hf_")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "calls_s"}), flush=True)
    return res


if __name__ == "__main__":
    args = sys.argv[1:]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    pos = [a for i, a in enumerate(args) if a != "--set" and (i == 0 or args[i - 1] != "--set")]
    if not pos:
        raise SystemExit(__doc__)
    main(Path(pos[0]), Path(pos[1]) if len(pos) > 1 else ROOT / "bench" / "peers" / "ours.yaml",
         int(pos[2]) if len(pos) > 2 else 3, sets)
