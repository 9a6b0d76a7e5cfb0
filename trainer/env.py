"""Facts about the machine that change behaviour: WSL (no pinned host memory), CUDA and bf16 support."""
from __future__ import annotations

import functools
import os
import platform

import torch


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
    out = []
    if is_wsl():
        out.append("WSL detected: pinned host memory is off (vLLM turns it off there too)")
    if not torch.cuda.is_available():
        out.append("no CUDA GPU visible: training runs on the CPU (nf4 through bitsandbytes' CPU kernels)")
    return out
