"""Facts about the machine that change behaviour: WSL (no pinned host memory), a GPU that torch cannot use."""
from __future__ import annotations

import functools
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

# The NVIDIA kernel driver's version file: there on any Linux machine with an NVIDIA GPU and its driver installed
DRIVER_FILE = Path("/proc/driver/nvidia/version")


@functools.cache
def is_wsl() -> bool:
    """Windows Subsystem for Linux: pinned host memory is slow or fails there (a known trap), so we never pin."""
    if os.environ.get("TRAINER_ASSUME_WSL") == "1":  # test hook
        return True
    return "microsoft" in platform.uname().release.lower()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy; through pinned memory (asynchronous) on CUDA, except under WSL."""
    if torch.device(device).type == "cuda" and not is_wsl():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def notes() -> list[str]:
    return ["WSL detected: pinned host memory is off (vLLM turns it off there too)"] if is_wsl() else []


def unusable_gpu() -> tuple[str, str] | None:
    """(why, fix) when this machine has an NVIDIA GPU and driver that this torch cannot use: a CPU-only torch build,
    or a CUDA build newer than the driver supports (torch 2.11's CUDA 13, which vLLM 0.26 pins, needs driver 580 or
    later). torch then reports no GPU and a run would train on the CPU. None: no NVIDIA driver here, or torch uses it."""
    if torch.cuda.is_available():
        return None
    try:
        text = DRIVER_FILE.read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \S+)?\s+([\d.]+)", text)
    driver = f"driver {found.group(1)}" if found else "its driver"
    if torch.version.cuda is None:
        return (f"this machine has an NVIDIA GPU ({driver}) and torch {torch.__version__} is a CPU-only build",
                "install torch's CUDA build: bash scripts/install.sh on this machine (it installs the CPU build only "
                "where nvidia-smi is missing), or pip install torch from https://download.pytorch.org/whl/")
    try:
        torch.cuda.init()
        why = "torch sees no CUDA device"
    except Exception as e:  # e.g. "The NVIDIA driver on your system is too old (found version 12040)"
        why = str(e).strip().splitlines()[0][:300]
    return (f"this machine has an NVIDIA GPU ({driver}) that torch {torch.__version__} (CUDA {torch.version.cuda}) "
            f"cannot use: {why}", "update the NVIDIA driver, or install the torch build for the CUDA version the "
            "driver supports (nvidia-smi shows it)")


def host_us_per_op(device: str = "cpu", ops: int = 64, rounds: int = 5) -> float:
    """Host time of one small autograd op on this machine and device, in microseconds: the median of `rounds` rounds
    of `ops` element-wise ops on an 8-element tensor and their backward, synchronised (a few ms in all). The kernels
    are too small for the device to be the limit, so this is the host's Python, dispatch and launch speed: the same
    work that bounds a step's small micro-batches and HF decode steps, which ran up to 3x apart from host to host
    (config A's eight 286-token micro-batches, 2026-12-05: train phase 0.9 s on an H100 host, 1.6-2.1 and 2.7-3.3 s
    on two H200 hosts, with the rollout's GPU time equal on all three).
    Recorded in the plan (plan.host_us_per_op) so the step model's host terms can be fitted across hosts."""
    cuda = device == "cuda"
    x = torch.ones(8, device=device, requires_grad=True)
    times = []
    for _ in range(rounds + 1):  # the first round warms the allocator and the autograd engine
        t0 = time.perf_counter()
        y = x
        for _ in range(ops // 2):
            y = y * 1.0001 + 0.5
        y.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / ops * 1e6)
    return round(statistics.median(times[1:]), 3)
