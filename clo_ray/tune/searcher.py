"""One Optuna study per grid cell, inside one Ray Tune experiment.

The paper's grid (model x language x method x budget) is crossed exhaustively; inside each
cell an Optuna sampler explores the spec's search space. Cells must not learn from each other
(a learning rate that suits Llama-2-13B on Swahili says little about Qwen2.5-3B on German),
yet all trials of all cells should run concurrently on the cluster. :class:`CellSearcher` is a
Tune ``Searcher`` that routes every suggestion and every result to its cell's own study.

Its state is plain JSON (finished trials per cell, replayed into fresh studies on restore), so
resuming an experiment loads no pickled Optuna objects.

A resumed sweep is the same sweep. Tune saves the searcher's state with the experiment's (one
snapshot) and re-runs the trials that were live with their own configs, so the state keeps
the live trials too: none is suggested again, each (cell, trial index) exists once. And the
k-th trial of a cell draws from a sampler seeded by (run seed, cell, k), not from one RNG
stream that a restart would rewind: with the random sampler (and TPE's random startup
trials) the set of (cell, index, params) is exactly an uninterrupted run's. After its startup
trials TPE also depends on which results were in when it was asked, as in any concurrent run.

With ``storage_url`` (sqlite or an RDB) every cell's study is also written there, named
``<run>/<cell>``, for optuna-dashboard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from clo_ray.spec.grid import Cell, cell_of, grid_cells
from clo_ray.spec.schema import SweepSpec

logger = logging.getLogger(__name__)

STATE_FILE = "cell_searcher.json"


def _encode(choice: Any) -> Any:
    """Optuna categorical choices must be scalars: lists (module sets) travel as JSON text."""
    return choice if choice is None or isinstance(choice, (bool, int, float, str)) \
        else json.dumps(choice)


def encode_params(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's decoded params (its config's) as its Optuna study holds them."""
    return {key: _encode(value) for key, value in params.items()}


def _decode(value: Any, choices: Sequence[Any]) -> Any:
    return next((c for c in choices if _encode(c) == value), value)


def optuna_space(spec: SweepSpec, method: str) -> dict[str, optuna.distributions.BaseDistribution]:
    """The spec's search space as Optuna distributions, restricted to what ``method`` uses."""
    from clo_ray.spec.search_space import search_key

    schedules = next(m.schedules for m in spec.methods if m.name == method) or [method]
    losses = {stage.loss for name in schedules for stage in spec.stages(name)}
    space: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, dist in spec.search.space.items():
        field, applies = search_key(key) or ("", ())
        if field == "schedule":
            choices = [c for c in dist.choices or [] if c in schedules]
            if len(choices) > 1:
                space[key] = optuna.distributions.CategoricalDistribution(choices)
            continue
        if not losses & set(applies):
            continue  # e.g. lambda (clo only) in the sft method's cells
        if dist.type == "categorical":
            space[key] = optuna.distributions.CategoricalDistribution(
                [_encode(c) for c in dist.choices or []])
        elif dist.type == "int":
            assert dist.low is not None and dist.high is not None  # the spec requires both
            space[key] = optuna.distributions.IntDistribution(
                int(dist.low), int(dist.high), log=dist.log, step=int(dist.step or 1))
        else:
            space[key] = optuna.distributions.FloatDistribution(
                dist.low, dist.high, log=dist.log, step=dist.step)
    return space


