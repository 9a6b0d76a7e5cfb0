"""Held-out evaluation: samples the eval prompts with the run's own engine and scores them with the recipe's rewards,
never touching the training state (no optimizer step, no gradient, RNG states restored, the adapter only read).

Reported (keys under `eval/`): the weighted total reward, each reward function's mean and, for a function whose
values are all 0 or 1, its accuracy (the fraction of samples scoring 1) and pass@k, the unbiased estimator of
Chen et al. (2021) from n samples per prompt. The same prompts and sampling seeds are used at every evaluation,
so a curve shows the policy changing, not sampling luck. The GRPO loop only calls `Evaluator.due` and `.run`;
`train eval RECIPE --checkpoint DIR` runs the same code on a saved adapter.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from trainer import checkpoint, distributed
from trainer.batch import build_batch
from trainer.data import PromptSet, load_prompts
from trainer.rewards import combine, score
from trainer.rollout import sample
from trainer.types import Sampling


def eval_section(recipe):
    """The recipe's eval section; without one (only `train eval`), default settings on the data section's rows."""
    from trainer.recipe import EvalSection

    if recipe.eval is not None:
        return recipe.eval
    d = recipe.data
    return EvalSection(dataset=d.dataset, subset=d.subset, split=d.split)


def eval_data(recipe, ev):
    """The data section to read eval prompts with: the eval dataset, rendered as the training prompts are."""
    d = recipe.data
    same = ev.dataset is None or ev.dataset == d.dataset
    return d.model_copy(update=dict(
        dataset=ev.dataset or d.dataset, subset=d.subset if same and ev.subset is None else ev.subset,
        split=ev.split, prompt_column=ev.prompt_column or d.prompt_column,
        prompt_template=ev.prompt_template if ev.prompt_template is not None else d.prompt_template))


def load_eval_prompts(recipe, ev, tokenizer, tools: list[dict] | None = None) -> PromptSet:
    """The first `max_prompts` prompts of the eval split, tokenized like the training prompts (with the multi-turn
    rollout's tool schemas, if any)."""
    ps = load_prompts(eval_data(recipe, ev), tokenizer, Path(recipe.base_dir), tools=tools)
    keep = len(ps) if ev.max_prompts is None else min(ev.max_prompts, len(ps))
    return PromptSet(ps.prompts[:keep], ps.prompt_ids[:keep], {c: v[:keep] for c, v in ps.columns.items()},
                     ps.conversational, ps.truncated)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), in a stable product form."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def default_ks(n: int) -> list[int]:
    return [1 << i for i in range(n.bit_length()) if 1 << i <= n]


@contextlib.contextmanager
def preserved_rng():
    """Python, numpy, torch (and CUDA) RNG states as they were: evaluation draws nothing from the training run's."""
    state = checkpoint.rng_state()
    try:
        yield
    finally:
        checkpoint.set_rng_state(state)


