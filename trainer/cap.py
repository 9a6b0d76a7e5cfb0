"""The process-level memory cap: torch's caching allocator is held to the budget minus everything this process holds
outside it, measured rather than guessed, and lowered at once whenever that outside part grows.

nvidia-smi counts all of a process's device memory; `torch.cuda.set_per_process_memory_fraction` bounds only torch's
caching allocator. The rest (the CUDA context, kernel modules loaded on first use, cuBLAS handles, vLLM's and NCCL's
own buffers, CUDA-graph executables) is outside torch's accounting. Seen on one H200 (2026-12-02, 7B shape, 8 x 1024 at
a 15 GB budget): the allocator held its 14.21 GB cap (the budget less the planner's 0.79 GB estimate of that outside
part) and the process peaked at 16.06 GB in nvidia-smi.

The accounting, at any instant:
    device memory used  =  outside  +  (torch reserved  -  KV bytes released)
`released`: vLLM's KV pages handed back to CUDA between rollouts (trainer/rollout/vllm.py): their segments stay in
torch's reserved bytes (and in what the fraction is checked against) while the device no longer holds them. The cap
keeps `torch reserved <= budget - outside_assumed + released`, so `used <= budget` for as long as `outside` stays at
or under `outside_assumed`. So `outside` is watched, not assumed:
- before vLLM or any weight loads, `outside_assumed` is the planner's estimate (plan.NON_TORCH components);
- `calibrate()` once the engine and the policy are up puts the measured value (plus MARGIN) in its place;
- `observe()`, called by the memory sampler every 0.1 s (trainer/metrics.py), keeps MARGIN above the outside part
  seen in two readings in a row (a reading during which torch's reserved bytes moved is dropped), lowering the cap
  as soon as it grows, so torch's next new segment is refused inside the budget (an OOM the closed loop retries one
  notch smaller: trainer/budget.py) instead of the process growing past it;
- a lowered fraction refuses torch's next new segment, but blocks already cached stay on the device: `enforce()` at
  each phase boundary (trainer/grpo.py, main thread) empties torch's cache when it holds more than the cap allows;
- `check()` after each step takes one more reading and reports the cap in the step's metrics.
So the device stays within the budget as long as the outside part grows by less than MARGIN in two readings
and torch's live tensors fit the lowered cap; where they do not, torch's next segment is refused and the closed loop
retries the step one notch smaller (trainer/budget.py).
The cap is only ever lowered by growth, never raised again by a smaller reading (the outside part does not shrink
in practice, and a reading taken while torch frees and CUDA has not yet reused memory would be too small).

Used memory is the device's (`cudaMemGetInfo`, what nvidia-smi shows), or NVML's per-process count where another
process shares the GPU (else the neighbours' memory would be counted as ours: a tighter, still safe cap).
"""
from __future__ import annotations

import os
import threading

import torch

from trainer.memory import GB, MiB

# Added to each measured outside part: what can appear between two of the sampler's readings (0.1 s) before the cap
# is lowered, e.g. a kernel module loaded on first use; also absorbs the reading's own jitter.
MARGIN = 96 * MiB


