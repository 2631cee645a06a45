"""The sweep spec: the typed, validated form of a sweep YAML (the only place that knows its shape).

``load_spec(path)`` returns a :class:`SweepSpec` or raises one :class:`SpecError` listing every
problem, one per line, as ``<yaml path>: <message> (got <value>; allowed: ...)``::

    models[2].name: not a model reference (got 'llama 2'; allowed: builtin:NAME, ...)
    run.nmae: unknown key (allowed: name, storage, seed, storage_options; did you mean 'name'?)

Sections (field docs on their models, in :mod:`clo_ray.spec.sections`, :mod:`clo_ray.spec.training`,
:mod:`clo_ray.spec.search_space` and :mod:`clo_ray.spec.evaluation`): ``run``, ``corpus``,
``translator``, ``languages``, ``models``, ``schedules``, ``methods``, ``budgets``, ``search``,
``resources``, ``train``, ``evaluation``, ``report``. Every check runs here, before
anything expensive; the one that needs data, the corpus size, is :func:`check_corpus_size`.
Relative paths in a spec are relative to the current working directory (what
``ray job submit --working-dir .`` gives the job). Nothing here imports torch or ray.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError, field_validator, model_validator

from clo_ray.benchmarks import BENCHMARKS
from clo_ray.errors import SpecError
from clo_ray.languages import LANGUAGES

# The `import X as X` names are not used here: they are re-exported so that
# `from clo_ray.spec.schema import X` keeps working for every name this module used to hold.
from clo_ray.spec.evaluation import METRICS, EvaluationSection, ReportSection
from clo_ray.spec.search_space import (
    SEARCH_FIELDS,
    Distribution,
    SearchSection,
    search_key,
)
from clo_ray.spec.sections import (
    CorpusSection,
    ModelSpec,
    Problems,
    RunSection,
    Section,
    TranslatorSection,
    check_slug,
)
from clo_ray.spec.training import (
    BUILTIN_SCHEDULES,
    LoraSpec,
    MethodSpec,
    ResourcesSection,
    StageSpec,
    TrainSection,
)
from clo_ray.spec.yaml_reader import read_yaml

__all__ = [
    "BUILTIN_SCHEDULES", "METRICS", "CorpusSection", "Distribution", "EvaluationSection",
    "LoraSpec", "MethodSpec", "ModelSpec", "ReportSection", "ResourcesSection", "RunSection",
    "SearchSection", "StageSpec", "SweepSpec", "TrainSection", "TranslatorSection",
    "check_corpus_size", "load_spec", "spec_hash",
]


class SweepSpec(Section):
    """A whole sweep; its grid is models x languages x methods x budgets.

    After validation ``schedules`` holds every schedule a method uses (built-ins filled in)
    and each ``methods[i].schedules`` is explicit, so later stages never look up defaults.
    """

    run: RunSection
    corpus: CorpusSection
    translator: TranslatorSection
    languages: list[str]  # target languages; one trained model per language (the paper)
    models: list[ModelSpec]
    schedules: dict[str, list[StageSpec]] = {}
    methods: list[MethodSpec]
    budgets: list[int]  # training pairs per cell (the paper: 200 ... 6,400); nested subsets
    search: SearchSection = SearchSection()
    resources: ResourcesSection = ResourcesSection()
    train: TrainSection = TrainSection()
    evaluation: EvaluationSection = EvaluationSection()
    report: ReportSection = ReportSection()

    @field_validator("languages", "budgets", "models", "methods")
    @classmethod
    def _lists(cls, value: list[Any], info: Any) -> list[Any]:
        found = Problems()
        if not value:
            found.add((), "needs at least one entry", value=value)
        for i, item in enumerate(value):
            if info.field_name == "languages" and item not in LANGUAGES:
                found.add(i, "unknown language code", allowed=sorted(LANGUAGES), value=item)
            elif info.field_name == "budgets" and item <= 0:
                found.add(i, "a budget is a number of training pairs, > 0", value=item)
            elif info.field_name in ("languages", "budgets") and item in value[:i]:
                found.add(i, "listed twice", value=item)
        found.raise_if_any()
        return value

    @field_validator("schedules")
    @classmethod
    def _schedules(cls, value: dict[str, list[StageSpec]]) -> dict[str, list[StageSpec]]:
        found = Problems()
        for name, stages in value.items():
            try:
                check_slug(name)
            except ValueError:
                found.add(name, "not a valid schedule name", value=name)
            if not stages:
                found.add(name, "a schedule needs at least one stage", value=stages)
        found.raise_if_any()
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> SweepSpec:
        found = Problems()
        _check_grid(self, found)
        if not found.items:  # the checks below need every method's schedules
            _check_search(self, found)
        train, workers = self.train, self.resources.workers_per_trial
        per_step = train.micro_batch_pairs * workers
        if train.batch_pairs % per_step:
            found.add(("train", "batch_pairs"), "must be divisible by micro_batch_pairs x "
                      f"resources.workers_per_trial = {train.micro_batch_pairs} x {workers} = "
                      f"{per_step} (the quotient is the gradient accumulation)",
                      allowed=[f"multiples of {per_step}"], value=train.batch_pairs)
        known = ["objective", *self.evaluation.metric_names()]
        if self.search.metric not in known:
            found.add(("search", "metric"), "not a metric this sweep computes", allowed=known,
                      value=self.search.metric)
        for i, metric in enumerate(self.report.metrics):
            if metric not in known:
                found.add(("report", "metrics", i), "not a metric this sweep computes "
                          "(judge metrics need evaluation.judge.enabled)", allowed=known,
                          value=metric)
        for where, (metric, mode) in {("search", "mode"): (self.search.metric, self.search.mode),
                                      ("search", "scheduler", "mode"): (
                                          self.search.scheduler.metric,
                                          self.search.scheduler.mode)}.items():
            if metric.endswith("_nll") and mode == "max":
                found.add(where, f"{metric} is a loss (lower is better)", allowed=["min"],
                          value=mode)
        for i, name in enumerate(self.evaluation.benchmarks):
            tasks = BENCHMARKS[name].tasks if name in BENCHMARKS else {}
            for code in [*self.languages, "en"]:
                if tasks and code not in tasks:
                    found.add(("evaluation", "benchmarks", i), f"has no lm-eval task for "
                              f"language {code!r}", allowed=sorted(tasks), value=name)
        if self.corpus.max_rows is not None:
            _check_budgets_fit(self, self.corpus.max_rows, "corpus.max_rows", found)
        found.raise_if_any()
        return self

    def stages(self, schedule: str) -> list[StageSpec]:
        """The stages of a schedule (built-ins included after validation)."""
        return self.schedules[schedule]

    def losses(self) -> set[str]:
        """Every loss a stage of some method's schedule trains with."""
        return {st.loss for m in self.methods for s in m.schedules or [] for st in self.stages(s)}