class Evaluator:
    def __init__(self, ev, prompts: PromptSet, rewards: list, tokenizer, max_tokens: int, max_steps: int,
                 turns=None):
        self.ev, self.prompts, self.rewards, self.tokenizer = ev, prompts, rewards, tokenizer
        self.max_tokens, self.max_steps = max_tokens, max_steps
        self.turns = turns  # rollout.multi_turn.MultiTurn: held-out conversations with the same tools / environment
        self.ks = sorted(set(ev.pass_k)) if ev.pass_k else default_ks(ev.num_samples)

    @classmethod
    def build(cls, recipe, tokenizer, rewards, ev=None, turns=None) -> "Evaluator | None":
        """The recipe's evaluator (None without an eval section unless `ev` is given), its prompts loaded; `turns`:
        the run's multi-turn rollout, so held-out prompts are played as conversations too."""
        ev = ev or recipe.eval
        if ev is None:
            return None
        return cls(ev, load_eval_prompts(recipe, ev, tokenizer, turns.schemas if turns else None), rewards, tokenizer,
                   ev.max_completion_length or recipe.grpo.max_completion_length, recipe.train.max_steps, turns)

    def due(self, done: int) -> bool:
        """Evaluate after `done` completed steps: every `every_steps` and after the last step."""
        every = self.ev.every_steps
        return done == self.max_steps or (every is not None and done % every == 0)

    def run(self, engine, world: distributed.World = distributed.World(), samples: bool = False) -> dict:
        """`eval/...` metrics of the engine's current policy (with `samples`: also "samples", one row per prompt).

        Each rank samples a contiguous share of the prompts; seeds belong to global rows, so the result does not
        depend on the number of ranks. The KV pool is acquired and released as around a training rollout.
        """
        t0 = time.perf_counter()
        n, total = self.ev.num_samples, len(self.prompts)
        lo, hi = total * world.rank // world.size, total * (world.rank + 1) // world.size
        part = self._score(engine, list(range(lo, hi)), lo * n, samples) if hi > lo else None
        parts = [p for p in distributed.gather_objects(part, world) if p is not None]
        table = torch.cat([p["table"] for p in parts])
        lengths = torch.cat([p["lengths"] for p in parts])
        truncated = torch.cat([p["truncated"] for p in parts])
        failures: dict[str, int] = {}
        for p in parts:
            for name, k in p["failures"].items():
                failures[name] = failures.get(name, 0) + k
        m = self.summarize(table, lengths, truncated, failures)
        m["eval/time_s"] = time.perf_counter() - t0
        if samples:
            m["samples"] = [row for p in parts for row in p["samples"]]
        return m

    @torch.no_grad()
    def _score(self, engine, idx: list[int], first_row: int, samples: bool) -> dict:
        ev, n, ps = self.ev, self.ev.num_samples, self.prompts
        sampling = Sampling(n=n, max_tokens=self.max_tokens, temperature=ev.temperature, top_p=ev.top_p,
                            seed=ev.seed, first_row=first_row)
        prompt_ids = [ps.prompt_ids[i] for i in idx]
        with preserved_rng():
            engine.acquire()
            try:
                gens = sample(engine, self.turns, ps, idx, sampling)
            finally:
                engine.release()
        tok = self.tokenizer
        batch = build_batch(prompt_ids, [ps.prompts[i] for i in idx], gens, n, tok.pad_token_id,
                            lambda ids: tok.batch_decode(ids, skip_special_tokens=True), ps.conversational, False)
        columns = {c: [v[i] for i in idx for _ in range(n)] for c, v in ps.columns.items()} | batch.columns
        table, failures = score(self.rewards, batch.prompts, batch.completions, columns)
        rows = [{"prompt": ps.prompts[i], "completions": batch.completions[j * n:(j + 1) * n],
                 "rewards": {rf.name: [None if math.isnan(x) else x for x in table[j * n:(j + 1) * n, f].tolist()]
                             for f, rf in enumerate(self.rewards)}}
                for j, i in enumerate(idx)] if samples else []
        return {"table": table, "lengths": batch.completion_valid.sum(1).float(), "truncated": batch.truncated,
                "failures": failures, "samples": rows}

    def summarize(self, table: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor,
                  failures: dict[str, int]) -> dict:
        """Metrics of a [prompts x samples, rewards] table (prompt-major rows)."""
        n = self.ev.num_samples
        total = combine(table, self.rewards)
        m = {"eval/reward_mean": float(total.mean()), "eval/reward_std": float(total.std()) if len(total) > 1 else 0.0,
             "eval/prompts": len(total) // n, "eval/samples_per_prompt": n,
             "eval/completion_length_mean": float(lengths.mean()),
             "eval/truncated_frac": float(truncated.float().mean())}
        for j, rf in enumerate(self.rewards):
            col = table[:, j]
            key = f"eval/rewards/{rf.name}"
            m[f"{key}/mean"] = float(torch.nanmean(col)) if (~col.isnan()).any() else float("nan")
            seen = col[~col.isnan()]
            if len(seen) and bool(((seen == 0) | (seen == 1)).all()):  # a 0/1 (correctness) reward
                correct = (col == 1).view(-1, n).sum(1).tolist()
                m[f"{key}/accuracy"] = float((col == 1).float().mean())
                for k in self.ks:
                    m[f"{key}/pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct]))
            for what in ("failures", "timeouts"):  # rewards.score counts them as rewards/<name>/<what>
                if f"rewards/{rf.name}/{what}" in failures:
                    m[f"{key}/{what}"] = failures[f"rewards/{rf.name}/{what}"]
        return m


def line(m: dict) -> str:
    """One log line of an evaluation's headline numbers."""
    parts = [f"eval reward {m['eval/reward_mean']:+.3f}"]
    for k, v in m.items():
        if k.startswith("eval/rewards/") and k.endswith(("/mean", "/accuracy")):
            parts.append(f"{k[len('eval/rewards/'):]} {v:.3f}")
    parts.append(f"{m['eval/prompts']} prompts x {m['eval/samples_per_prompt']} ({m['eval/time_s']:.1f}s)")
    return " | ".join(parts)


def table(m: dict, title: str):
    """The metrics as a rich table, one row per key."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in m.items():
        if isinstance(v, (int, float)):
            t.add_row(k.removeprefix("eval/"), f"{v}" if isinstance(v, int) else f"{v:.4f}")
    return t
