"""Metrics: a JSONL line per step in the run dir, a rich progress bar and log line, wandb, PNG plots at the end.

wandb runs offline when no API key is configured (its files stay in the run dir for `wandb sync`). Only rank 0
writes. A background sampler records the peak device memory (used memory of the GPU as nvidia-smi reports it,
or the process's RSS on CPU) between calls to `peak()`.
"""
from __future__ import annotations

import fnmatch
import gc
import json
import os
import threading
import time
from pathlib import Path

import psutil

from trainer.errors import UserError


class GCPauses:
    """Python's garbage-collector pauses, from gc.callbacks: seconds spent collecting (every generation) and the number
    of full (oldest-generation) collections, cumulative. A full collection walks every object the process tracks
    (~0.5 million with torch, transformers and vLLM imported: 0.2 s on the 2-core CPU machine; more once layers are
    compiled), so in a host-bound phase its pauses are step time; the step's metrics carry them (time_gc_s)."""

    def __init__(self):
        self.seconds, self.full, self._t0 = 0.0, 0, None
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.full += info.get("generation") == 2
            self._t0 = None

    def close(self) -> None:
        if self._on in gc.callbacks:
            gc.callbacks.remove(self._on)


class CompileWatch:
    """torch.compile's work inside the steps, from torch._dynamo's compilation metrics: each frame compiled (the
    decoder layers: a first graph, then one per guard that fails, e.g. a new length, grad mode, an attention mask
    present or not) and each backward compiled at its first use. A step that compiles spends seconds there, in
    whichever phase hit it (on one H100, 2026-12-05, mirror rows past step 2: 10-25 s in the train phase; on the CPU
    the same pattern came from guard variants compiled static, then again dynamic: trainer/compile_shapes.py); the
    step's metrics carry them (compile_graphs, time_compile_s, inside the phases like time_gc_s) and `log` (the run
    dir's compiles.jsonl) each compile: step, phase, seconds, a guard that failed (Dynamo keeps the newest graph's
    first; every graph's failure is TORCH_LOGS=recompiles' output).

    Reads nothing unless torch._dynamo is imported (no compile, no cost). Dynamo keeps its last 64 entries: more
    compiles than that inside one phase are counted from what is left."""

    def __init__(self, log: Path | None = None):
        self.log = log
        self._last = self._entries()[-1:]  # compiled before the run (vLLM's own graphs at its start): not ours

    @staticmethod
    def _entries() -> list:
        import sys

        utils = sys.modules.get("torch._dynamo.utils")
        return list(utils.get_compilation_metrics()) if utils is not None else []

    def take(self, step: int, phase: str) -> tuple[int, float, list[str]]:
        """Compiles since the last call: (count, seconds, the guard failures that caused them)."""
        entries = self._entries()
        last = self._last[0] if self._last else None
        at = next((i for i in range(len(entries) - 1, -1, -1) if entries[i] is last), -1)
        new = entries[at + 1:]
        if not new:
            return 0, 0.0, []
        self._last = new[-1:]
        rows = []
        for e in new:
            us = getattr(e, "duration_us", None)
            seconds = us / 1e6 if us is not None else (getattr(e, "entire_frame_compile_time_s", None) or 0.0)
            rows.append({"step": step + 1, "phase": phase, "s": round(seconds, 3), "id": str(e.compile_id),
                         "forward": getattr(e, "is_forward", True), "code": getattr(e, "co_name", None),
                         "reason": getattr(e, "recompile_reason", None) or getattr(e, "fail_reason", None)})
        if self.log is not None:
            with self.log.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return len(rows), sum(r["s"] for r in rows), [r["reason"] for r in rows if r["reason"]]


