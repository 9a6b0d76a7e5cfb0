"""User-caused errors: one exception type that names the field, the value and the fix; never used for bugs."""
from __future__ import annotations

# Exit codes of `train` (documented in README.md).
EXIT_OK = 0
USER_ERROR_EXIT = 2  # a problem in the recipe, data, rewards or budget: the message says which and how to fix it
EXIT_PREEMPTED = 3  # SIGTERM/SIGUSR1: the step finished, a checkpoint was written; rerun with --resume
EXIT_OOM = 4  # CUDA out of memory: the message names the phase and the knob; the last checkpoint is intact
EXIT_NONFINITE = 5  # too many consecutive steps with NaN/inf loss or gradients; the last checkpoint is intact


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing column, reward that returns NaN, budget too small).

    The CLI prints it as one message and exits with code 2, without a traceback. Internal bugs must raise
    ordinary exceptions instead, so that they keep their traceback.
    """

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.field}: {self.problem}"
        return text + (f"\n  fix: {self.fix}" if self.fix else "")