class CellSearcher(Searcher):
    """Round-robin over cells; each cell asks and tells only its own Optuna study.

    ``metrics``: the metric(s) the studies optimise (one, or several for a multi-objective
    search) with their ``modes``. A trial whose result lacks a metric, or that errored or was
    stopped early, is told to its study as failed/pruned, so TPE does not learn from it.
    """

    def __init__(self, spec: SweepSpec, *, metrics: Sequence[str], modes: Sequence[str],
                 study_prefix: str,
                 done: Mapping[str, list[dict[str, Any]]] | None = None) -> None:
        # No metric for Tune itself: it would demand it in every intermediate (training)
        # report; the final report carries it and on_trial_complete reads it from there.
        super().__init__(metric=None, mode=None)
        self.cells = grid_cells(spec)
        self.spaces = {c.key: optuna_space(spec, c.method) for c in self.cells}
        self.choices = {key: dist.choices for key, dist in spec.search.space.items()
                        if dist.type == "categorical"}
        self.trials_per_cell = spec.search.trials_per_cell
        self.metrics, self.modes = list(metrics), list(modes)
        self.sampler_name, self.seed = spec.search.sampler, spec.run.seed
        self.storage_url, self.study_prefix = spec.search.optuna_storage, study_prefix
        self.by_key = {c.key: c for c in self.cells}
        # ``done``: a grown sweep's earlier trials per cell (clo_ray.sweep.growth): this
        # experiment only adds to them, and each cell's study learns from them first
        self.finished: dict[str, list[dict[str, Any]]] = {
            c.key: list((done or {}).get(c.key, [])) for c in self.cells}
        self.started: dict[str, int] = {c.key: len(self.finished[c.key]) for c in self.cells}
        # trial id -> {"cell", "index" (1-based in the cell), "params" (Optuna's), "number"}
        self.live: dict[str, dict[str, Any]] = {}
        self._studies: dict[str, optuna.Study] = {}

    def remaining(self) -> int:
        """Trials still to suggest (all of them for a new sweep; a grown one's new work)."""
        return sum(max(0, self.trials_per_cell - n) for n in self.started.values())

    # ---------------------------------------------------------------- Tune's Searcher API

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return True  # the metric(s) come from the sweep spec, not from TuneConfig

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        open_cells = [c for c in self.cells if self.started[c.key] < self.trials_per_cell]
        if not open_cells:
            return Searcher.FINISHED
        cell = min(open_cells, key=lambda c: self.started[c.key])  # fill cells evenly
        index = self.started[cell.key] + 1
        study = self._study(cell)
        study.sampler = self._sampler(cell, index)
        trial = study.ask(self.spaces[cell.key])
        params = {k: self._decode(k, v) for k, v in trial.params.items()}
        self.started[cell.key] = index
        self.live[trial_id] = {"cell": cell.key, "index": index, "params": trial.params,
                               "number": trial.number}
        return {"cell": cell._asdict(), "params": params, "cell_trial": index}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.live:
            return
        study = self._study(self.by_key[self.live[trial_id]["cell"]])  # before the pop: a
        live = self.live.pop(trial_id)  # rebuilt study re-creates the live trials it holds
        key, raw = live["cell"], live["params"]
        values = None
        if not error and result is not None and all(
                isinstance(result.get(m), (int, float)) for m in self.metrics):
            values = [float(result[m]) for m in self.metrics]
        state = optuna.trial.TrialState.COMPLETE if values else optuna.trial.TrialState.FAIL
        study.tell(live["number"], values if values else None, state=state)
        self.finished[key].append({"params": raw, "values": values, "index": live["index"]})

    # ----------------------------------------------------------------- state (JSON only)

    def save(self, checkpoint_path: str) -> None:
        state = {"started": self.started, "finished": self.finished, "live": self.live}
        tmp = f"{checkpoint_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, encoding="utf-8") as fh:
            state = json.load(fh)
        self.finished = {c.key: state["finished"].get(c.key, []) for c in self.cells}
        # Trials live at the snapshot are re-run by Tune with their own configs (never
        # suggested again); their study trials are re-created when the study is rebuilt.
        self.live = {tid: live for tid, live in state.get("live", {}).items()
                     if live["cell"] in self.by_key}
        self.started = {c.key: max(state.get("started", {}).get(c.key, 0),
                                   len(self.finished[c.key])) for c in self.cells}
        self._studies = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_studies"] = {}  # rebuilt from ``finished``: never pickle Optuna studies
        return state

    def study_trials(self, cell: Cell) -> list[dict[str, Any]]:
        """The finished trials this cell's study learned from (params and values)."""
        return list(self.finished[cell.key])

    # ---------------------------------------------------------------------- internals

    def _decode(self, key: str, value: Any) -> Any:
        choices = self.choices.get(key)
        return _decode(value, choices) if choices else value

    def _sampler(self, cell: Cell, index: int) -> optuna.samplers.BaseSampler:
        """The sampler of the cell's ``index``-th trial: seeded by (run seed, cell, index), so
        a trial's draw does not depend on how many draws came before it in this process."""
        digest = hashlib.sha256(f"{self.seed}/{cell.key}/{index}".encode()).digest()
        seed = int.from_bytes(digest[:4], "big")
        return (optuna.samplers.TPESampler(seed=seed) if self.sampler_name == "tpe"
                else optuna.samplers.RandomSampler(seed=seed))

    def _study(self, cell: Cell) -> optuna.Study:
        if cell.key not in self._studies:
            directions = ["maximize" if m == "max" else "minimize" for m in self.modes]
            study = optuna.create_study(
                storage=self.storage_url, sampler=self._sampler(cell, 0),
                directions=directions, study_name=f"{self.study_prefix}/{cell.key}",
                load_if_exists=True)
            if not study.trials:  # replay what a restored searcher had learned
                for done in self.finished[cell.key]:
                    study.add_trial(optuna.trial.create_trial(
                        params=done["params"], distributions=self.spaces[cell.key],
                        values=done["values"],
                        state=(optuna.trial.TrialState.COMPLETE if done["values"]
                               else optuna.trial.TrialState.FAIL)))
                for live in self.live.values():  # restored live trials run again: same params
                    if live["cell"] == cell.key:
                        study.enqueue_trial(live["params"])
                        live["number"] = study.ask(self.spaces[cell.key]).number
            self._studies[cell.key] = study
        return self._studies[cell.key]


