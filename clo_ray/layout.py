"""Where everything of a run lives on storage: the one place that spells a run's paths.

Every stage reads its inputs and writes its outputs under two roots, local or ``s3://`` /
``gs://`` alike (:mod:`clo_ray.storage` does the I/O)::

    <run.storage>/cache/translations/<key>/   translate stage (shared by every run)
    <run.storage>/cache/pairs/<fp>.*.parquet  pairs stage: budget subsets, held-out split
    <run.storage>/cache/reference/<key>/      reference log-probs of a model on a data set
    <run.storage>/cache/eval/base/<name>/     the untrained model's evaluation
    <run.storage>/cache/judge/<key>.json      one judge verdict
    <run.storage>/<run.name>/spec.yaml        the spec record: {spec_hash, spec}
    <run.storage>/<run.name>/tune/            the Tune experiment (searcher state, trials)
    <run.storage>/<run.name>/repeats/         the repeats' Tune experiment (search.repeats)
    <run.storage>/<run.name>/trials/<trial>/  Ray Train runs: checkpoints, history.jsonl
    <run.storage>/<run.name>/train/<name>/    the same for ``python -m clo_ray.train`` runs
    <run.storage>/<run.name>/eval/<trial>/... a trial's evaluation (answers, metrics)
    <run.storage>/<run.name>/results.parquet  one row per trial (clo_ray.report.schema)
    <run.storage>/<run.name>/judgements.parquet  one row per judge comparison (judge stage)
    <run.storage>/<run.name>/alpaca_eval/...  the compared answers in alpaca_eval's format
    <run.storage>/cache/prompt_sets/<key>/    prompt sets, one table per language
    <run.storage>/<run.name>/report.md ...    the report stage's files

Caches are content-addressed and shared across runs (a second sweep over the same corpus
translates nothing); what belongs to one run sits in its own folder. :func:`safe_name` is the
one rule that turns labels and paths into folder names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from clo_ray import checked, storage
from clo_ray.errors import SpecError
from clo_ray.storage import StorageOptions

SPEC_FILE = "spec.yaml"
RESULTS_FILE = "results.parquet"
JUDGEMENTS_FILE = "judgements.parquet"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=-]+")


def safe_name(text: str) -> str:
    """``text`` as one folder name: every run of characters outside ``[A-Za-z0-9_.=-]`` -> "_"."""
    return _UNSAFE.sub("_", text)


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run: ``storage`` (shared caches) and ``name`` (the run's folder)."""

    storage: str
    name: str
    options: StorageOptions = None

    @classmethod
    def of(cls, spec: Any) -> RunLayout:
        """The layout of a :class:`~clo_ray.spec.schema.SweepSpec` (its ``run`` section)."""
        return cls(spec.run.storage, spec.run.name, dict(spec.run.storage_options) or None)

    @classmethod
    def of_run_dir(cls, run_dir: str, options: StorageOptions = None) -> RunLayout:
        """The layout of an existing run folder (``<storage>/<name>``), e.g. for the report."""
        trimmed = run_dir.rstrip("/\\")
        cut = max(trimmed.rfind("/"), trimmed.rfind("\\"))
        if cut < 0:
            return cls(".", trimmed, options)
        return cls(trimmed[:cut] or "/", trimmed[cut + 1:], options)

    # ------------------------------------------------------------------ the run's folder

    @property
    def uri(self) -> str:
        """The run's own folder or prefix."""
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def spec_record(self) -> str:
        return storage.join(self.uri, SPEC_FILE)

    @property
    def results(self) -> str:
        return storage.join(self.uri, RESULTS_FILE)

    @property
    def judgements(self) -> str:
        return storage.join(self.uri, JUDGEMENTS_FILE)

    def read_judgements(self) -> Any:
        """judgements.parquet as a pyarrow Table, or None when the judge never ran here."""
        if not storage.exists(self.judgements, self.options):
            return None
        return checked.read_parquet(self.judgements, self.options,
                                    fix="re-run the sweep with --only judge to rebuild it")

    @property
    def tune(self) -> str:
        """The Tune experiment's folder."""
        return storage.join(self.uri, "tune")

    @property
    def repeats(self) -> str:
        """The repeats' Tune experiment (``search.repeats``)."""
        return storage.join(self.uri, "repeats")

    @property
    def trials(self) -> str:
        """The Ray Train ``storage_path`` of the trials: one run folder per trial under it."""
        return storage.join(self.uri, "trials")

    @property
    def train_runs(self) -> str:
        """The Ray Train ``storage_path`` of runs started outside a sweep (``clo_ray.train``)."""
        return storage.join(self.uri, "train")

    def trial_eval(self, checkpoint: str) -> str:
        """Where a trial's evaluation (answers.parquet, metrics.json, lm_eval.json) is kept:
        ``<run>/eval/<train run>/<checkpoint>``, from the last two parts of its checkpoint path.

        Derived from the checkpoint, which results.parquet records, so the judge stage finds
        every trial's answers without a second index; a re-trained checkpoint gets a new folder.
        """
        parts = [p for p in checkpoint.replace("\\", "/").rstrip("/").split("/") if p][-2:]
        return storage.join(self.uri, "eval", *(safe_name(p) for p in parts))

    # ---------------------------------------------------------- caches shared by runs

    def cache(self, *parts: str) -> str:
        return storage.join(self.storage, "cache", *parts)

    @property
    def translations(self) -> str:
        return self.cache("translations")

    @property
    def pairs(self) -> str:
        return self.cache("pairs")

    @property
    def reference(self) -> str:
        """Root of the reference log-prob caches (one folder per content key)."""
        return self.cache("reference")

    def base_eval(self, model: str, language: str, held_out: str) -> str:
        """The untrained ``model``'s evaluation on one held-out set of ``language``."""
        return self.cache("eval", "base", safe_name(f"{model}-{language}-{held_out}"))

    def judge_verdict(self, key: str) -> str:
        return self.cache("judge", f"{key}.json")

    # ---------------------------------------------------------------- the spec record

    def write_spec_record(self, spec_hash: str, spec_data: dict[str, Any],
                          generations: list[dict[str, Any]] | None = None) -> None:
        """Record the run's spec (and its hash) in ``spec.yaml``, atomically, with every spec
        the run has grown through (``{"spec_hash", "spec"}``, oldest first; see
        :mod:`clo_ray.sweep.growth`)."""
        record = {"spec_hash": spec_hash, "spec": spec_data,
                  "generations": generations or [{"spec_hash": spec_hash, "spec": spec_data}]}
        text = yaml.safe_dump(record, sort_keys=False)
        storage.write_bytes_atomic(self.spec_record, text.encode(), self.options)

    def read_generations(self) -> list[dict[str, Any]]:
        """Every spec the run has grown through, oldest first: ``{"spec_hash", "spec"}``
        ([] without a record; a record from before growth reads as one generation)."""
        if not storage.exists(self.spec_record, self.options):
            return []
        with storage.open_input(self.spec_record, self.options) as fh:
            data = yaml.safe_load(fh.read())
        if not isinstance(data, dict):
            return []
        generations = data.get("generations")
        if isinstance(generations, list):
            return generations
        return [{"spec_hash": data.get("spec_hash"), "spec": data.get("spec")}]

    def generation_folder(self, kind: str, generation: int) -> str:
        """The Tune experiment of one generation: ``tune`` / ``repeats`` for the first, then
        ``tune-grow-1``, ``repeats-grow-1``, ... (``kind`` is "tune" or "repeats")."""
        name = kind if generation == 0 else f"{kind}-grow-{generation}"
        return storage.join(self.uri, name)

    def read_spec_record(self) -> tuple[str | None, dict[str, Any]] | None:
        """``(spec_hash, spec data)`` from the run's ``spec.yaml``, or None when it has none."""
        if not storage.exists(self.spec_record, self.options):
            return None
        return read_spec_record(self.spec_record, self.options)


def read_spec_record(uri: str, options: StorageOptions = None) -> tuple[str | None, dict[str, Any]]:
    """``(spec_hash, spec data)`` of a spec record; a bare spec (a user's own YAML) reads as
    ``(None, data)``."""
    with storage.open_input(uri, options) as fh:
        raw = fh.read()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{uri}: not readable as YAML{where} "
                        f"({getattr(err, 'problem', None) or err}): a damaged spec record; "
                        "move it aside (the run's other files are kept) and re-run the sweep "
                        "with its spec") from None
    if not isinstance(data, dict):
        raise SpecError(f"{uri}: not a spec (a YAML mapping of sections) nor a spec record "
                        "(spec_hash and spec); delete it or give the spec with --spec")
    if "spec" in data and "spec_hash" in data:
        if not isinstance(data["spec"], dict) or not isinstance(data["spec_hash"], str):
            raise SpecError(f"{uri}: a damaged spec record (spec_hash must be text and spec "
                            "a mapping); move it aside and re-run the sweep with its spec")
        return data["spec_hash"], data["spec"]
    return None, data
