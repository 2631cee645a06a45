"""What a sweep prints, and where everything else it used to print goes.

At the default level the terminal gets what a user reads: our stages' start and end lines
(the ``clo_ray`` loggers at INFO), one line per training step of each trial (rank 0's
metrics, as Tune receives them), one line per finished trial with its key metrics and the
sweep's progress (trials finished of all, elapsed, time left), warnings and errors from
anyone, and at the end the best-per-cell table. Everything else goes to log files: the
driver's whole log (Ray's, Tune's, Ray Data's INFO lines too) to ``<run>/logs/sweep.log``,
and the workers' output (Train workers, evaluation tasks, Ray Data actors: model loading bars,
DeepSpeed, Train's reports) to Ray's session logs, whose folder is printed. ``--verbose``
shows it all here as before.

Only the libraries' own switches are used: ``ray.init(log_to_driver=...)`` (workers' output
forwarded or not), Tune's ``RunConfig(verbose=...)`` and output engine plus a Tune callback
for our lines, Ray Data's ``DataContext`` progress bars, Optuna's and transformers' logging
switches, and Python logging's levels and handlers (:func:`quiet_libraries`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clo_ray import storage
from clo_ray.layout import RunLayout
from clo_ray.spec.grid import cell_of
from clo_ray.train.metrics import duration, loss_parts

logger = logging.getLogger(__name__)

CONSOLE_FORMAT = "%(asctime)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Metrics a finished trial's line shows, when it reports them.
TRIAL_METRICS = (("objective", "objective", False), ("target_fidelity", "fidelity", True),
                 ("english_retention", "English", True), ("target_nll", "NLL", False))


class _OursOrWarnings(logging.Filter):
    """Our INFO lines, and anyone's warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("clo_ray") or record.levelno >= logging.WARNING


class _Stderr(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is when a record comes (a test's captured
    stream, replaced between runs in one process, is never written after it closed)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_CONSOLE_HANDLER: logging.Handler | None = None


def configure_logging(verbose: bool) -> None:
    """The driver's console handler (module docstring), replacing the one a previous call
    set; everything at INFO when verbose."""
    global _CONSOLE_HANDLER
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if _CONSOLE_HANDLER is not None:
        root.removeHandler(_CONSOLE_HANDLER)
    _CONSOLE_HANDLER = _Stderr()
    _CONSOLE_HANDLER.setFormatter(logging.Formatter(CONSOLE_FORMAT, datefmt="%H:%M:%S"))
    if not verbose:
        _CONSOLE_HANDLER.addFilter(_OursOrWarnings())
    root.addHandler(_CONSOLE_HANDLER)


_FILE_HANDLER: logging.Handler | None = None


def log_to_file(path: str | None) -> None:
    """Every record of the driver, at INFO, also to ``path`` (a local file, appended), instead
    of the file set before (a second sweep in one process logs to its own run's file);
    None: stop writing the file."""
    global _FILE_HANDLER
    root = logging.getLogger()
    if _FILE_HANDLER is not None:
        root.removeHandler(_FILE_HANDLER)
        _FILE_HANDLER.close()
        _FILE_HANDLER = None
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _FILE_HANDLER = logging.FileHandler(path, encoding="utf-8")
    _FILE_HANDLER.setFormatter(logging.Formatter(FILE_FORMAT))
    _FILE_HANDLER.setLevel(logging.INFO)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    root.addHandler(_FILE_HANDLER)


@contextmanager
def logging_to(path: str) -> Iterator[str]:
    """:func:`log_to_file` for the duration of a sweep."""
    log_to_file(path)
    try:
        yield path
    finally:
        log_to_file(None)


def quiet_libraries() -> None:
    """The libraries' own switches for the quiet console, before Ray starts: the Ray
    libraries' and Optuna's driver-side records go through the root logger's handlers (the
    console filter, the log file) instead of their own stream handlers; Ray Data's progress
    bars are off (and so is its notice saying so), and so are transformers' (a local judge
    loads its model in the driver); Tune uses its classic output engine, which
    at ``verbose=0`` prints nothing (the new one prints an experiment box and paths at any
    verbosity) while our callback prints the trials' lines."""
    import os

    import optuna
    import ray.data
    import transformers

    for name in ("ray", "ray.data", "ray.tune", "ray.train", "ray.air"):
        lib = logging.getLogger(name)
        for handler in list(lib.handlers):
            if isinstance(handler, logging.StreamHandler) and \
                    not isinstance(handler, logging.FileHandler):
                lib.removeHandler(handler)
        lib.propagate = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()  # a local judge loads in the driver
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


class SweepConsole:
    """The lines of the trials' progress (module docstring), counted over the sweep."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.before = 0  # trials of earlier experiments (this run's or a resumed one's)
        self.finished = self.failed = self.ran = 0
        self.started = time.perf_counter()
        self.trial_started: dict[str, float] = {}
        self.last_loss: dict[str, float] = {}  # each running trial's latest training loss

    def experiment(self, finished_before: int) -> None:
        """An experiment starts; ``finished_before`` trials ended in earlier ones."""
        self.before = finished_before

    def trial_start(self, trial: Any) -> None:
        self.trial_started[trial.trial_id] = time.perf_counter()

    def step(self, trial: Any, result: Mapping[str, Any]) -> None:
        if trial.trial_id not in self.trial_started:  # started before a restore
            self.trial_started[trial.trial_id] = time.perf_counter()
        if "stage_step" not in result or result.get("trial_done"):
            return
        if isinstance(result.get("train_loss"), (int, float)):
            self.last_loss[trial.trial_id] = float(result["train_loss"])
        logger.info("  %s  step %d/%d | %s | %.0f tok/s | ETA %s", trial_label(trial),
                    int(result["step"]), int(result.get("steps_total", result["step"])),
                    loss_parts(result), float(result.get("tokens_per_s", 0.0)),
                    duration(float(result.get("eta_s", 0.0))))

    def done(self, trial: Any, result: Mapping[str, Any] | None, ended: int, *,
             error: bool = False) -> None:
        """``trial`` ended; ``ended`` trials of its experiment have (restored ones too)."""
        self.finished = self.before + ended
        self.failed += int(error)
        self.ran += 1
        now = time.perf_counter()
        took = now - self.trial_started.pop(trial.trial_id, self.started)
        result = result or {}
        if error:
            what = "failed (its error is above; the sweep goes on)"
        elif not result.get("trial_done"):
            what = f"stopped early at step {int(result.get('step', 0))} by the scheduler"
        else:
            parts = [_metric(result, *m) for m in TRIAL_METRICS if m[0] in result]
            if trial.trial_id in self.last_loss:
                parts.insert(0, f"loss {self.last_loss[trial.trial_id]:.4f}")
            what = " | ".join(parts) or "done"
        self.last_loss.pop(trial.trial_id, None)
        logger.info("trial %s: %s (%s)", trial_label(trial), what, duration(took))
        elapsed = now - self.started
        left = max(self.total - self.finished, 0)
        eta = f"about {duration(elapsed / self.ran * left)} left" if left else "all done"
        logger.info("sweep: %d/%d trials finished%s | %s elapsed | %s", self.finished,
                    self.total, f" ({self.failed} failed)" if self.failed else "",
                    duration(elapsed), eta)


# The sweep's console in this (the driver's) process: the Tune callback
# (:mod:`clo_ray.sweep.console_callback`), which Tune stores with an experiment, finds it
# here, also after a restore.
_CONSOLE: SweepConsole | None = None


def start_console(total: int) -> SweepConsole:
    global _CONSOLE
    _CONSOLE = SweepConsole(total)
    return _CONSOLE


def current_console() -> SweepConsole | None:
    return _CONSOLE


def driver_log(layout: RunLayout) -> str:
    """Where the driver's log goes: ``<run>/logs/sweep.log`` when the run folder is local,
    else the same name under the system's temp folder (a log file is appended line by line,
    which object stores cannot do)."""
    import pyarrow.fs

    filesystem, path = storage.resolve(layout.uri, layout.options)
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return str(Path(path) / "logs" / "sweep.log")
    import tempfile

    return str(Path(tempfile.gettempdir()) / "clo-ray" / layout.name / "logs" / "sweep.log")


def trial_label(trial: Any) -> str:
    """``model/language/method/budget #k`` (``rN`` for a repeat) from a trial's config."""
    config = trial.config or {}
    config = config.get("job", config)
    label = "/".join(str(v) for v in cell_of(config)) if "cell" in config else "?"
    label += f" #{config.get('cell_trial', '?')}"
    return label + (f" r{config['repeat']}" if config.get("repeat") else "")


def _metric(result: Mapping[str, Any], key: str, label: str, percent: bool) -> str:
    value = result[key]
    if not isinstance(value, (int, float)):
        return f"{label} n/a"
    return f"{label} {100 * value:.1f}%" if percent else f"{label} {value:.4f}"
