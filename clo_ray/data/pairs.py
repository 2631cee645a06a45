"""Budgets and the held-out split: which translated pairs a trial trains and evaluates on.

The paper compares methods at data budgets (200 ... 6,400 pairs), so a sweep must be able to
say "budget 200 is inside budget 400" and "no budget ever sees an eval pair":

- Every row gets a rank from ``sha256(f"{seed}:{id}")``, not from its position in the file,
  so adding rows to a corpus (or reading it in another order) moves only the new rows.
- Eval = the first ``holdout`` rows of that order; train = the next ``budget``. A larger
  budget extends a smaller one (nested), and the eval rows are the same for every budget.
- Rows whose translation was flagged by quality checks (non-empty ``reasons``) are left out
  before ranking: training on a bad translation teaches the wrong preference.

Multi-target CLO (several target languages in one trial, beyond the paper) splits each
language the same way and concatenates; ids are those of the *English* pair, so the same id
appears once per language. An id held out in any language is kept out of every language's
train split: otherwise its English side (x_en, y_en) would be trained on through another
language and leak into the English half of the eval.

The pairs stage (:func:`prepare_pairs`, :func:`prepare_sweep_pairs`) writes each split once,
by content, under the run layout's pairs cache; trials are handed the :class:`PreparedPairs`
locations and never load the corpus or the translations themselves. No torch here: the sweep
driver runs this without the training stack.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from clo_ray import checked, storage
from clo_ray.errors import CloRayError
from clo_ray.layout import RunLayout

if TYPE_CHECKING:
    from clo_ray.spec.schema import SweepSpec

# The translate stage's output columns that training reads (``reasons`` is optional).
REQUIRED_COLUMNS = ("id", "language", "prompt_en", "response_en", "prompt", "response")
PREFERENCE_COLUMNS = ("rejected_en", "rejected")  # a preference corpus's, when present


class PairsError(CloRayError, ValueError):
    """Translated pairs cannot give the requested split (too few rows, bad columns)."""


@dataclass(frozen=True)
class PairSplit:
    """Train and eval rows of one trial, with the input's columns (train in rank order)."""

    train: pa.Table
    eval: pa.Table


def split_pairs(translations: pa.Table, *, budget: int, holdout: int, seed: int,
                train_seed: str | None = None) -> PairSplit:
    """Eval = first ``holdout`` accepted rows by hash rank, train = the next ``budget``.

    Raises PairsError naming budget, holdout and the rows available when they do not fit,
    and on missing columns or repeated ids (ids key the reference cache: they must be unique).
    """
    return _split(translations, budget=budget, holdout=holdout, seed=seed,
                  train_seed=train_seed)


def split_multi(tables: Mapping[str, pa.Table], budgets: Mapping[str, int], *, holdout: int,
                seed: int, train_seed: str | None = None) -> PairSplit:
    """Per-language splits (``holdout`` eval rows and ``budgets[lang]`` train rows each),
    concatenated in sorted language order; the ``language`` column tells the rows apart.

    An id in any language's eval split is excluded from every train split (see the module
    docstring), which keeps budgets nested because it depends on ``holdout`` only.
    """
    if set(tables) != set(budgets):
        raise PairsError(f"languages with tables {sorted(tables)} and with budgets "
                         f"{sorted(budgets)} differ; give one budget per target language")
    if not tables:
        raise PairsError("split_multi needs at least one language")
    languages = sorted(tables)
    for language in languages:
        _check_language(tables[language], language)
    evals = {lang: _split(tables[lang], budget=0, holdout=holdout, seed=seed).eval
             for lang in languages}
    held_out = frozenset(i for table in evals.values() for i in table.column("id").to_pylist())
    trains = [_split(tables[lang], budget=budgets[lang], holdout=holdout, seed=seed,
                     exclude=held_out, language=lang, train_seed=train_seed).train
              for lang in languages]
    return PairSplit(train=pa.concat_tables(trains, promote_options="default"),
                     eval=pa.concat_tables(list(evals.values()), promote_options="default"))


