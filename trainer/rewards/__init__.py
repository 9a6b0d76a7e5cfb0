"""Rewards: load the recipe's reward functions and score completions, checking every value they return.

A reward function has TRL's signature, `f(prompts, completions, **columns) -> list[float | None]`: prompts and
completions are texts (or chat message lists for chat data), `columns` are the dataset's other columns, one value
per completion. `None` means "does not apply" (as in TRL) and counts as 0 in the weighted sum; NaN, infinities,
non-numbers and lists of the wrong length are user errors that name the function and the fix. A reward with
`num_workers` or `timeout_s` runs in worker processes under a per-call timeout (`pool.py`).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.rewards.pool import WorkerPool


@dataclass
class RewardFunction:
    name: str
    fn: Callable
    weight: float
    kwargs: dict
    on_error: str = "raise"  # "zero": a call that raises (or times out) scores 0 for its completions and is counted
    timeout_s: float | None = None
    workers: "WorkerPool | None" = field(default=None, repr=False)  # None: called in the training process


def load_rewards(recipe) -> list[RewardFunction]:
    """Import every function here (so a bad reference fails before any weight loads); pooled ones also get their
    worker pool, whose processes start on first use and import the function again by the same reference."""
    from trainer.rewards.pool import WorkerPool

    out = []
    for i, spec in enumerate(recipe.rewards):
        where = f"rewards[{i}].function"
        fn = load_callable(spec.function, Path(recipe.base_dir), where)
        name = spec.name or getattr(fn, "__name__", f"reward{i}")
        pool = None
        if spec.num_workers or spec.timeout_s:  # a timeout needs a process to kill: one worker at least
            pool = WorkerPool(name, spec.function, recipe.base_dir, where, spec.num_workers, spec.timeout_s,
                              spec.chunk_size)
        out.append(RewardFunction(name, fn, spec.weight, dict(spec.kwargs), spec.on_error, spec.timeout_s, pool))
    return out


def close_rewards(funcs: list[RewardFunction]) -> None:
    """Stop the reward worker processes (they also stop when the training process exits)."""
    for rf in funcs:
        if rf.workers is not None:
            rf.workers.close()


def load_callable(ref: str, base_dir: Path, field: str) -> Callable:
    """Import `package.module:function` or `path/to/file.py:function` (relative to the recipe's directory)."""
    if ":" not in ref:
        raise UserError(field, f"{ref!r} is not a 'module:function' reference",
                        "write e.g. trainer.rewards.builtin:math_answer or my_rewards.py:score")
    mod_name, fn_name = ref.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name) if Path(mod_name).is_absolute() else base_dir / mod_name
            if not path.is_file():
                raise UserError(field, f"file not found: {path}", "give a path relative to the recipe file")
            spec = importlib.util.spec_from_file_location(f"recipe_rewards_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            if str(base_dir) not in sys.path:
                sys.path.append(str(base_dir))
            module = importlib.import_module(mod_name)
    except UserError:
        raise
    except Exception as e:
        raise UserError(field, f"cannot import {mod_name!r}: {e.__class__.__name__}: {e}",
                        "check the module path and that the module imports cleanly") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(field, f"{mod_name} has no function {fn_name!r}", f"functions there: {', '.join(names[:12])}")
    return fn


def score(funcs: list[RewardFunction], prompts: list, completions: list, columns: dict[str, list]
          ) -> tuple[torch.Tensor, dict[str, int]]:
    """Rewards [B, R] (NaN where a function returned None) and counts per function, keyed as metrics:
    `rewards/<name>/failures` (completions scored 0 after a raise or a timeout, with on_error: zero) and
    `rewards/<name>/timeouts` (those of them whose call timed out). Pooled functions run in their worker
    processes while the in-process ones run here."""
    from trainer.rewards.pool import Batch

    n = len(completions)
    table = torch.full((n, len(funcs)), float("nan"))
    counts: dict[str, int] = {}
    for rf in funcs:
        if rf.on_error == "zero":
            counts[f"rewards/{rf.name}/failures"] = 0
        if rf.timeout_s:
            counts[f"rewards/{rf.name}/timeouts"] = 0
    batch = Batch()
    for rf in funcs:
        if rf.workers is not None:
            batch.add(rf.workers, [(rows, _call_args(rf, prompts, completions, columns, rows))
                                   for rows in rf.workers.calls(n)])
    batch.start()
    try:
        for j, rf in enumerate(funcs):
            if rf.workers is None:
                table[:, j] = _score_here(rf, prompts, completions, columns, counts)
        outcomes = batch.finish()
    except BaseException:
        batch.abort()
        raise
    for j, rf in enumerate(funcs):
        for out in outcomes.get(rf.workers, []):  # functions called here have no outcomes
            table[out.rows.start:out.rows.stop, j] = _pooled_values(rf, out, completions, counts)
    return table, counts


def _score_here(rf: RewardFunction, prompts, completions, columns, counts: dict[str, int]) -> torch.Tensor:
    """One function called in this process on the whole batch."""
    n = len(completions)
    try:
        values = rf.fn(prompts=prompts, completions=completions, **{**columns, **rf.kwargs})
    except Exception as e:
        if rf.on_error == "zero":
            counts[f"rewards/{rf.name}/failures"] += n
            return torch.zeros(n)
        k = _first_failing(rf, prompts, completions, columns)
        sample = f"completion {k}: {str(completions[k])[:300]!r}" if k is not None else "the batch as a whole"
        raise UserError(f"reward {rf.name}", f"raised {e.__class__.__name__}: {e}\n  offending sample: {sample}",
                        "fix the function, or set on_error: zero on this reward to score such completions 0"
                        ) from None
    return _check(rf, values, n)


def _call_args(rf: RewardFunction, prompts, completions, columns, rows: range) -> dict:
    cut = slice(rows.start, rows.stop)
    return {"prompts": prompts[cut], "completions": completions[cut],
            **{**{c: v[cut] for c, v in columns.items()}, **rf.kwargs}}


def _pooled_values(rf: RewardFunction, out, completions, counts: dict[str, int]) -> torch.Tensor:
    """One worker call's values, or zeros (counted) or a UserError for a raise or a timeout, per on_error."""
    if out.values is not None:
        return _check(rf, out.values, len(out.rows))
    first, last = out.rows.start, out.rows.stop - 1
    which = f"completion {first}" if first == last else f"completions {first}..{last}"
    if rf.on_error == "zero":
        counts[f"rewards/{rf.name}/failures"] += len(out.rows)
        if out.timed_out:
            counts[f"rewards/{rf.name}/timeouts"] += len(out.rows)
        return torch.zeros(len(out.rows))
    if out.timed_out:
        raise UserError(f"reward {rf.name}", f"a call did not return within timeout_s={rf.timeout_s:g} s "
                        f"({which}; its worker was killed)\n  first of them: {str(completions[first])[:300]!r}",
                        "make the function faster (or bound its own work), raise timeout_s, or set on_error: zero "
                        "on this reward to score such completions 0")
    raise UserError(f"reward {rf.name}", f"raised {out.error} (in a worker, on {which})\n  first of them: "
                    f"{str(completions[first])[:300]!r}",
                    "fix the function, or set on_error: zero on this reward to score such completions 0")


def _first_failing(rf: RewardFunction, prompts, completions, columns) -> int | None:
    """Call the function one completion at a time to find the sample that makes it raise."""
    for k in range(len(completions)):
        try:
            rf.fn(prompts=prompts[k:k + 1], completions=completions[k:k + 1],
                  **{**{c: v[k:k + 1] for c, v in columns.items()}, **rf.kwargs})
        except Exception:
            return k
    return None


def _check(rf: RewardFunction, values, n: int) -> torch.Tensor:
    where = f"reward {rf.name}"
    if not isinstance(values, (list, tuple)) and not hasattr(values, "__len__"):
        raise UserError(where, f"returned {type(values).__name__}, not a list", f"return one float per completion ({n})")
    values = list(values)
    if len(values) != n:
        raise UserError(where, f"returned {len(values)} values for {n} completions", "return one float per completion")
    out = []
    for k, v in enumerate(values):
        if v is None:
            out.append(float("nan"))
            continue
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise UserError(where, f"value {k} is {v!r} ({type(v).__name__}), not a number",
                            "return floats (or None where the reward does not apply)")
        v = float(v)
        if not math.isfinite(v):
            raise UserError(where, f"value {k} is {v} (completion {k})", "return finite floats; use None to skip")
        out.append(v)
    return torch.tensor(out)


def combine(table: torch.Tensor, funcs: list[RewardFunction], fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum over functions (TRL's nansum: a None counts as 0); `fixed` (a failed multi-turn conversation's
    reward from the recipe, NaN elsewhere) replaces the sum where set."""
    w = torch.tensor([f.weight for f in funcs], dtype=table.dtype)
    total = torch.nansum(table * w, dim=1)
    return total if fixed is None else torch.where(fixed.isnan(), total, fixed.to(total.dtype))
