"""The budget kept at run time: a closed loop that re-plans the runtime knobs from measured per-phase peaks and
retries a step once after an out-of-memory; it never invents a knob value, it only picks among the planner's own
candidates (trainer/plan.py). Three parts: what a step measured and which candidate comes next are trainer/replan.py
(pure), this module runs the step, retries it and applies the choice; the hard cap under it, torch's allocator held to
the budget less what the process holds outside it, measured and lowered as that grows, is trainer/cap.py.

Closed loop. After each step the measured peak of each plan phase (device memory used, sampled, as nvidia-smi sees
it: `used_<sub-phase>` of State.peaks, rollout = kv + rollout, train = the rest; on a shared GPU it includes the
neighbours' memory, which errs on the safe side; on the CPU it is the process's RSS, which the plan does not model,
so the loop measures nothing there) is compared with a target: the plan's own phase peak (budget.adapt: off, the
default: the plan is the promise), or the budget less HEADROOM (adapt: speed: the budget is the only limit). A phase
above its target by more than TOLERANCE (or above the budget) gets its runtime knobs (RUNTIME_KNOBS: micro-batch
tokens and logits tile, gradient checkpointing, activation offload, the tiled MLP, KV release, HF batch size)
re-planned before the next step: the
fastest of the planner's candidates (its speed score) whose prediction, corrected by the largest measured/planned
ratio seen in that phase, fits the target. With adapt: speed, after the first step (worst-case shapes: the slack
measured there is real) the fastest candidate that fits the budget less HEADROOM with the measured error included is
taken. Each change is noted in the log and listed in the step's metrics (`budget/adjustments`, `budget/changes`) and
in summary.json. The correction for candidate knobs k is measured + ratio x (planned(k) - planned(now)), ratio = the
phase's largest measured/planned ratio and never below 1: the planner's predicted change scaled by its measured
error. If the error sits in the part the knobs change, growth is under-predicted by that part's own ratio; HEADROOM,
the cap and the retry below cover it.

Out of memory. An OutOfMemoryError in the rollout, recompute or train phase (before the optimizer step, so nothing
has changed yet) moves that phase one notch smaller (the fastest candidate differing in one knob with a smaller
predicted peak: half the micro-batch, checkpointing on, offload on, the MLP in tiles, KV released, half the HF
batch) and runs the same step again
(the same prompts and seeds: grpo_step is deterministic in (step, seed); gradients zeroed, memory and RNG states
restored first; a smaller HF batch regroups the rows into other seeded chunks, so a retried HF rollout samples other
completions of the same prompts). A second OOM, one in another phase, or one under data parallelism (the other ranks
are already in the step's collectives) is explained as before (trainer/oom.py) with exit code 4.

kv_release can be switched only by an engine started with sleep mode (plan.kv_release true at start): a loop may
stop releasing the pool and start again, but cannot start releasing it in a run planned without. The plan's knob
fields follow the loop's changes (other stages read them); its components, phase_peaks and peak_bytes stay the
planner's prediction for the knobs it chose, which summary.json compares with the measurement.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass

import torch

from trainer import oom, replan
from trainer.cap import Cap
from trainer.checkpoint import rng_state, set_rng_state
from trainer.memory import GB
from trainer.plan import RUNTIME_KNOBS, Device, checkpoint_in_graph, free_runtime_knobs, runtime_candidates
from trainer.replan import KNOB_PHASE, Readings

# Sub-phases whose OOM is retried (nothing of the step is applied before the optimizer), by the plan phase to shrink.
RETRY = {"rollout": "rollout", "recompute": "train", "train": "train"}
TOLERANCE = 0.03  # a phase more than 3% above its target is re-planned
HEADROOM = 0.05  # adapt: speed keeps corrected predictions 5% under the budget
KNOB_FIELDS = {"micro_batch_tokens": "train.micro_batch_tokens", "gradient_checkpointing": "model.gradient_checkpointing",
               "activation_offload": "train.activation_offload", "mlp_tile_tokens": "train.mlp_tiles (tile tokens)",
               "kv_release": "rollout.kv_release", "hf_batch_size": "rollout.hf_batch_size", "token_chunk": "token_chunk"}


@dataclass
class Adjustment:
    step: int  # 1-based: the step after which (or, for an OOM, in which) the knob changed
    phase: str  # the plan phase the knob belongs to: rollout | train
    reason: str  # "over plan" | "slack" | "out of memory"
    knob: str  # a Plan field
    old: object
    new: object
    measured_gb: float | None  # the phase's measured peak in the step (None after an OOM)
    planned_gb: float  # the planner's prediction for the knobs in force during the step
    expected_gb: float  # the corrected prediction for the new knobs


class Loop:
    """Per-run state of the closed loop: `run_step` wraps one step of the GRPO loop, `after_step` and `after_oom` read
    the step and take trainer/replan.py's choice, `_set` applies a choice to the plan and the live objects."""

    def __init__(self, recipe, plan, policy=None, engine=None, world_size: int = 1, config: dict | None = None,
                 cap: Cap | None = None):
        if config is None:
            from trainer.policy import read_config

            config = read_config(recipe.model)
        self.recipe, self.plan, self.policy, self.engine, self.world_size = recipe, plan, policy, engine, world_size
        self.cap = cap
        self.device = Device(plan.device, plan.device_name, world_size=world_size,
                             vllm_cpu=plan.device == "cpu" and plan.rollout_engine == "vllm",
                             capability=plan.device_capability)
        self.free = free_runtime_knobs(recipe, plan)
        self.candidates = runtime_candidates(config, recipe, plan, self.device, self.free)
        self.speed = recipe.budget.adapt == "speed" and plan.budget_bytes is not None
        self.targets = ({p: plan.budget_bytes * (1 - HEADROOM) for p in plan.phase_peaks} if self.speed
                        else dict(plan.phase_peaks))
        self.measures = plan.device == "cuda"  # CPU: the sampler reads the process's RSS, which the plan does not model
        self.readings = Readings()
        self.pending: list[Adjustment] = []  # changes of the current step, reported with its metrics
        self.retried = 0
        self.stuck: set[str] = set()  # phases above target with no runtime knob left (noted once)
        self.current()  # the plan must be one of the planner's candidates

    # ------------------------------------------------------------------------------------------ the step

    def run_step(self, s, step: int, fn, note=print) -> dict:
        """Run one step (`fn`: grpo_step and the rank merge), retrying once after an OOM; then compare the measured
        peaks with the plan and re-plan. Returns the step's metrics with the loop's keys added."""
        rng = rng_state()
        self.retried = 0
        try:
            m = fn()
        except torch.cuda.OutOfMemoryError as e:
            phase = s.phase
            retryable = self.world_size == 1 and "optimizer" not in s.times  # no update applied in this step yet
            changes = self.after_oom(step, phase) if retryable else []
            if not changes:
                raise oom.explain(phase, step, self.plan, e) from None
            note(f"budget: out of memory in the {phase} phase of step {step + 1}; retrying the step once with "
                 f"{_changes(changes)}")
        else:
            return self._finish(step, s, m, note)
        # Outside the except block: the failed attempt's frames (and the tensors they hold) are gone.
        s.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        set_rng_state(rng)
        self.retried = 1
        try:
            m = fn()
        except torch.cuda.OutOfMemoryError as e:
            raise oom.explain(s.phase, step, self.plan, e, retried=_changes(changes)) from None
        return self._finish(step, s, m, note)

    def _finish(self, step: int, s, m: dict, note) -> dict:
        worst = step == 0 and self.recipe.train.worst_case_first_step
        if self.measures:
            for text in self.after_step(step, s.peaks, worst):
                note(text)
        if self.cap is not None:  # the outside-torch part re-measured; the cap lowered if it grew
            m.update(self.cap.check())
        m["budget/adjustments"], m["budget/retries"] = len(self.pending), self.retried
        m.update({f"budget/{p}_error": e for p, e in self.errors.items()})
        if self.pending:
            m["budget/changes"] = [asdict(a) for a in self.pending]
        self.pending = []
        return m

    # ------------------------------------------------------------------------------------------ decisions

    @property
    def anchor(self) -> dict:
        return self.readings.anchor

    @property
    def errors(self) -> dict:
        return self.readings.errors

    def expected(self, phase: str, planned: float) -> float:
        return self.readings.expected(phase, planned)

    def after_step(self, step: int, peaks: dict, worst: bool = False) -> list[str]:
        """Re-plan after a step from its measured peaks; returns the log lines (the changes go to `pending`)."""
        measured = Readings.measured(peaks)
        if not measured:
            return []
        cur = self.current()
        if self.plan.rollout_engine == "vllm" and not cur.get("kv_release") and len(measured) > 1:
            # vLLM's pools are fixed at start; without a KV release between the phases, torch's cached train blocks
            # stay through the rollout, so each phase's reading holds the other's memory too (H100, 2026-11-26: a 6.31 GB "rollout" peak against a 5.48 GB rollout plan, the
            # train plan being 6.44). Only the whole step's peak is meaningful; it belongs to the larger phase.
            top = max(cur["phase_peaks"], key=cur["phase_peaks"].get)
            measured = {top: max(measured.values())}
        self.readings.record(measured, cur)
        limit = self.plan.budget_bytes or float("inf")
        over = [p for p, m in measured.items() if m > min(self.targets[p] * (1 + TOLERANCE), limit)]
        if over:
            return self._shrink(step, over, measured, cur)
        self.stuck.clear()
        if self.speed and worst:
            return self._grow(step, measured, cur)
        return []

    def after_oom(self, step: int, sub_phase: str) -> list[Adjustment]:
        """One notch smaller in the phase that ran out (replan.notch); [] when none is left."""
        phase = RETRY.get(sub_phase)
        if phase is None:
            return []
        cur = self.current()
        best = replan.notch(self.candidates, cur, phase, self.free)
        return self._adopt(step, best, cur, "out of memory", {}) if best else []

    def _shrink(self, step: int, over: list[str], measured: dict, cur: dict) -> list[str]:
        """Take replan.shrink's candidate for the phases above target; a phase no runtime knob can shrink is reported
        once and held (the H200's 7B run of 2026-12-02 kept checkpointing off, its train phase over budget, because
        the rollout, which no knob shrinks, was over plan too)."""
        best, movable = replan.shrink(self.candidates, cur, over, self.targets, self.readings)
        lines = []
        for p in over:
            if p not in movable and p not in self.stuck:
                lines.append(f"budget: {_versus(p, measured[p], cur, self.targets[p])} after step {step + 1}, "
                             f"and no runtime knob is left to shrink it; for the next run set {oom.knob(p, self.plan)}")
        self.stuck |= set(over) - set(movable)
        if best is None:
            return lines
        changes = self._adopt(step, best, cur, "over plan", measured)
        for p in movable:
            mine = [a for a in changes if a.phase == p]
            exp = self.expected(p, best["phase_peaks"][p])
            still = "" if exp <= self.targets[p] else " (the smallest setting left: still above target)"
            lines.append(f"budget: {_versus(p, measured[p], cur, self.targets[p])} after step {step + 1}: "
                         + (f"{_changes(mine)}, now expected {exp / GB:.2f} GB" if mine else "unchanged") + still)
        return lines

    def _grow(self, step: int, measured: dict, cur: dict) -> list[str]:
        """adapt: speed: take replan.grow's candidate (the fastest whose corrected peaks fit the budget less HEADROOM)."""
        best = replan.grow(self.candidates, cur, self.targets, self.readings)
        if best is None:
            return []
        changes = self._adopt(step, best, cur, "slack", measured)
        peak = max(self.expected(p, best["phase_peaks"][p]) for p in best["phase_peaks"])
        return [f"budget: measured peak {max(measured.values()) / GB:.2f} GB of a {self.plan.budget_bytes / GB:.2f} GB "
                f"budget after step {step + 1} (worst-case shapes); adapt: speed takes {_changes(changes)}, "
                f"expected peak {peak / GB:.2f} GB"]

    def _adopt(self, step: int, best: dict, cur: dict, reason: str, measured: dict) -> list[Adjustment]:
        changes = []
        for k in RUNTIME_KNOBS:
            if best[k] != cur[k]:
                p = KNOB_PHASE[k]
                changes.append(Adjustment(step + 1, p, reason, k, cur[k], best[k],
                                          measured[p] / GB if p in measured else None, cur["phase_peaks"][p] / GB,
                                          self.expected(p, best["phase_peaks"][p]) / GB))
        self._set({a.knob: a.new for a in changes})
        self.pending += changes
        return changes

    # ------------------------------------------------------------------------------------------ state

    def current(self) -> dict:
        """The planner's candidate for the knobs in force."""
        knobs = {k: getattr(self.plan, k) for k in RUNTIME_KNOBS}
        found = self._find(knobs)
        if found is None:
            raise RuntimeError(f"the plan's runtime knobs {knobs} are not among the planner's candidates")
        return found

    def _find(self, knobs: dict) -> dict | None:
        return next((c for c in self.candidates if all(c[k] == v for k, v in knobs.items())), None)

    def _set(self, knobs: dict) -> None:
        """Change knobs in the plan (which the loop, packing and engines read) and in the live objects."""
        for k, v in knobs.items():
            setattr(self.plan, k, v)
        if "micro_batch_tokens" in knobs:  # sequences per micro-batch follow it (one long sequence, or packed)
            self.plan.micro_batch_seqs = self.current()["micro_batch_seqs"]
        checkpointing = {"gradient_checkpointing", "checkpoint_in_graph", "activation_offload", "mlp_tile_tokens"}
        if knobs.keys() & checkpointing and self.policy is not None:
            from trainer.policy import set_gradient_checkpointing

            set_gradient_checkpointing(self.policy.model, self.plan.gradient_checkpointing,
                                       self.plan.activation_offload, checkpoint_in_graph(self.plan),
                                       self.plan.checkpoint_recompute_all)
        if "mlp_tile_tokens" in knobs and self.policy is not None:
            from trainer.tiled_mlp import install

            install(self.policy.model, self.plan.mlp_tile_tokens)
        if "hf_batch_size" in knobs and getattr(self.engine, "name", None) == "hf":
            self.engine.batch_size = knobs["hf_batch_size"]

    def state(self) -> dict:
        """What a checkpoint keeps: the knobs in force and the measured errors."""
        return {"knobs": {k: getattr(self.plan, k) for k in RUNTIME_KNOBS},
                "anchor": {p: list(v) for p, v in self.anchor.items()}}

    def restore(self, state: dict | None) -> None:
        """Resume with the knobs a checkpoint was written under (those the recipe still leaves free)."""
        if not state:
            return
        old = {k: getattr(self.plan, k) for k in RUNTIME_KNOBS}
        new = {k: v for k, v in state.get("knobs", {}).items() if k in self.free and old.get(k) != v}
        if self._find({**old, **new}) is None:  # the recipe changed since: the planner's choice stands
            return
        self._set(new)
        self.readings.anchor = {p: (float(v[0]), float(v[1])) for p, v in state.get("anchor", {}).items()}


def _changes(changes: list[Adjustment]) -> str:
    return ", ".join(f"{KNOB_FIELDS.get(a.knob, a.knob)} {a.old} -> {a.new}" for a in changes)


def _versus(phase: str, measured: float, cur: dict, target: float) -> str:
    planned = cur["phase_peaks"][phase]
    return (f"{phase} phase measured {measured / GB:.2f} GB, planned {planned / GB:.2f} GB "
            f"({measured / planned - 1:+.1%}; target {target / GB:.2f} GB)")
