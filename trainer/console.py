"""Terminal output: a rich progress bar with a line per step, and the plan as a table. Nothing else prints."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainer.memory import GB


class Progress:
    def __init__(self, console: Console | None, total: int, start: int, enabled: bool = True):
        self.console = console or Console()
        self.enabled = enabled
        self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[reward]}"), console=self.console, transient=False,
                                disable=not enabled)
        self.task = self.bar.add_task("train", total=total, completed=start, reward="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def update(self, metrics: dict, text: str) -> None:
        if not self.enabled:
            return
        self.bar.console.print(text, highlight=False)
        self.bar.update(self.task, advance=1, reward=f"reward {metrics['reward_mean']:+.3f}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.console.print(f"[yellow]{text}")


def plan_table(plan) -> Table:
    t = Table(title=f"VRAM plan: {plan.device_name} ({plan.device})", show_lines=False, caption_justify="left")
    t.add_column("component")
    t.add_column("GB", justify="right")
    for name, b in sorted(plan.components.items(), key=lambda kv: -kv[1]):
        t.add_row(name, f"{b / GB:.3f}")
    for phase, b in plan.phase_peaks.items():
        t.add_row(f"[bold]peak, {phase} phase", f"[bold]{b / GB:.3f}")
    budget = "none" if plan.budget_bytes is None else f"{plan.budget_bytes / GB:.2f}"
    t.add_row("[bold]budget", f"[bold]{budget}")
    if plan.allocator_cap_bytes is not None:
        t.add_row(f"torch allocator cap ({plan.allocator_fraction:.4f} of the GPU)", f"{plan.allocator_cap_bytes / GB:.3f}")
    t.caption = (f"engine {plan.rollout_engine}, dtype {plan.compute_dtype}, 4-bit {plan.quantized}, "
                 f"checkpointing {plan.gradient_checkpointing},\nmicro-batch {plan.micro_batch_tokens} tokens, "
                 f"logits tile {plan.token_chunk}x{plan.vocab_chunk}")
    if plan.rollout_engine == "vllm":
        t.caption += (f"\nvLLM: {plan.weight_format}, KV {plan.kv_cache_memory_bytes / GB:.3f} GB for "
                      f"{plan.max_num_seqs} seqs x {plan.max_model_len} tokens, batched tokens "
                      f"{plan.max_num_batched_tokens}, graphs {plan.cudagraph_capture_sizes or 'eager'}, "
                      f"KV released while training: {plan.kv_release}")
    for n in plan.notes:
        t.caption += f"\n{n}"
    return t


def alternatives_table(alts: dict, engine: str) -> Table:
    """The fastest and the smallest plans that fit the budget (trainer.plan.alternatives), side by side."""
    budget = "no budget" if alts["budget_bytes"] is None else f"{alts['budget_bytes'] / GB:.2f} GB"
    t = Table(title=f"What {budget} buys: {alts['fitting']} of {alts['candidates']} plans fit", caption_justify="left")
    columns = ["plan", "micro-batch", "ckpt"] + (["weights", "KV rel."] if engine == "vllm" else [])
    for c in columns + ["peak GB", "step s (pred.)", "rank"]:
        t.add_column(c, justify="left" if c == "plan" else "right")
    rows = [("fastest (chosen)", alts["fastest"]), ("smallest", alts["smallest"])]
    if "fastest_any_budget" in alts:
        rows.append(("fastest, any budget", alts["fastest_any_budget"]))
    for name, r in rows:
        knobs = [str(r["micro_batch_tokens"]), "on" if r["gradient_checkpointing"] else "off"]
        if engine == "vllm":
            knobs += [r["weight_format"].replace("_", " "), "yes" if r["kv_release"] else "no"]
        t.add_row(name, *knobs, f"{r['peak_bytes'] / GB:.2f}", f"{r['predicted_step_s']:.2f}", str(r["rank"]) if r["fits"] else "-")
    t.caption = ("step s: the planner's predicted seconds per step (trainer/cost.py, from costs measured on an H100; "
                 "a ranking, not a promise); rank among the plans that fit, 1 = fastest")
    return t