class MemorySampler:
    """Samples device memory every `interval` seconds in a daemon thread; `take_peak()` returns and resets.

    observer: called with each reading (the allocator cap's watch, trainer/cap.py). timeline: a file (the run's
    memory.jsonl) that gets a row per reading where the used memory moved by at least TIMELINE_GRAIN or the phase
    changed, [t_s, phase, used, torch reserved, torch allocated] in bytes, t from the sampler's start, written as it
    goes (a run that dies keeps them): where a run's memory went, second by second."""

    TIMELINE_GRAIN = 32 * 2**20

    def __init__(self, interval: float = 0.1, observer=None, phase=None, timeline: Path | None = None):
        import torch

        self.cuda = torch.cuda.is_available()
        self.device = torch.cuda.current_device() if self.cuda else None  # this thread's, not device 0 under torchrun
        self._peak = 0
        self._stop = threading.Event()
        self.interval = interval
        self.observer, self.phase = observer, phase or (lambda: "")
        self.t0 = time.time()
        self.timeline = timeline
        self._last = (None, -1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def used(self) -> int:
        if self.cuda:
            import torch

            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        return psutil.Process().memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            try:
                used = self.used()
                self._peak = max(self._peak, used)
                if self.observer is not None:
                    self.observer(used)
                if self.timeline is not None:
                    self._record(used)
            except Exception:  # the device may be going away at exit
                pass
            time.sleep(self.interval)

    def _record(self, used: int) -> None:
        phase = self.phase()
        if phase == self._last[0] and abs(used - self._last[1]) < self.TIMELINE_GRAIN:
            return
        self._last = (phase, used)
        reserved = allocated = 0
        if self.cuda:
            import torch

            reserved, allocated = torch.cuda.memory_reserved(self.device), torch.cuda.memory_allocated(self.device)
        with open(self.timeline, "a") as f:
            f.write(json.dumps([round(time.time() - self.t0, 2), phase, used, reserved, allocated]) + "\n")

    def take_peak(self) -> int:
        peak, self._peak = max(self._peak, self.used()), 0
        return peak

    def close(self):
        self._stop.set()


class MetricsLogger:
    def __init__(self, run_dir: Path, recipe, rank: int = 0, resume_step: int = 0):
        self.run_dir, self.rank, self.recipe = Path(run_dir), rank, recipe
        self.path = self.run_dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.wandb = None
        if rank != 0:
            return
        if self.path.exists():  # on resume, keep the lines of steps that the checkpoint covers
            self.history = [m for m in read_metrics(self.run_dir) if m.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(m) + "\n" for m in self.history))
        self._file = self.path.open("a")
        self._start_wandb()

    def _start_wandb(self):
        want = self.recipe.logging.wandb
        if want is False:
            return
        try:
            import wandb
        except ImportError:
            if want is True:
                raise UserError("logging.wandb", "wandb is not installed", "pip install wandb, or set wandb: false")
            return
        has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
        mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
        try:
            self.wandb = wandb.init(project=self.recipe.logging.wandb_project, name=self.recipe.name, mode=mode,
                                    dir=str(self.run_dir), config=self.recipe.model_dump(), reinit="finish_previous")
        except Exception as e:  # never let logging kill a training run
            print(f"wandb disabled: {e.__class__.__name__}: {e}")

    def log(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        self.history.append(metrics)
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"])

    def close(self) -> None:
        if self.rank != 0:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.recipe.logging.plots and self.history:
            plot(self.history, self.run_dir / "plots")


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per step; blank and half-written lines (a killed process) are skipped."""
    return [m for m in map(_parse, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if m is not None]


def _parse(text: str) -> dict | None:
    """A metrics line, or None for a blank or half-written one (the process was killed mid-write)."""
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return None


SUM_KEYS = ("loss", "micro_batches", "is_ratio/count")
# per-rank means and fractions over a count that differs between ranks (tokens): weighted by that count
WEIGHTED = {"is_ratio/mean": "is_ratio/count", "is_ratio/masked_frac": "is_ratio/count",
            "is_ratio/truncated_frac": "is_ratio/count"}


def merge_ranks(per_rank: list[dict]) -> dict:
    """One step's metrics over data-parallel ranks: losses add up (each rank's loss is its share of the global one),
    rewards are pooled, times and peaks take the slowest/largest rank, maxima and minima (keys ending in _max, /max,
    _min, /min) the extreme rank, 99th percentiles (_p99) the largest rank's (a bound on the pooled one), means
    over counted items weigh each rank by its count, the rest is averaged."""
    if len(per_rank) == 1:
        per_rank[0].pop("_rewards", None)
        return per_rank[0]
    import statistics

    out = {}
    for k, v in per_rank[0].items():
        vals = [m[k] for m in per_rank if isinstance(m.get(k), (int, float))]
        if not vals or k == "step":
            out[k] = v
        elif k in SUM_KEYS:
            out[k] = sum(vals)
        elif k.startswith(("time_", "peak_", "compile_")) or k.endswith(("_max", "/max", "_p99")):  # p99: a bound
            out[k] = max(vals)
        elif k.endswith(("_min", "/min")):
            out[k] = min(vals)
        elif k in WEIGHTED and len(vals) == len(per_rank):
            n = [m[WEIGHTED[k]] for m in per_rank]
            out[k] = sum(v * w for v, w in zip(vals, n)) / max(sum(n), 1e-12)
        else:
            out[k] = sum(vals) / len(vals)
    rewards = [r for m in per_rank for r in m.get("_rewards", [])]
    out.pop("_rewards", None)
    if rewards:
        out["reward_mean"], out["reward_std"] = statistics.fmean(rewards), statistics.stdev(rewards)
    return out


def line(m: dict) -> str:
    parts = [f"step {m['step']:>4}", f"reward {m['reward_mean']:+.3f}±{m['reward_std']:.3f}",
             f"loss {m['loss']:+.4f}", f"len {m['completion_length_mean']:.0f}"]
    if "kl" in m:
        parts.append(f"kl {m['kl']:.4f}")
    if "logp_gap_mean" in m:
        parts.append(f"gap {m['logp_gap_mean']:.4f}")
    compiled = f", compile {m['time_compile_s']:.2f}" if m.get("time_compile_s") else ""
    parts += [f"{m['time_step_s']:.2f}s (roll {m['time_rollout_s']:.2f}, reward {m.get('time_reward_s', 0.0):.2f}"
              f"{compiled})", f"{m['tokens_per_s']:.0f} tok/s"]
    if m.get("peak_memory_gb"):
        parts.append(f"peak {m['peak_memory_gb']:.2f}GB")
    return " | ".join(parts)


PLOTS = {"reward": ["reward_mean"], "loss": ["loss"], "kl": ["kl"], "completion_length": ["completion_length_mean"],
         "step_time": ["time_step_s", "time_rollout_s", "time_reward_s", "time_train_s"],
         "logp_gap": ["logp_gap_mean", "logp_gap_p99"],
         "peak_memory": ["peak_memory_gb"],
         # held-out evaluation (trainer/evaluate.py); patterns match every reward function's keys
         "eval_reward": ["eval/reward_mean", "eval/rewards/*/mean"],
         "eval_accuracy": ["eval/rewards/*/accuracy", "eval/rewards/*/pass@*"]}


def plot(history: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    logged = sorted({k for m in history for k in m})
    for name, patterns in PLOTS.items():
        keys = [k for p in patterns for k in (fnmatch.filter(logged, p) if "*" in p else [p])]
        series = {k: [(m["step"], m[k]) for m in history if isinstance(m.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="o" if len(pts) < 20 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
