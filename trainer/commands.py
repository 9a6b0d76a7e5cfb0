"""`train eval | export | generate`: the commands that work on a trained run; cli.py dispatches to them.

`train RECIPE.yaml ...` stays the training command: a first argument that names one of these commands selects it.
Each command's errors are UserErrors (one message, exit code 2), raised before any weight loads where possible.
"""
from __future__ import annotations

import argparse
import json

from trainer.errors import UserError

NAMES = ("eval", "export", "generate")


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description="Commands on a trained run (train RECIPE.yaml trains).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{eval,export,generate}")
    e = sub.add_parser("eval", help="evaluate a checkpoint on the recipe's eval section",
                       description="Evaluate a checkpoint's adapter on the recipe's eval section (without one: on "
                                   "its data section's rows, greedy). Prints a table and writes JSON: the metrics "
                                   "and every completion with its rewards.")
    e.add_argument("recipe", help="the recipe YAML (its eval section says what to evaluate on)")
    e.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a runs/<name>/checkpoints/step-NNNNNNN directory, or a peft adapter directory")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set eval.num_samples=8 --set eval.temperature=1.0")
    e.add_argument("--output", metavar="FILE", help="where to write the JSON (default: DIR/eval.json)")

    x = sub.add_parser("export", help="write the merged model and/or the adapter of a run",
                       description="Export a run's checkpoint: --merged writes the LoRA merged into the "
                                   "dequantized base as a Hugging Face checkpoint (transformers and vLLM load it), "
                                   "--adapter the peft adapter alone; both with a README.md model card.")
    x.add_argument("run_dir", help="the run directory, e.g. runs/tiny-cpu")
    x.add_argument("--step", type=_positive, help="checkpoint step (default: the latest complete checkpoint)")
    x.add_argument("--merged", metavar="OUT", help="directory for the merged model")
    x.add_argument("--adapter", metavar="OUT", help="directory for the peft adapter")
    x.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the merged weights (default bfloat16)")

    g = sub.add_parser("generate", help="sample from a run's trained policy",
                       description="Sample from a run's policy with the recipe's prompt rendering (template, "
                                   "system prompt, chat template); vLLM when the recipe uses it and it can run "
                                   "here, else HF generate.")
    g.add_argument("run_dir", help="the run directory, e.g. runs/tiny-cpu")
    g.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeatable)")
    g.add_argument("--prompts-file", metavar="FILE",
                   help="one prompt per line, or a .jsonl/.json/.parquet/.csv file of rows like the recipe's data")
    g.add_argument("--step", type=_positive, help="checkpoint step (default: the latest complete checkpoint)")
    g.add_argument("--n", type=_positive, default=1, help="completions per prompt (default 1)")
    g.add_argument("--max-tokens", type=_positive, help="completion length (default: grpo.max_completion_length)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (default: sample at grpo.temperature)")
    g.add_argument("--temperature", type=float, help="sampling temperature (default: grpo.temperature)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def run(args, console) -> int:
    return {"eval": _eval, "export": _export, "generate": _generate}[args.command](args, console)


def _eval(args, console) -> int:
    from trainer import api

    api.evaluate(args.recipe, args.checkpoint, args.overrides, args.output, console)
    return 0


def _export(args, console) -> int:
    from trainer import checkpoint, export

    if not args.merged and not args.adapter:
        raise UserError("export", "nothing to write", "pass --merged OUT (the merged model) and/or --adapter OUT")
    ckpt = checkpoint.find(args.run_dir, args.step)  # before any weight loads
    console.print(f"exporting {ckpt}", highlight=False, soft_wrap=True)
    if args.adapter:
        out = export.export_adapter(args.run_dir, args.adapter, args.step)
        console.print(f"adapter written: {out}", highlight=False, soft_wrap=True)
    if args.merged:
        out = export.export_merged(args.run_dir, args.merged, args.step, args.dtype)
        console.print(f"merged model ({args.dtype}) written: {out}", highlight=False, soft_wrap=True)
    return 0


def _generate(args, console) -> int:
    from rich.markup import escape

    from trainer import api

    if args.greedy and args.temperature is not None:
        raise UserError("--greedy", "given with --temperature", "pass one of them")
    if args.greedy and args.n > 1:
        raise UserError("--greedy", f"with --n {args.n} gives the same completion {args.n} times",
                        "sample instead (drop --greedy) or use --n 1")
    records = api.generate(args.run_dir, args.prompts, args.prompts_file, args.step, args.n, args.max_tokens,
                           args.greedy, args.temperature, args.seed, None if args.json else console)
    for r in records:
        if args.json:
            print(json.dumps(r))
            continue
        prompt = r["prompt"]
        if isinstance(prompt, list):  # chat messages: show the last user turn
            prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), str(prompt))
        console.print(f"[bold]prompt[/] {escape(str(prompt))}", highlight=False, soft_wrap=True)
        for k, (text, cut) in enumerate(zip(r["completions"], r["truncated"])):
            console.print(f"[bold]{k + 1}[/] {escape(text)}" + (" [dim](cut at the length limit)" if cut else ""),
                          highlight=False, soft_wrap=True)
    return 0
