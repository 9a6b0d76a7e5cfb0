"""`train RECIPE.yaml`: the command users run (and `train eval|export|generate`, trainer/commands.py). Turns user
errors into one message and exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from trainer.errors import EXIT_NONFINITE, EXIT_OOM, USER_ERROR_EXIT, UserError
from trainer.fp16_range import Float16Overflow, overflowed_in_training
from trainer.oom import OutOfMemory


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description="GRPO + LoRA fine-tuning from a YAML recipe.",
                                epilog="on a trained run: train eval RECIPE --checkpoint DIR | train export RUN_DIR "
                                       "--merged OUT | train generate RUN_DIR --prompt TEXT (see train COMMAND -h)")
    p.add_argument("recipe", help="path of the recipe YAML, e.g. recipes/tiny-cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set grpo.beta=0.04 (repeatable)")
    p.add_argument("--plan", action="store_true", help="print the VRAM plan and exit without loading weights")
    p.add_argument("--json", action="store_true", help="with --plan: print the plan (and its alternatives) as JSON")
    p.add_argument("--gpu", metavar="GB[:fp16][:smXY]",
                   help="with --plan: plan for a CUDA GPU of this many GB that is not on this machine (a Slurm login "
                        "node, a laptop before renting one), e.g. --gpu 24; ':fp16' for a card without bfloat16 "
                        "(T4, V100), ':smXY' for its compute capability (--gpu 80:sm90 an H100, 15:fp16:sm75 a T4)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of the run dir, or the given checkpoint dir; "
                        "'auto': continue if a checkpoint exists, else start fresh (for requeued jobs)")
    p.add_argument("--output-dir", help="run directory (default: train.output_dir or runs/<recipe name>)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    return p


def main(argv: list[str] | None = None) -> int:
    from trainer import commands

    argv = sys.argv[1:] if argv is None else argv
    args = (commands.parser() if argv and argv[0] in commands.NAMES else parser()).parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no optional CPU kernels package" noise
    from trainer.console import make_console

    console = make_console()
    try:
        return _main(args, console)
    except UserError as e:
        if isinstance(e, Float16Overflow) and e.restart and restartable(args):
            console.print(f"[yellow]{e.field}: {e.problem}[/]\nmodel.dtype auto: starting again in bfloat16"
                          f"{' from the last checkpoint' if e.resume else ''} (set model.dtype: bfloat16 to start "
                          f"there)", highlight=False, soft_wrap=True)
            restart(argv, args, e.restart, e.resume)  # does not return
        console.print(f"[bold red]error[/] {e.message}", highlight=False, soft_wrap=True)
        return USER_ERROR_EXIT
    except OutOfMemory as e:
        console.print(f"[bold red]out of memory[/] {e}", highlight=False, soft_wrap=True)
        return EXIT_OOM
    except KeyboardInterrupt:
        console.print("[yellow]interrupted")
        return 130


def restartable(args) -> bool:
    """Whether this `train` (or `train eval`, which takes --set too) may start itself again: one process that torchrun
    did not launch (a rank's exec would leave its peers in the old rendezvous)."""
    return (getattr(args, "command", None) in (None, "eval") and "TORCHELASTIC_RUN_ID" not in os.environ
            and os.environ.get("WORLD_SIZE", "1") == "1")


def restart(argv: list[str], args, overrides: list[str], resume: str | None = None) -> None:
    """Replace this process with `train` on the same arguments plus `overrides` (fp16_range's bfloat16 restart): its
    GPU memory and vLLM's engine go with the old image. `resume`: the new one's --resume (the last of two wins).
    Else a fresh run's directory holds only what this process wrote (resume_point refused or cleared anything
    else), so the new one starts over it; a resumed run resumes again."""
    extra = [a for o in overrides for a in ("--set", o)]
    if resume is not None:
        extra += ["--resume", resume]
    elif not getattr(args, "command", None) and args.resume is None and not args.overwrite:
        extra.append("--overwrite")
    exec_clean([sys.executable, "-m", "trainer.cli", *argv, *extra])


def exec_clean(cmd: list[str]) -> None:
    """os.execv with every descriptor above stderr closed first: a device file left open across exec would keep the old
    image's CUDA context, and the memory it holds, beside the new one's. On an H100 (driver 580.159.04) a plain execv
    left nothing either (bench/results/exec_release_2026-12-07); the close keeps it so where a driver or library
    opens without close-on-exec. tests/test_fp16_range.py measures it on the GPU."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.execv(cmd[0], cmd)


def _main(args, console) -> int:
    from trainer import api, commands
    from trainer.console import alternatives_table, show_plan

    if getattr(args, "command", None):
        return commands.run(args, console)
    if args.gpu is not None and not args.plan:
        raise UserError("--gpu", "--gpu plans for a GPU that is not on this machine; it cannot train on one",
                        f"add --plan (train {args.recipe} --plan --gpu {args.gpu}), or drop --gpu to train here")
    if args.plan:
        from trainer.plan import Device

        device = Device.elsewhere(args.gpu) if args.gpu is not None else None
        recipe, the_plan = api.plan(args.recipe, args.overrides, device=device)
        alternatives = api.plan_alternatives(recipe, the_plan, device=device)
        if args.json:
            import json
            from dataclasses import asdict

            print(json.dumps({**asdict(the_plan), "alternatives": alternatives}, indent=2))
        else:
            show_plan(console, the_plan)
            console.print(alternatives_table(alternatives, the_plan.rollout_engine))
        return 0
    code, run_dir = api.train(args.recipe, args.overrides, args.output_dir, args.resume, args.overwrite, console)
    if code == EXIT_NONFINITE and restartable(args):
        stop = overflowed_in_training(run_dir)
        if stop is not None:
            raise stop  # main's handler starts the run again in bfloat16 from its last checkpoint
    return code

if __name__ == "__main__":
    sys.exit(main())