def apply_segments(plan) -> bool:
    """Expandable segments for torch's allocator where the plan asks for them (Plan.expandable_segments), before
    anything allocates: set in torch and in PYTORCH_CUDA_ALLOC_CONF, which vLLM reads to turn them off around its
    sleep-mode pool (vllm/device_allocator/cumem.py). A PYTORCH_CUDA_ALLOC_CONF that names expandable segments
    already is the user's and stands. Returns whether they were turned on."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if not plan.expandable_segments or not torch.cuda.is_available() or "expandable_segments" in conf:
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(x for x in (conf, "expandable_segments:True") if x)
    torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    return True


class Cap:
    """The allocator cap of one run. `enabled` only with a budget on a CUDA device."""

    def __init__(self, plan, set_fraction=None, device_total: int | None = None, used_fn=None, reserved_fn=None,
                 empty_cache=None):
        self.plan = plan
        self.enabled = plan.allocator_fraction is not None and (set_fraction is not None or torch.cuda.is_available())
        self.budget = plan.budget_bytes
        self.released = 0
        # The planner's estimate until measured; plan.allocator_cap_bytes = budget - outside_assumed.
        self.outside_assumed = (self.budget - plan.allocator_cap_bytes) if self.enabled else 0
        self.outside_measured = 0  # the largest measured so far (0: not measured yet)
        self.lowered = 0  # times the cap was lowered after calibration
        self.shared = False  # another process is on this GPU (set by calibrate): readings are per process then
        self._previous: int | None = None  # observe()'s last reading
        self._lock = threading.Lock()
        self._set = set_fraction or _set_fraction
        self._total = device_total
        # The device is fixed here: observe() runs in the sampler's thread, whose current device is not the run's.
        self.device = torch.cuda.current_device() if self.enabled and set_fraction is None else None
        self._used = used_fn or (lambda: process_device_bytes(self.device))
        self._reserved = reserved_fn or (lambda: torch.cuda.memory_reserved(self.device))
        self._empty_cache = empty_cache or torch.cuda.empty_cache

    # ------------------------------------------------------------------------------------ setting the fraction

    def total(self) -> int:
        """The bytes torch's memory fraction is a fraction of (the device's total memory)."""
        if self._total is None:
            self._total = torch.cuda.get_device_properties(self.device).total_memory
        return self._total

    def apply(self) -> float | None:
        """Set torch's fraction from the current assumption and KV release. Returns the fraction, or None."""
        if not self.enabled:
            return None
        cap = self.budget - self.outside_assumed
        fraction = min(1.0, max(0.0, cap + self.released) / self.total())
        self.plan.allocator_cap_bytes, self.plan.allocator_fraction = int(cap), min(1.0, max(0.0, cap) / self.total())
        self._set(float(fraction), self.device)
        return fraction

    def kv_change(self, released: int) -> float | None:
        """The engine released (released > 0) or re-mapped (0) its KV pool."""
        with self._lock:
            self.released = int(released)
            return self.apply()

    # ------------------------------------------------------------------------------------ measuring

    def outside(self, used: int | None = None) -> int | None:
        """Device memory this process holds outside torch's caching allocator, now; None when torch's reserved bytes
        moved during the reading (a segment allocated between the device's count and torch's would otherwise look
        like outside memory, a whole segment of it)."""
        before = self._reserved()
        used = self._used() if used is None else used
        after = self._reserved()
        if before != after:
            return None
        return max(0, used - (after - self.released))

    def calibrate(self) -> float | None:
        """Once the engine and the policy are up: the measured outside part (plus MARGIN) replaces the planner's
        estimate, up or down. Returns the new fraction, or None."""
        if not self.enabled:
            return None
        with self._lock:
            self.shared = other_processes(self.device)
            measured = None
            while measured is None:  # the main thread allocates nothing meanwhile; the sampler's thread never does
                measured = self.outside()
            planned = self.outside_assumed
            self.outside_measured = max(self.outside_measured, measured)
            self.outside_assumed = measured + MARGIN
            self.plan.notes.append(f"allocator cap calibrated: {measured / GB:.2f} GB held outside torch's allocator "
                                   f"(planned {planned / GB:.2f} GB), cap {(self.budget - self.outside_assumed) / GB:.2f}"
                                   f" GB of the {self.budget / GB:.2f} GB budget")
            return self.apply()

    def observe(self, used: int) -> bool:
        """One reading of the device's used memory (the sampler's thread): lower the cap at once if the outside part
        grew past the assumption. Returns True when it lowered the cap."""
        if not self.enabled:
            return False
        with self._lock:
            now = self.outside(None if self.shared else used)
            if now is None:
                return False
            # Two readings in a row: a transient (memory freed by torch and not yet by CUDA) lowers nothing.
            previous, self._previous = self._previous, now
            if previous is None:
                return False
            measured = min(now, previous)
            self.outside_measured = max(self.outside_measured, measured)
            if measured + MARGIN <= self.outside_assumed:
                return False
            self.outside_assumed = measured + MARGIN
            self.lowered += 1
            self.apply()
            return True

    def enforce(self) -> bool:
        """At a phase boundary (main thread, nothing captured or in flight): if torch holds more than the cap allows
        since it was lowered, hand its cached free blocks back to CUDA. (A lowered fraction only refuses torch's next
        new segment; blocks already cached stay on the device until emptied.) Returns True when it emptied."""
        if not self.enabled:
            return False
        if self._reserved() <= self.budget - self.outside_assumed + self.released:
            return False
        self._empty_cache()
        return True

    def check(self) -> dict:
        """After a step (main thread): one more reading, and the cap's state for the step's metrics."""
        if not self.enabled:
            return {}
        self.observe(self._used())
        return {"budget/outside_torch_gb": self.outside_measured / GB,
                "budget/cap_gb": (self.budget - self.outside_assumed) / GB, "budget/cap_lowered": self.lowered}


def _set_fraction(fraction: float, device: int | None) -> None:
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def _nvml_processes(device: int | None) -> list | None:
    """NVML's compute processes on this GPU, or None where NVML gives no per-process list (no NVML, containers)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        return list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except Exception:
        return None


def other_processes(device: int | None = None) -> bool:
    """Whether NVML lists another compute process on this GPU."""
    return any(p.pid != os.getpid() for p in _nvml_processes(device) or [])


def process_device_bytes(device: int | None = None) -> int:
    """Device memory this process uses: the device's used memory (what nvidia-smi shows) when no other process is
    on it, else NVML's per-process count for this process (a shared GPU's other processes excluded)."""
    free, total = torch.cuda.mem_get_info(device)
    procs = _nvml_processes(device) or []
    mine = [p.usedGpuMemory for p in procs if p.pid == os.getpid() and p.usedGpuMemory]
    if mine and any(p.pid != os.getpid() for p in procs):
        return int(mine[0])
    return total - free