def pairs_fingerprint(table: pa.Table) -> str:
    """16 hex chars of sha256 over each row's id, language and four texts (six for
    preferences), in row order.

    Order counts (the train loop addresses pairs by index, so a resumed run must see the same
    order); other columns (``reasons``, extra metadata) do not change what is trained.
    """
    _check_columns(table)
    digest = hashlib.sha256()
    names = REQUIRED_COLUMNS + tuple(c for c in PREFERENCE_COLUMNS if c in table.column_names)
    columns = [table.column(name).to_pylist() for name in names]
    for row in zip(*columns, strict=True):
        # JSON per row: unambiguous boundaries between fields and rows.
        digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()[:16]


def rank_key(seed: int | str, row_id: str) -> str:
    """The sort key of a row: stable across files, row order and Python versions."""
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


# ------------------------------------------------------------------------- the pairs stage


@dataclass(frozen=True)
class PreparedPairs:
    """One data set in storage: training pairs (the budget) and the held-out evaluation pairs.

    What the pairs stage hands a trial (or ``python -m clo_ray.train``): locations, not rows.
    """

    train_uri: str
    eval_uri: str
    fingerprint: str  # of the training pairs: part of every reference-cache key
    n_train: int
    n_eval: int
    languages: tuple[str, ...]
    budget: str  # pairs per language as given: "200", or "200+100" (one per language)


def prepare_pairs(spec: SweepSpec, tables: Mapping[str, pa.Table], languages: Sequence[str],
                  budget: int | Mapping[str, int], *, repeat: int = 0) -> PreparedPairs:
    """Budget subset and held-out split of the translations ``tables``, written once by content.

    ``budget`` is pairs per language (one number for all, or one per language). The split is
    :func:`split_pairs` (one language) / :func:`split_multi` (several): nested budgets and a
    fixed held-out set under ``spec.run.seed``. ``repeat`` > 0 draws the budget's subsample
    in that repeat's own order (:func:`repeat_seed`), the held-out set unchanged.
    """
    languages = list(languages)
    if not languages:
        raise PairsError("at least one target language is needed")
    missing = [lang for lang in languages if lang not in tables]
    if missing:
        raise PairsError(f"no translations for {missing} (have {sorted(tables)})")
    budgets = budget if isinstance(budget, Mapping) else dict.fromkeys(languages, int(budget))
    holdout, seed = spec.evaluation.holdout, spec.run.seed
    train_seed = f"{seed}/repeat{repeat}" if repeat else None
    if len(languages) == 1:
        split = split_pairs(tables[languages[0]], budget=budgets[languages[0]],
                            holdout=holdout, seed=seed, train_seed=train_seed)
    else:
        split = split_multi({lang: tables[lang] for lang in languages},
                            {lang: budgets[lang] for lang in languages}, holdout=holdout,
                            seed=seed, train_seed=train_seed)
    layout = RunLayout.of(spec)
    fingerprint = pairs_fingerprint(split.train)
    train_uri = storage.join(layout.pairs, f"{fingerprint}.train.parquet")
    eval_uri = storage.join(layout.pairs, f"{pairs_fingerprint(split.eval)}.eval.parquet")
    for uri, table in ((train_uri, split.train), (eval_uri, split.eval)):
        if storage.exists(uri, layout.options):
            try:
                checked.read_parquet(uri, layout.options)
                continue
            except checked.CorruptFileError:
                checked.set_aside(uri, layout.options)  # and written again below
        checked.write_parquet(uri, table, layout.options)
    label = "+".join(str(budgets[lang]) for lang in languages) \
        if isinstance(budget, Mapping) else str(budget)
    return PreparedPairs(train_uri, eval_uri, fingerprint, split.train.num_rows,
                         split.eval.num_rows, tuple(languages), label)


def read_pairs(uri: str, storage_options: storage.StorageOptions = None) -> pa.Table:
    """A pairs file the pairs stage wrote (training or held-out), verified."""
    return checked.read_parquet(uri, storage_options, fix=(
        "re-run the sweep: its pairs stage moves the file aside and writes it again from the "
        "cached translations"))


