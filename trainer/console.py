"""Terminal output: a rich progress bar with a line per step, and the plan as a table. Nothing else prints.

Every line we print is soft-wrapped (never split or cropped by rich): without a terminal (Slurm, nohup, a pipe) rich
assumes 80 columns, which broke each step's line in two and the plan's notes every ~30 characters.
"""
from __future__ import annotations

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from trainer import graph_lengths
from trainer.memory import GB


def make_console(**kwargs) -> Console:
    """rich's Console; without a terminal (and outside Jupyter) every print is soft-wrapped: one line stays one."""
    console = Console(**kwargs)
    if not console.is_terminal and not console.is_jupyter:
        console.soft_wrap = True
    return console


class Progress:
    def __init__(self, console: Console | None, total: int, start: int, enabled: bool = True):
        self.console = console or make_console()
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
        self.bar.console.print(text, highlight=False, soft_wrap=True)
        self.bar.update(self.task, advance=1, reward=f"reward {metrics['reward_mean']:+.3f}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.console.print(f"[yellow]{text}", soft_wrap=True)


def show_plan(console: Console, plan) -> None:
    console.print(plan_table(plan), soft_wrap=True)


def plan_table(plan) -> Group:
    """The plan's components and phase peaks as a table, then its settings and notes one per line (print it with
    soft_wrap=True, as `show_plan` does, so that no line is split)."""
    t = Table(title=f"VRAM plan: {plan.device_name} ({plan.device})", show_lines=False)
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
    lines = [f"engine {plan.rollout_engine}, dtype {plan.compute_dtype}, 4-bit {plan.quantized}, "
             f"checkpointing {'in graph' if plan.checkpoint_in_graph else plan.gradient_checkpointing}, "
             f"micro-batch {plan.micro_batch_tokens} tokens, "
             f"logits tile {plan.token_chunk}x{plan.vocab_chunk}, decoder layers compiled {plan.compile_layers}"
             + (_graphs(plan) if plan.train_cudagraphs else "")
             + (" (attention masks always: one micro-batch a step beside a no-grad pass)" if plan.compile_masks else "")
             + f", predicted step {plan.predicted_step_s:.2f} s"
             + (" (" + ", ".join(f"{k} {v:.2f}" for k, v in plan.predicted_phases_s.items()) + ")"
                if plan.predicted_phases_s else "")]
    if plan.activation_offload or plan.micro_batch_seqs == 1:
        per_mb = f"{plan.micro_batch_seqs} sequence(s) per micro-batch" if plan.micro_batch_seqs else "packed micro-batches"
        lines.append(f"long sequences: {per_mb}, checkpoints "
                     + (f"offloaded to pinned host memory ({plan.host_offload_bytes / GB:.2f} GB of host memory)"
                        if plan.activation_offload else "on the device")
                     + (f", MLP in tiles of {plan.mlp_tile_tokens} tokens" if plan.mlp_tile_tokens else ""))
    if plan.rollout_engine == "vllm":
        lines.append(f"vLLM: {plan.weight_format}, KV {plan.kv_cache_memory_bytes / GB:.3f} GB for "
                     f"{plan.max_num_seqs} seqs x {plan.max_model_len} tokens, batched tokens "
                     f"{plan.max_num_batched_tokens}, graphs {plan.cudagraph_capture_sizes or 'eager'}, "
                     f"KV released while training: {plan.kv_release}"
                     + (f", fused nf4 GEMM for decode batches <= {plan.nf4_gemm_max_rows}"
                        if plan.nf4_gemm_max_rows else "")
                     + (", the adapter merged into its weights each step (no LoRA in vLLM)" if plan.sync == "merge"
                        else "")
                     + _trainer_on_mirror(plan)
                     + (f", files staged in {plan.scratch_dir}" if plan.scratch_dir else ""))
    else:
        lines.append(f"HF generate: {plan.hf_batch_size} sequences a call, "
                     + ("a static KV cache held all run and a compiled decode step (its step time not measured yet: "
                        "priced as the eager step)" if plan.hf_compiled_decode
                        else "eager decode steps (rollout.hf_compile: true compiles them)"))
    return Group(t, *(Text(line) for line in lines + list(plan.notes)))


def _trainer_on_mirror(plan) -> str:
    """What the trainer's layers compute on with the bf16 mirror (Plan.trainer_linears)."""
    if plan.weight_format != "bf16_mirror":
        return ""
    return {"rows": ", the trainer on the merged rows",
            "views": ", the trainer's linears views of the mirror (its nf4 copy let go)"}.get(
        plan.trainer_linears, ", the trainer on its own nf4 copy") + (
        ", its norms and rotary rounding where vLLM's kernels round" if plan.sampler_rounding else "")


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
        knobs = [str(r["micro_batch_tokens"]), ("on, host" if r.get("activation_offload") else
                                                 "in graph" if r.get("checkpoint_in_graph") else "on")
                 if r["gradient_checkpointing"] else "off"]
        if engine == "vllm":  # the mirror's trainer path beside it (Plan.trainer_linears): merged rows or views
            path = {"rows": ", merge", "views": ", views"}.get(r.get("trainer_linears"), "")
            knobs += [r["weight_format"].replace("_", " ") + path, "yes" if r["kv_release"] else "no"]
        t.add_row(name, *knobs, f"{r['peak_bytes'] / GB:.2f}", f"{r['predicted_step_s']:.2f}", str(r["rank"]) if r["fits"] else "-")
    t.caption = ("step s: the planner's predicted seconds per step (trainer/cost.py, fitted on an H200, scaled to "
                 "the card's bandwidth and FLOP/s where its CARDS has them; a ranking, not a promise); rank among the "
                 "plans that fit, 1 = fastest")
    return t


def _graphs(plan) -> str:
    """How the train phase's CUDA graphs meet GRPO's lengths (trainer/graph_lengths.py)."""
    rows = graph_lengths.rows_per_micro_batch(plan.micro_batch_tokens, plan.max_model_len, plan.micro_batch_seqs)
    return (f", replayed from CUDA graphs ({rows} row(s) a micro-batch, each padded to the plan's "
            f"{plan.max_model_len} tokens)")