def _check_grid(spec: SweepSpec, found: Problems) -> None:
    source = spec.corpus.source_language
    for i, code in enumerate(spec.languages):
        if code == source:
            found.add(("languages", i), f"is the corpus's source language ({source!r}); "
                      "targets must differ", value=code)
    labels = [m.label for m in spec.models]
    for i, label in enumerate(labels):
        if label in labels[:i]:
            found.add(("models", i, "label"), "label already used by another model (set "
                      "models[].label)", value=label)
    defined = [*dict.fromkeys([*BUILTIN_SCHEDULES, *spec.schedules])]
    names = [m.name for m in spec.methods]
    for i, method in enumerate(spec.methods):
        if method.name in names[:i]:
            found.add(("methods", i, "name"), "method listed twice", value=method.name)
        for j, name in enumerate(method.schedules or []):
            if name in spec.schedules:
                continue
            if name in BUILTIN_SCHEDULES:
                spec.schedules[name] = [StageSpec.model_validate(s)
                                        for s in BUILTIN_SCHEDULES[name]]
            elif method.schedules == [method.name]:
                found.add(("methods", i), "unknown method (no schedule of this name)",
                          allowed=defined, value=name)
            else:
                found.add(("methods", i, "schedules", j), "unknown schedule", allowed=defined,
                          value=name)