class CellScheduler(FIFOScheduler):
    """ASHA early stopping among the trials of one grid cell, never across cells.

    All cells run in one Tune experiment, so a single ASHA would rank an SFT trial's training
    NLL against a CLO trial's (or a 100-pair budget against a 1000-pair one) at the same rung
    and stop whole cells of the grid. This keeps one ASHA per cell, as one Optuna study.

    Rungs count training steps (the ``step`` every training report carries), starting at
    ``grace_period`` reports of ``report_every`` steps: the trial's final report (held-out
    evaluation, no ``step``) never enters a rung, so held-out and training values are never
    compared, and a trial resumed after a crash keeps its place. There is no step cap
    (``max_t``): a trial that survives the rungs runs its schedule out.
    """

    NO_CAP = 10**9  # steps; ASHA needs a max_t, the schedule is the real end

    def __init__(self, *, metric: str, mode: str, grace_period_steps: int,
                 reduction_factor: float) -> None:
        super().__init__()
        self.options = dict(time_attr="step", metric=metric, mode=mode,
                            grace_period=grace_period_steps, reduction_factor=reduction_factor,
                            max_t=max(self.NO_CAP, grace_period_steps), stop_last_trials=False)
        self.cells: dict[str, ASHAScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metric comes from the sweep spec (search.scheduler)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._cell(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._cell(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._cell(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._cell(trial).on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._cell(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        stopped = sum(s._num_stopped for s in self.cells.values())
        return f"CellScheduler: ASHA in {len(self.cells)} cell(s), {stopped} trial(s) stopped"

    def _cell(self, trial: Any) -> TrialScheduler:
        key = cell_of(trial.config).key
        if key not in self.cells:
            self.cells[key] = ASHAScheduler(**self.options)
        return self.cells[key]


def searcher_metrics(spec: SweepSpec) -> tuple[list[str], list[str]]:
    """What the cell studies optimise: ``search.metric``, or with ``multi_objective`` each
    weighted metric of ``evaluation.objective`` (mode by name: ``*_nll`` is minimised)."""
    if not spec.search.multi_objective:
        return [spec.search.metric], [spec.search.mode]
    names = [m for m, w in spec.evaluation.objective.weights.items() if w]
    return names, ["min" if n.endswith("_nll") else "max" for n in names]


