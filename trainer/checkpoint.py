"""Checkpoints: the LoRA adapter in peft format, optimizer, scheduler, RNG and step, written atomically.

A checkpoint is built in a hidden temporary directory, every file fsync'ed, then renamed into place: a crash at
any moment leaves either the previous set of checkpoints or the new one, never a partial one. `latest()` only
sees renamed directories whose manifest lists files of the recorded sizes. It never touches the base model.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError

PREFIX = "step-"
MANIFEST = "manifest.json"


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, model, optimizer, scheduler, extra: dict, keep: int) -> Path:
    """Write checkpoint `step` (the number of completed steps) atomically; prune to the newest `keep`."""
    root = ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)  # adapter_model.safetensors + adapter_config.json
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "trainer_state.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
        for p in tmp.iterdir():
            _fsync(p)
        _fsync(tmp)
        if os.environ.get("TRAINER_TEST_SLOW_CHECKPOINT"):  # test hook: widen the window before the atomic rename
            time.sleep(float(os.environ["TRAINER_TEST_SLOW_CHECKPOINT"]))
        if final.exists():  # a re-save of the same step (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest(run_dir)
        kept = f"the previous checkpoint {prev.name} is intact" if prev else "no earlier checkpoint exists"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError("checkpoint", f"disk full while writing {final.name} ({kept})",
                            f"free space on {root} and rerun with --resume") from None
        raise UserError("checkpoint", f"cannot write {final.name}: {e} ({kept})",
                        f"check that {root} is writable and rerun with --resume") from None
    for old in complete(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and _valid(p))


def latest(run_dir: Path) -> Path | None:
    found = complete(run_dir)
    return found[-1] if found else None


def _valid(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter, optimizer, scheduler and RNG from a checkpoint directory; returns its state.json."""
    if not _valid(path):
        raise UserError("--resume", f"{path} is not a complete checkpoint (missing or truncated files)",
                        "resume from another checkpoint in the run's checkpoints/ directory, or start a new run")
    try:
        _set_adapter(path, model)
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return json.loads((path / "state.json").read_text())
    except UserError:
        raise
    except Exception as e:
        raise UserError("--resume", f"cannot load {path}: {e.__class__.__name__}: {str(e)[:200]}",
                        "the checkpoint is corrupt or from another recipe; resume from an earlier one or start anew"
                        ) from None


def _set_adapter(path: Path, model) -> None:
    """Copy the adapter weights of `path` into the peft model; every LoRA tensor must be covered, none left over."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"unexpected adapter keys {result.unexpected_keys[:3]}")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"the adapter lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")


def find(run_dir: Path, step: int | None = None) -> Path:
    """A run's checkpoint to read: the given step's, or the latest complete one (UserError when there is none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("run dir", f"not found: {run_dir}", "give the directory of a run, e.g. runs/tiny-cpu")
    found = complete(run_dir)
    have = ", ".join(str(int(p.name[len(PREFIX):])) for p in found) or "none"
    if step is None:
        if not found:
            raise UserError("checkpoint", f"no complete checkpoint under {ckpt_root(run_dir)}",
                            "train the recipe first (checkpoints are written every checkpoint.save_steps steps "
                            "and at the end)")
        return found[-1]
    path = ckpt_root(run_dir) / f"{PREFIX}{step:07d}"
    if path not in found:
        raise UserError("--step", f"no complete checkpoint of step {step} in {ckpt_root(run_dir)} (steps: {have})",
                        "pick one of the listed steps, or leave --step out for the latest")
    return path


def load_adapter(path: Path, model, field: str = "--checkpoint") -> None:
    """Load only the adapter of a checkpoint (or of a peft adapter directory) into the policy's peft model."""
    path = Path(path)
    if not (path / "adapter_model.safetensors").is_file():
        raise UserError(field, f"{path} holds no adapter_model.safetensors"
                        if path.is_dir() else f"checkpoint not found: {path}",
                        "give a checkpoints/step-NNNNNNN directory of a run (or a peft adapter directory)")
    if (path / MANIFEST).is_file() and not _valid(path):
        raise UserError(field, f"{path} is not a complete checkpoint (missing or truncated files)",
                        "use another checkpoint in the run's checkpoints/ directory")
    try:
        _set_adapter(path, model)
    except Exception as e:
        raise UserError(field, f"cannot load the adapter of {path}: {e.__class__.__name__}: {str(e)[:300]}",
                        "the adapter was trained with another lora section or model than this recipe's; use the "
                        "recipe of its run (runs/<name>/recipe.json)") from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