def _check_search(spec: SweepSpec, found: Problems) -> None:
    used, search = spec.losses(), spec.search
    schedules = [s for m in spec.methods for s in m.schedules or []]
    for key, dist in search.space.items():
        field, applies = search_key(key) or ("", ())
        if not used & set(applies):
            useful = [k for k in SEARCH_FIELDS if used & set(search_key(k)[1])]  # type: ignore
            found.add(("search", "space", key), f"no method has a {'/'.join(applies)} stage "
                      "for this parameter to change", allowed=useful, value=key)
        if field == "schedule":
            if all(len(m.schedules or []) < 2 for m in spec.methods):
                found.add(("search", "space", key), "no method lists several schedules to "
                          "choose among (methods[].schedules)", value=key)
            for i, choice in enumerate(dist.choices or []):
                if choice not in schedules:
                    found.add(("search", "space", key, "choices", i), "not a schedule of any "
                              "method", allowed=schedules, value=choice)
        if field == "lora_r" and not any(st.lora for s in schedules for st in spec.stages(s)):
            found.add(("search", "space", key), "no stage trains LoRA adapters (stage lora)",
                      value=key)
    if search.multi_objective and search.scheduler.type != "none":
        found.add(("search", "scheduler", "type"), "early stopping cannot be combined with "
                  "multi_objective", allowed=["none"], value=search.scheduler.type)
    if search.multi_objective and len(spec.evaluation.objective.weights) < 2:
        found.add(("search", "multi_objective"), "needs two or more metrics in "
                  "evaluation.objective.weights", value=True)


def _check_budgets_fit(spec: SweepSpec, rows: int, what: str, found: Problems) -> None:
    holdout = spec.evaluation.holdout
    for i, budget in enumerate(spec.budgets):
        if budget + holdout > rows:
            found.add(("budgets", i), f"{budget} training pairs + evaluation.holdout {holdout} "
                      f"= {budget + holdout} exceed the {rows} rows of {what}",
                      allowed=[f"at most {max(rows - holdout, 0)}"], value=budget)


def check_corpus_size(spec: SweepSpec, corpus_rows: int, corpus_path: str) -> None:
    """Raise a SpecError naming each ``budgets[i]`` that, with the holdout, exceeds the corpus.

    Called by the plan and by the sweep once the corpus has been loaded (cheaply: rows only).
    """
    found = Problems()
    _check_budgets_fit(spec, corpus_rows, f"corpus {corpus_path}", found)
    if found.items:
        lines = [_line(where, msg, value[0] if value else _UNSET, allowed)
                 for where, msg, allowed, value in found.items]
        raise SpecError(f"spec {spec.run.name!r}: data budgets do not fit the corpus:\n  "
                        + "\n  ".join(lines))


def check_corpus_kind(spec: SweepSpec, preferences: bool, corpus_path: str) -> None:
    """Raise a SpecError naming each stage that needs a preference corpus (crpo, dpo with
    ``dpo_pairs: monolingual``) when the corpus holds SFT pairs only: before translation."""
    if preferences:
        return
    needs = [f"methods {m.name} -> schedules.{s}[{i}] ({st.loss}"
             f"{', dpo_pairs monolingual' if st.dpo_pairs == 'monolingual' else ''})"
             for m in spec.methods for s in m.schedules or []
             for i, st in enumerate(spec.stages(s))
             if st.loss == "crpo" or st.dpo_pairs == "monolingual"]
    if needs:
        raise SpecError(f"spec {spec.run.name!r}: corpus {corpus_path} holds SFT pairs, but "
                        f"these stages rank a chosen over a rejected answer:\n  "
                        + "\n  ".join(needs) + "\n  use a preference corpus (corpus.format "
                        "ultrafeedback or preference, or builtin:preference-sample)")


