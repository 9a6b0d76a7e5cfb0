"""Rewards: load the recipe's reward functions and score completions, checking every value they return.

A reward function has TRL's signature, `f(prompts, completions, **columns) -> list[float | None]`: prompts and
completions are texts (or chat message lists for chat data), `columns` are the dataset's other columns, one value
per completion. `None` means "does not apply" (as in TRL) and counts as 0 in the weighted sum; NaN, infinities,
non-numbers and lists of the wrong length are user errors that name the function and the fix.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainer.errors import UserError


@dataclass
class RewardFunction:
    name: str
    fn: Callable
    weight: float
    kwargs: dict
    on_error: str = "raise"  # "zero": a call that raises scores 0 for its completions and is counted


def load_rewards(recipe) -> list[RewardFunction]:
    out = []
    for i, spec in enumerate(recipe.rewards):
        fn = load_callable(spec.function, Path(recipe.base_dir), f"rewards[{i}].function")
        name = spec.name or getattr(fn, "__name__", f"reward{i}")
        out.append(RewardFunction(name, fn, spec.weight, dict(spec.kwargs), spec.on_error))
    return out


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
    """Rewards [B, R] (NaN where a function returned None) and, per function, completions scored 0 after a raise."""
    n = len(completions)
    table = torch.full((n, len(funcs)), float("nan"))
    failures: dict[str, int] = {}
    for j, rf in enumerate(funcs):
        try:
            values = rf.fn(prompts=prompts, completions=completions, **{**columns, **rf.kwargs})
        except Exception as e:
            if rf.on_error == "zero":
                failures[rf.name] = failures.get(rf.name, 0) + n
                table[:, j] = 0.0
                continue
            k = _first_failing(rf, prompts, completions, columns)
            sample = f"completion {k}: {str(completions[k])[:300]!r}" if k is not None else "the batch as a whole"
            raise UserError(f"reward {rf.name}", f"raised {e.__class__.__name__}: {e}\n  offending sample: {sample}",
                            "fix the function, or set on_error: zero on this reward to score such completions 0"
                            ) from None
        table[:, j] = _check(rf, values, n)
    return table, failures


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


def combine(table: torch.Tensor, funcs: list[RewardFunction]) -> torch.Tensor:
    """Weighted sum over functions (TRL's nansum: a None counts as 0)."""
    w = torch.tensor([f.weight for f in funcs], dtype=table.dtype)
    return torch.nansum(table * w, dim=1)
