"""The side-by-side benchmark's task, shared by every system: the peers' 256 chat prompts, their length reward,
and a step timer that records when each optimizer step ends (startup = process start to the first step's end).

Adapted from the peers' reference scripts (../shared/device/reference/trl_baseline.py, unsloth_baseline.py).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "story_prompts.jsonl"


def reward_len(completions, **kwargs) -> list[float]:
    """The peers' reward: completions near 100 characters score best (TRL's signature)."""
    out = []
    for c in completions:
        text = c[0]["content"] if isinstance(c, list) else c
        out.append(-abs(len(text) - 100) / 100.0)
    return out


def prompts_dataset():
    from datasets import Dataset

    rows = [json.loads(x) for x in PROMPTS.read_text().splitlines() if x.strip()]
    return Dataset.from_list(rows)


def step_timer():
    """A transformers TrainerCallback appending the wall-clock end of every optimizer step to `.ends`."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.ends.append(time.time())

    return StepTimer()


def write_result(path: str, system: str, knob: str, ends: list[float], extra: dict) -> None:
    """Median step over the steps after the first (warm-up), and the first step's end for the startup time."""
    d = [b - a for a, b in zip(ends, ends[1:])]
    res = dict(system=system, knob=knob, steps=len(ends), step_s=[round(x, 3) for x in d],
               step_s_median=sorted(d)[len(d) // 2] if d else None,
               first_step_end_unix=ends[0] if ends else None, **extra)
    Path(path).write_text(json.dumps(res, indent=1))
    print("RESULT " + json.dumps(res), flush=True)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