def pairs_key(language: str, budget: int, repeat: int = 0) -> str:
    """The key of one grid data set in :func:`prepare_sweep_pairs`' result: ``sw/200``, and
    ``sw/200/r1`` for a repeat's subsample."""
    return f"{language}/{budget}" + (f"/r{repeat}" if repeat else "")


def repeat_seed(seed: int, repeat: int) -> int:
    """The training seed (data order, dropout) of a cell's ``repeat``-th re-training."""
    return seed + 1_000 * repeat


def prepare_sweep_pairs(spec: SweepSpec, tables: Mapping[str, pa.Table]
                        ) -> dict[str, PreparedPairs]:
    """The pairs stage of a sweep: every (languages, budget) of the grid once, by
    :func:`pairs_key`, and each repeat's subsample (``search.repeats``). A multi-target
    grid language (``sw+yo``) is one data set."""
    return {pairs_key(language, budget, r): prepare_pairs(spec, tables, language.split("+"),
                                                          budget, repeat=r)
            for language in spec.languages for budget in spec.budgets
            for r in range(spec.search.repeats)}


# ------------------------------------------------------------------------------ internals


def _split(table: pa.Table, *, budget: int, holdout: int, seed: int,
           exclude: Set[str] = frozenset(), language: str | None = None,
           train_seed: str | None = None) -> PairSplit:
    """Rank the accepted rows; eval = first ``holdout``, train = next ``budget`` not excluded.

    ``train_seed`` (a repeat): the training rows are drawn from the same non-held-out rows in
    another order, so a repeat trains on another subsample, evaluated on the same held-out set.
    """
    if budget < 0 or holdout < 0:
        raise PairsError(f"budget ({budget}) and holdout ({holdout}) must be >= 0")
    _check_columns(table)
    accepted = _accepted(table)
    ids = accepted.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        raise PairsError(f"repeated pair ids {repeated}: ids must be unique per language")
    order = sorted(range(len(ids)), key=lambda i: rank_key(seed, ids[i]))
    eval_rows = order[:holdout]
    rest = order[holdout:] if train_seed is None else sorted(
        order[holdout:], key=lambda i: rank_key(train_seed, ids[i]))
    candidates = [i for i in rest if ids[i] not in exclude]
    where = f" for language {language!r}" if language else ""
    if len(eval_rows) < holdout or budget > len(candidates):
        flagged = table.num_rows - accepted.num_rows
        raise PairsError(
            f"budget {budget} + holdout {holdout} = {budget + holdout} pairs needed{where}, "
            f"but only {accepted.num_rows} are available ({flagged} flagged rows excluded"
            + (f", {len(order) - holdout - len(candidates)} held out in another language"
               if exclude else "")
            + "); lower the budget or the holdout, or translate more pairs")
    return PairSplit(train=_take(accepted, candidates[:budget]), eval=_take(accepted, eval_rows))


def _take(table: pa.Table, rows: list[int]) -> pa.Table:
    """``table.take`` that also works for no rows (an untyped empty list has no kernel)."""
    return table.take(pa.array(rows, pa.int64()))


def _accepted(table: pa.Table) -> pa.Table:
    """Rows whose ``reasons`` list is empty or null (all rows when there is no such column)."""
    if "reasons" not in table.column_names:
        return table
    reasons = table.column("reasons")
    keep = pc.fill_null(pc.equal(pc.list_value_length(reasons), 0), True)
    return table.filter(keep)


def _check_columns(table: pa.Table) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise PairsError(f"translated pairs lack columns {missing} (have "
                         f"{table.column_names}); expected the translate stage's output")


def _check_language(table: pa.Table, language: str) -> None:
    """A table given under ``language`` must hold only that language's rows."""
    _check_columns(table)
    found = set(table.column("language").to_pylist())
    if found - {language}:
        raise PairsError(f"table given for language {language!r} holds rows of "
                         f"{sorted(found - {language}, key=str)}")
