"""The sweep's console without a sweep: the progress arithmetic, the trial lines and the
terminal table (tests/test_sweep.py checks a real sweep's terminal)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pyarrow as pa

from clo_ray.report.results import Results
from clo_ray.report.schema import results_schema
from clo_ray.report.terminal import best_cells_text
from clo_ray.sweep.console import SweepConsole, trial_label


def trial(trial_id: str, method: str, repeat: int = 0) -> SimpleNamespace:
    job = {"cell": {"model": "m", "language": "sw", "method": method, "budget": 8},
           "cell_trial": 1, "repeat": repeat}
    return SimpleNamespace(trial_id=trial_id, config={"job": job} if repeat else job)


def test_trial_labels_name_the_cell_and_the_repeat():
    assert trial_label(trial("a", "clo")) == "m/sw/clo/8 #1"
    assert trial_label(trial("b", "sft", repeat=2)) == "m/sw/sft/8 #1 r2"


def test_progress_counts_restored_trials_and_estimates_what_is_left(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 70.0, 130.0])  # start, trial start, two trial ends
    monkeypatch.setattr("clo_ray.sweep.console.time.perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="clo_ray.sweep.console")
    console = SweepConsole(total=6)
    console.experiment(finished_before=2)  # an earlier experiment's trials
    console.trial_start(trial("a", "clo"))
    console.step(trial("a", "clo"), {"stage_step": 2, "step": 2, "steps_total": 2,
                                     "train_loss": 1.25, "tokens_per_s": 90.0, "eta_s": 0.0})
    console.done(trial("a", "clo"), {"trial_done": True, "objective": 0.5,
                                     "target_fidelity": 0.75}, ended=2)  # 1 restored + a
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "  m/sw/clo/8 #1  step 2/2 | loss 1.2500 | 90 tok/s | ETA 0m00s"
    assert lines[1] == ("trial m/sw/clo/8 #1: loss 1.2500 | objective 0.5000 | fidelity 75.0% "
                        "(1m00s)")
    # 4 of 6 done; one trial ran in this process, in 70 s since the start: 2 left -> 2m20s
    assert lines[2] == "sweep: 4/6 trials finished | 1m10s elapsed | about 2m20s left"
    console.done(trial("b", "sft"), {"step": 3}, ended=3, error=False)
    assert caplog.records[-2].getMessage().startswith(
        "trial m/sw/sft/8 #1: stopped early at step 3 by the scheduler")


def test_the_terminal_table_has_a_line_per_cell_and_base_model():
    rows = [{"run": "r", "trial_id": t, "model": "m", "language": "sw", "method": method,
             "budget": budget, "status": "completed", "objective": objective,
             "target_fidelity": fidelity}
            for t, method, budget, objective, fidelity in (
                ("1", "clo", 8, 0.6, 0.5), ("2", "clo", 8, 0.7, 0.25),
                ("3", "sft", 8, 0.1, 1.0), ("base", "base", 0, None, 0.125))]
    res = Results.from_table(pa.Table.from_pylist(rows, schema=results_schema()))
    text = best_cells_text(res, ["objective", "target_fidelity"]).splitlines()
    assert text[0].startswith("best trial per cell (by objective")
    assert text[1].split() == ["model", "language", "method", "budget", "objective",
                               "target_fidelity", "(%)"]
    assert [line.split() for line in text[3:]] == [
        ["m", "sw", "base", "0", "n/a", "12.5"],
        ["m", "sw", "CLO", "8", "0.700", "25.0"],  # the best trial by objective, not the
        ["m", "sw", "SFT", "8", "0.100", "100.0"]]  # best fidelity


def test_no_cells_no_table():
    res = Results.from_table(pa.Table.from_pylist([], schema=results_schema()))
    assert best_cells_text(res, ["objective"]) == ""
