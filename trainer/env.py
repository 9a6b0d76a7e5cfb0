"""Facts about the machine that change behaviour: WSL (no pinned host memory), a GPU that torch cannot use."""
from __future__ import annotations

import functools
import os
import platform
import re
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
