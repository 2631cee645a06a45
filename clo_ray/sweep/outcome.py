"""What the tune stage ended with, said out loud: finished, failed trials, or interrupted.

Tune returns a ResultGrid in all three cases (a first Ctrl-C makes it save its state and
return early; a trial's exception is kept in its result), so a sweep that only wrote the
grid out would exit 0 with 2 of 12 trials done. :func:`tune_outcome` reads the grid;
the sweep's CLI turns it into the exit code (1: failed trials, 130: interrupted) and refuses
to present a partial experiment as a finished report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clo_ray.errors import CloRayError
from clo_ray.spec.grid import cell_of

EXIT_TRIALS_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class SweepInterrupted(CloRayError):
    """The sweep stopped before its trials finished (Ctrl-C, or Tune stopped early)."""


@dataclass(frozen=True)
class FailedTrial:
    """A trial that raised: its cell, its error's first line and where the whole log is."""

    cell: str
    params: str
    error: str
    log: str


@dataclass(frozen=True)
class TuneOutcome:
    planned: int  # trials the spec asks for
    finished: int  # ended normally (completed, or stopped early by the scheduler)
    failed: list[FailedTrial] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return self.finished + len(self.failed) < self.planned

    def summary(self) -> str:
        """Lines a user reads at the end of the sweep (empty when all trials finished)."""
        lines = []
        if self.failed:
            lines.append(f"{len(self.failed)} of {self.planned} trial(s) failed:")
            for trial in self.failed:
                lines.append(f"  - {trial.cell} {trial.params}: {trial.error}")
                lines.append(f"    log: {trial.log}")
        if self.interrupted:
            lines.append(f"interrupted: {self.finished + len(self.failed)} of {self.planned} "
                         "trial(s) ended; the experiment's state is saved")
        return "\n".join(lines)


def tune_outcome(grid: Any, planned: int) -> TuneOutcome:
    """Count the grid's trials (a ``ray.tune.ResultGrid``) against ``planned``."""
    failed = []
    for result in grid:
        if result.error is None:
            continue
        config = result.config or {}
        cell = "/".join(str(v) for v in cell_of(config)) if "cell" in config else "?"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted((config.get("params") or {}).items()))
        failed.append(FailedTrial(cell=cell, params=f"({params})" if params else "",
                                  error=first_line(result.error),
                                  log=f"{result.path}/error.txt"))
    return TuneOutcome(planned=planned, finished=grid.num_terminated, failed=failed)


def first_line(error: BaseException) -> str:
    """The line of an error that says what went wrong: Ray wraps a trial's exception in
    RayTaskError / TrainingFailedError text whose first lines are a traceback header, so the
    last non-empty line of the innermost message is the user's error."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "Traceback", "^", "~")):
            return line[:300]
    return type(error).__name__
