"""The allocator cap on a real GPU (trainer/cap.py): torch allocates until the cap refuses, and the device's used
memory (what nvidia-smi shows) stays within the budget; memory taken outside torch (CuPy's cudaMalloc here, as a
kernel module or a library's buffer would be) lowers the cap, and torch's cached blocks are handed back, so the
device stays within the budget again. Run on the device: pytest -m gpu."""
from __future__ import annotations

import types

import pytest
import torch

from trainer.cap import MARGIN, Cap
from trainer.memory import GB, MiB

pytestmark = pytest.mark.gpu
CHUNK = 256 * MiB


def used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def fill(held: list, budget: int) -> int:
    """Allocate CHUNK tensors until the cap refuses one; return the largest device use seen (checked after each)."""
    worst = used()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        for _ in range(10**4):
            held.append(torch.empty(CHUNK, dtype=torch.uint8, device="cuda"))
            worst = max(worst, used())
    return worst


def test_a_real_cap_keeps_the_device_within_the_budget_as_memory_outside_torch_grows():
    cupy = pytest.importorskip("cupy")
    torch.cuda.empty_cache()
    budget = used() + 4 * 10**9  # whatever this process already holds, plus 4 GB
    plan = types.SimpleNamespace(budget_bytes=budget, allocator_cap_bytes=budget - int(0.8 * GB),
                                 allocator_fraction=0.0, notes=[])
    cap = Cap(plan)
    assert cap.enabled
    cap.apply()
    cap.calibrate()
    held: list[torch.Tensor] = []
    try:
        worst = fill(held, budget)
        assert worst <= budget, f"device used {worst / GB:.3f} GB, budget {budget / GB:.3f} GB"
        assert worst > budget - MARGIN - 2 * CHUNK  # the budget was usable, not shunned
        del held[len(held) // 2:]  # half freed: cached in torch, still on the device
        outside = cupy.cuda.alloc(10**9)  # 1 GB outside torch's allocator
        assert used() > budget  # over: what the cap must now correct
        for _ in range(2):  # two readings in a row, as the sampler takes them
            cap.observe(used())
        assert cap.lowered == 1 and cap.outside_measured >= 10**9
        assert cap.enforce() is True  # the phase boundary hands torch's cached blocks back
        assert used() <= budget
        worst = fill(held, budget)
        assert worst <= budget, f"device used {worst / GB:.3f} GB after the outside growth"
        del outside
    finally:
        held.clear()
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