def spec_hash(spec: SweepSpec, data: dict[str, Any] | None = None) -> str:
    """A stable digest of the validated spec (defaults filled in): canonical JSON, sha256[:16].

    A run folder records it, so a changed spec cannot silently continue an existing run.
    ``run.storage`` is left out: it names the run folder (made absolute against the working
    directory at load time), it does not change what the run computes. ``data``: the spec's
    dump as recorded, when the recorder rewrote it (the sweep's portable job paths).
    """
    data = copy.deepcopy(data) if data is not None else spec.model_dump(mode="json",
                                                                        by_alias=True)
    data["run"].pop("storage", None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------ loading

_UNSET = object()


def load_spec(source: str | os.PathLike[str] | Mapping[str, Any]) -> SweepSpec:
    """Read (a YAML file) and validate a sweep spec; raise one SpecError listing every problem."""
    if isinstance(source, Mapping):
        label, data = "<mapping>", dict(source)
    else:
        label, path = str(source), Path(source)
        if not path.is_file():
            raise SpecError(f"spec file {label} not found (relative paths are relative to "
                            f"the working directory, {os.getcwd()})")
        data = read_yaml(label, path)
    if not isinstance(data, dict):
        raise SpecError(f"spec {label}: the top level must be a mapping of sections "
                        f"(run, corpus, ...), got {type(data).__name__}")
    # ``x-*`` top-level keys hold YAML anchors for merge keys (``x-stage: &stage {...}``,
    # then ``- {<<: *stage, lr: 2.0e-4}``), as in Docker Compose; they are not settings.
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        lines = [line for e in err.errors(include_url=False) for line in _error_lines(e)]
        raise SpecError(f"spec {label} is invalid ({len(lines)} problem"
                        f"{'s' if len(lines) != 1 else ''}):\n  " + "\n  ".join(lines)) from None


def _error_lines(err: Any) -> list[str]:
    """One pydantic error as ``<yaml path>: <message> (got ...; allowed: ...)`` lines."""
    loc, kind, ctx = tuple(err["loc"]), err["type"], err.get("ctx") or {}
    if kind == "spec":
        whole = err["input"] if not isinstance(err["input"], Mapping) else _UNSET
        return [_line(loc + where, msg, value[0] if value else (_UNSET if where else whole),
                      allowed) for where, msg, allowed, value in ctx["spec_problems"]]
    if kind == "extra_forbidden":
        allowed = _keys_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return [f"{_yaml_path(loc)}: unknown key (allowed: {', '.join(allowed)}{hint})"]
    if kind == "missing":
        return [f"{_yaml_path(loc)}: required key missing"]
    if kind == "literal_error":
        return [_line(loc, "unsupported value", err["input"],
                      ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", ""))))]
    msg = err["msg"].removeprefix("Value error, ")
    return [_line(loc, msg[:1].lower() + msg[1:], err["input"], None)]


def _line(loc: tuple[Any, ...], message: str, value: Any, allowed: str | None) -> str:
    extra = [] if value is _UNSET else [f"got {_show(value)}"]
    extra += [f"allowed: {allowed}"] if allowed else []
    return f"{_yaml_path(loc)}: {message}" + (f" ({'; '.join(extra)})" if extra else "")


def _show(value: Any) -> str:
    text = {None: "null", True: "true", False: "false"}[value] \
        if isinstance(value, (bool, type(None))) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _yaml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][\w-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out or "<top level>"


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at ``loc`` accepts (walks the models, lists and mappings)."""
    tp: Any = SweepSpec
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {f.alias or n: f for n, f in tp.model_fields.items()}
            tp = fields[part].annotation if part in fields else None
        elif get_origin(tp) in (list, dict, tuple):
            tp = get_args(tp)[-1]
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items()]
    return []


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> X, ``Annotated[X, ...]`` -> X."""
    while get_origin(tp) in (Union, types.UnionType, Annotated):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp
