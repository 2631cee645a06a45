"""Tune's events as the sweep's console lines (:mod:`clo_ray.sweep.console`).

Apart from the console so that ``--plan`` and the logging setup never import Ray Tune. Tune
stores the callback with its experiment; it holds no state and prints through the console of
the process it runs in, so a restored experiment prints to the current sweep's console.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from clo_ray.sweep.console import current_console


class ConsoleCallback(tune.Callback):
    """Tune's events -> :class:`SweepConsole` lines (nothing when no console is set)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (console := current_console()) is not None:
            console.trial_start(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if (console := current_console()) is not None:
            console.step(trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (console := current_console()) is not None:
            console.done(trial, trial.last_result, _ended(trials, trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if (console := current_console()) is not None:
            console.done(trial, trial.last_result, _ended(trials, trial), error=True)


def _ended(trials: list, trial: Any) -> int:
    """Trials of the experiment that have ended, ``trial`` included (restored ones too: Tune
    sends no event for a trial that had finished before a restore)."""
    return 1 + sum(t is not trial and t.status in ("TERMINATED", "ERROR") for t in trials)


