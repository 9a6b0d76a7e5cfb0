"""Where torch.compile keeps what it builds (inductor's FX graph, AOTAutograd and Triton kernel caches): a directory
that outlives the machine's /tmp, so the next run of the same shapes, on this node or any node that shares the
directory, loads the compiled layers instead of compiling them again."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from trainer.errors import UserError

ENV = "TORCHINDUCTOR_CACHE_DIR"
log = logging.getLogger(__name__)


def default_dir() -> Path | None:
    """$XDG_CACHE_HOME/trainer/torch_compile, ~/.cache/trainer/torch_compile where that is unset (beside vLLM's
    ~/.cache/vllm). torch's own default is /tmp/torchinductor_<user>, gone with the node's /tmp: a Slurm job's private
    /tmp, a reboot, a fresh cloud machine. None where no home directory is known."""
    root = os.environ.get("XDG_CACHE_HOME")
    if not root:
        try:
            root = Path.home() / ".cache"
        except RuntimeError:
            return None
    return Path(root) / "trainer" / "torch_compile"


def use(recipe) -> Path | None:
    """Point inductor at train.compile_cache_dir where the recipe names one; else leave $TORCHINDUCTOR_CACHE_DIR
    where the environment sets it to a directory of its own; else default_dir(). Call before the policy compiles
    (inductor reads the variable whenever it writes). A directory the recipe names that cannot be written is the
    user's to fix; the default, where it cannot be written (a read-only home), leaves torch's own. Returns the
    directory in use (None: torch's default)."""
    named = recipe.train.compile_cache_dir
    if named is None and os.environ.get(ENV) and not _torchs_default(os.environ[ENV]):
        return Path(os.environ[ENV])
    path = Path(named).expanduser() if named else default_dir()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable", str(path))
    except OSError as e:
        if named:
            raise UserError("train.compile_cache_dir", f"cannot write {path}: {e.strerror or e}",
                            "name a directory this user can write, or leave the field out "
                            "($XDG_CACHE_HOME or ~/.cache, trainer/torch_compile)") from None
        log.warning("compiled layers not cached across runs: cannot write %s (%s); torch's default under /tmp instead",
                    path, e.strerror or e)
        return None
    os.environ[ENV] = str(path.resolve())
    return path


def _torchs_default(value: str) -> bool:
    """Whether the variable holds torch's own default: inductor writes it there the first time anything asks where its
    cache is, which importing bitsandbytes does (its ops module wraps functions in torch.compile), so by the time a run
    starts the variable is set whether or not anyone chose it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(value) == os.path.abspath(default_cache_dir())
