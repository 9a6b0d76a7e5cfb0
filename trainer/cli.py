"""`train RECIPE.yaml`: the command users run. Turns user errors into one message and exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from trainer.errors import EXIT_OOM, USER_ERROR_EXIT, UserError
from trainer.oom import OutOfMemory


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description="GRPO + LoRA fine-tuning from a YAML recipe.")
    p.add_argument("recipe", help="path of the recipe YAML, e.g. recipes/tiny-cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set grpo.beta=0.04 (repeatable)")
    p.add_argument("--plan", action="store_true", help="print the VRAM plan and exit without loading weights")
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of the run dir, or the given checkpoint dir; "
                        "'auto': continue if a checkpoint exists, else start fresh (for requeued jobs)")
    p.add_argument("--output-dir", help="run directory (default: train.output_dir or runs/<recipe name>)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no optional CPU kernels package" noise
    from rich.console import Console

    console = Console()
    try:
        return _main(args, console)
    except UserError as e:
        console.print(f"[bold red]error[/] {e.message}", highlight=False, soft_wrap=True)
        return USER_ERROR_EXIT
    except OutOfMemory as e:
        console.print(f"[bold red]out of memory[/] {e}", highlight=False, soft_wrap=True)
        return EXIT_OOM
    except KeyboardInterrupt:
        console.print("[yellow]interrupted")
        return 130


def _main(args, console) -> int:
    from trainer import distributed
    from trainer.console import plan_table
    from trainer.plan import Device, make_plan
    from trainer.policy import read_config
    from trainer.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    world = distributed.init() if not args.plan else distributed.World()
    plan = make_plan(read_config(recipe.model), recipe, Device.detect(world.size))
    if args.plan:
        if args.json:
            print(plan.to_json())
        else:
            console.print(plan_table(plan))
        return 0
    run_dir = Path(args.output_dir or recipe.train.output_dir or Path("runs") / recipe.name)
    # rank 0 decides (and may clear the directory); the others take its answer
    resume = distributed.broadcast_object(_resume_point(run_dir, args) if world.main else None, world)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "plan.json").write_text(plan.to_json())
        (run_dir / "recipe.json").write_text(recipe.model_dump_json(indent=2))
        console.print(plan_table(plan))
    from trainer.grpo import run

    code = run(recipe, plan, run_dir, world, resume=resume, console=console)
    if world.main:
        _summary(run_dir, plan, console)
    distributed.shutdown(world)
    return code


def _resume_point(run_dir: Path, args) -> Path | None:
    from trainer import checkpoint

    if args.resume == "auto":  # Slurm requeue: continue when a checkpoint exists, else start (over)
        found = checkpoint.latest(run_dir)
        if found is None and run_dir.exists():
            shutil.rmtree(run_dir)
        return found
    if args.resume is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            if not args.overwrite:
                raise UserError("output dir", f"{run_dir} already holds a run",
                                "pass --resume to continue it, --overwrite to start over, or --output-dir elsewhere")
            shutil.rmtree(run_dir)
        return None
    if args.resume == "latest":
        found = checkpoint.latest(run_dir)
        if found is None:
            raise UserError("--resume", f"no complete checkpoint under {run_dir / 'checkpoints'}",
                            "start without --resume, or give --output-dir of the run to continue")
        return found
    path = Path(args.resume)
    if not path.is_dir():
        raise UserError("--resume", f"checkpoint not found: {path}", "give a checkpoints/step-NNNNNNN directory")
    return path


def _summary(run_dir: Path, plan, console) -> None:
    """Predicted vs measured peak, and the reward at the start and end of the run."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not lines:
        return
    first = [m["reward_mean"] for m in lines[:10]]
    last = [m["reward_mean"] for m in lines[-10:]]
    summary = {"steps": lines[-1]["step"], "reward_first10": sum(first) / len(first),
               "reward_last10": sum(last) / len(last), "predicted_peak_gb": plan.peak_bytes / 1e9,
               "measured_peak_gb": max(m.get("peak_memory_gb", 0.0) for m in lines)}
    try:
        import torch

        if torch.cuda.is_available():
            summary["torch_max_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
            summary["torch_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    except Exception:
        pass
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"mean reward: first 10 steps {summary['reward_first10']:.4f}, last 10 steps "
                  f"{summary['reward_last10']:.4f} | peak memory predicted {summary['predicted_peak_gb']:.2f} GB, "
                  f"measured {summary['measured_peak_gb']:.2f} GB | run dir {run_dir}")


if __name__ == "__main__":
    sys.exit(main())
