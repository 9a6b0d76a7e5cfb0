"""Which of the planner's runtime candidates the closed loop (trainer/budget.py) runs next: what a step measured per
plan phase, corrected into expected peaks (Readings), and the three choices over the candidates of trainer/plan.py
(one notch smaller after an out-of-memory, the fastest that brings an over-plan phase under its target, the fastest
that fits the budget's slack). Pure: nothing here changes the plan or a live object."""
from __future__ import annotations

from trainer.plan import RUNTIME_KNOBS

# Sub-phases of the loop (State.timed) by the plan phase whose peak they belong to.
SUBPHASES = {"rollout": ("kv", "rollout"), "train": ("reward", "recompute", "train", "optimizer", "sync")}
KNOB_PHASE = {"micro_batch_tokens": "train", "token_chunk": "train", "gradient_checkpointing": "train",
              "checkpoint_in_graph": "train", "activation_offload": "train", "mlp_tile_tokens": "train",
              "kv_release": "train", "hf_batch_size": "rollout"}
# The knobs a notch changes; token_chunk follows micro_batch_tokens in the planner's candidates.
NOTCH_KNOBS = ("micro_batch_tokens", "gradient_checkpointing", "checkpoint_in_graph", "activation_offload",
               "mlp_tile_tokens", "kv_release", "hf_batch_size")


class Readings:
    """Per plan phase: the step's measured peak, and the largest measured/planned ratio seen so far (the anchor the
    corrected predictions scale by)."""

    def __init__(self):
        self.anchor: dict[str, tuple[float, float]] = {}  # phase -> (measured, planned) of its largest ratio
        self.errors: dict[str, float] = {}  # phase -> measured / planned - 1 in the last step

    @staticmethod
    def measured(peaks: dict) -> dict[str, int]:
        """Peak device memory of each plan phase from State.peaks (`used_<sub-phase>`)."""
        out = {}
        for phase, subs in SUBPHASES.items():
            vals = [peaks[f"used_{x}"] for x in subs if f"used_{x}" in peaks]
            if vals:
                out[phase] = max(vals)
        return out

    def record(self, measured: dict, cur: dict) -> None:
        """Take a step's measured phase peaks against the plan in force (`cur`, a candidate)."""
        for p, m in measured.items():
            planned = cur["phase_peaks"][p]
            if p not in self.anchor or m / planned > self.anchor[p][0] / self.anchor[p][1]:
                self.anchor[p] = (m, planned)
        self.errors = {p: m / cur["phase_peaks"][p] - 1 for p, m in measured.items()}

    def expected(self, phase: str, planned: float) -> float:
        """The planner's bytes for a phase corrected by the largest measured/planned ratio seen there: measured +
        ratio x (planned(k) - planned(now)), the ratio never below 1."""
        if phase not in self.anchor:
            return planned
        m, p = self.anchor[phase]
        return m + max(1.0, m / p) * (planned - p)


def speed(c: dict) -> tuple:
    """The planner's speed score; between equal scores, the larger HF batch."""
    return c["score"], c["hf_batch_size"]


def notch(candidates: list[dict], cur: dict, phase: str, free: set) -> dict | None:
    """One notch smaller in `phase`: the fastest candidate that differs from `cur` in one free knob of that phase and
    predicts a smaller peak there (and no larger one elsewhere). None when none is left."""
    mine = [k for k in NOTCH_KNOBS if KNOB_PHASE[k] == phase and k in free]

    def one_notch(c: dict) -> bool:
        diff = [k for k in NOTCH_KNOBS if c[k] != cur[k]]
        return (len(diff) == 1 and diff[0] in mine and c["phase_peaks"][phase] < cur["phase_peaks"][phase]
                and all(c["phase_peaks"][q] <= cur["phase_peaks"][q] for q in cur["phase_peaks"]))

    notches = [c for c in candidates if one_notch(c)]
    return max(notches, key=lambda c: (speed(c), -c["phase_peaks"][phase])) if notches else None


def shrink(candidates: list[dict], cur: dict, over: list[str], targets: dict, readings: Readings
           ) -> tuple[dict | None, list[str]]:
    """For the phases above target: the fastest candidate, changing only their knobs, that brings them under it (or
    the smallest there is). Returns (that candidate or None, the phases it can move); a phase no runtime knob can
    shrink (e.g. vLLM's rollout: its pools are fixed at start) is held where it is and does not stop the others."""
    def corr(c, p):
        return readings.expected(p, c["phase_peaks"][p])

    now = {p: corr(cur, p) for p in cur["phase_peaks"]}
    held = [k for k in RUNTIME_KNOBS if KNOB_PHASE[k] not in over]
    pool = [c for c in candidates if all(c[k] == cur[k] for k in held)
            and all(corr(c, p) <= max(targets[p], now[p]) for p in now if p not in over)]
    movable = [p for p in over if any(corr(c, p) < now[p] for c in pool)]
    if not movable:
        return None, []
    pool = [c for c in pool if all(corr(c, p) <= now[p] for p in over if p not in movable)]
    fits = [c for c in pool if all(corr(c, p) <= targets[p] for p in movable)]
    if fits:
        return max(fits, key=speed), movable
    return min(pool, key=lambda c: (max(corr(c, p) / targets[p] for p in movable), -c["score"])), movable


def grow(candidates: list[dict], cur: dict, targets: dict, readings: Readings) -> dict | None:
    """adapt: speed: the fastest candidate whose corrected peaks fit the targets, if it is faster than `cur`."""
    fits = [c for c in candidates
            if all(readings.expected(p, c["phase_peaks"][p]) <= targets[p] for p in c["phase_peaks"])]
    best = max(fits, key=speed, default=cur)
    return best if speed(best) > speed(cur) else None
