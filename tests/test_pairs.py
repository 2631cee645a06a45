"""Budgets and the held-out split: nested, disjoint, deterministic, flagged rows left out."""

from __future__ import annotations

import pyarrow as pa
import pytest

from clo_ray.data.pairs import PairsError, pairs_fingerprint, split_multi, split_pairs


def ids(table: pa.Table) -> list[str]:
    return table.column("id").to_pylist()


def flag(table: pa.Table, flagged: set[str]) -> pa.Table:
    """``table`` with a quality reason on the rows whose id is in ``flagged``."""
    reasons = [["language_id"] if i in flagged else [] for i in ids(table)]
    index = table.column_names.index("reasons")
    return table.set_column(index, "reasons", pa.array(reasons, pa.list_(pa.string())))


def test_budgets_are_nested_and_never_touch_eval(translations) -> None:
    table = translations("sw")
    small = split_pairs(table, budget=16, holdout=8, seed=0)
    large = split_pairs(table, budget=32, holdout=8, seed=0)
    assert small.train.num_rows == 16 and large.train.num_rows == 32
    assert ids(large.train)[:16] == ids(small.train)  # nested, as a prefix
    assert ids(small.eval) == ids(large.eval) and len(ids(small.eval)) == 8
    assert not set(ids(large.eval)) & set(ids(large.train))
    assert small.train.column_names == table.column_names


def test_split_is_deterministic_and_ignores_file_order(translations) -> None:
    table = translations("sw")
    first = split_pairs(table, budget=16, holdout=8, seed=0)
    again = split_pairs(table.take(list(range(table.num_rows))[::-1]), budget=16, holdout=8,
                        seed=0)
    other = split_pairs(table, budget=16, holdout=8, seed=1)
    assert ids(first.train) == ids(again.train) and ids(first.eval) == ids(again.eval)
    assert ids(first.train) != ids(other.train)


def test_adding_rows_keeps_the_order_of_the_others(translations) -> None:
    """Ranks come from ids, so growing a corpus only inserts the new rows into the order."""
    full = translations("sw")
    everything = split_pairs(full, budget=full.num_rows - 8, holdout=8, seed=0)
    part = full.slice(0, full.num_rows - 20)
    split = split_pairs(part, budget=40, holdout=8, seed=0)
    kept = set(ids(part))
    ranked = [i for i in ids(everything.eval) + ids(everything.train) if i in kept]
    assert ranked[:48] == ids(split.eval) + ids(split.train)


def test_flagged_rows_are_excluded(translations) -> None:
    table = translations("sw")
    clean = split_pairs(table, budget=16, holdout=8, seed=0)
    bad = {ids(clean.eval)[0], ids(clean.train)[3]}
    split = split_pairs(flag(table, bad), budget=16, holdout=8, seed=0)
    assert not bad & (set(ids(split.train)) | set(ids(split.eval)))
    assert split.train.num_rows == 16 and split.eval.num_rows == 8


def test_too_large_budget_names_the_numbers(translations) -> None:
    table = translations("sw", limit=30)
    table = flag(table, set(ids(table)[:2]))
    with pytest.raises(PairsError, match=r"budget 25 \+ holdout 5 = 30.*only 28 .*2 flagged"):
        split_pairs(table, budget=25, holdout=5, seed=0)
    assert split_pairs(table, budget=23, holdout=5, seed=0).train.num_rows == 23


def test_repeated_ids_and_missing_columns_are_refused(translations) -> None:
    table = translations("sw", limit=10)
    with pytest.raises(PairsError, match="repeated pair ids"):
        split_pairs(pa.concat_tables([table, table]), budget=4, holdout=2, seed=0)
    with pytest.raises(PairsError, match=r"lack columns \['prompt_en'\]"):
        split_pairs(table.drop_columns(["prompt_en"]), budget=4, holdout=2, seed=0)


def test_multi_language_split(translations) -> None:
    tables = {"zh": translations("zh"), "sw": translations("sw")}
    split = split_multi(tables, {"sw": 16, "zh": 8}, holdout=4, seed=0)
    languages = split.train.column("language").to_pylist()
    assert languages == ["sw"] * 16 + ["zh"] * 8  # sorted language order
    alone = split_pairs(tables["sw"], budget=16, holdout=4, seed=0)
    assert ids(split.train)[:16] == ids(alone.train)  # same rows as a one-language split
    assert split.eval.column("language").to_pylist() == ["sw"] * 4 + ["zh"] * 4
    bigger = split_multi(tables, {"sw": 32, "zh": 8}, holdout=4, seed=0)
    assert set(ids(split.train)) <= set(ids(bigger.train))
    assert ids(split.eval) == ids(bigger.eval)


def test_multi_language_eval_ids_stay_out_of_every_train_split(translations) -> None:
    """An eval pair flagged in one language must not reach the other language's training."""
    sw = translations("sw")
    moved = ids(split_pairs(sw, budget=0, holdout=4, seed=0).eval)[0]
    tables = {"sw": flag(sw, {moved}), "zh": translations("zh")}
    split = split_multi(tables, {"sw": 200, "zh": 200}, holdout=4, seed=0)
    held_out = set(ids(split.eval))
    assert len(held_out) == 5  # sw's eval shifted by one row; zh's still holds `moved`
    assert not held_out & set(ids(split.train))


def test_multi_language_refuses_mismatches(translations) -> None:
    with pytest.raises(PairsError, match="budgets"):
        split_multi({"sw": translations("sw")}, {"zh": 4}, holdout=2, seed=0)
    with pytest.raises(PairsError, match="holds rows of \\['sw'\\]"):
        split_multi({"zh": translations("sw")}, {"zh": 4}, holdout=2, seed=0)


def test_fingerprint_follows_content_and_order(translations) -> None:
    table = translations("sw", limit=6)
    base = pairs_fingerprint(table)
    assert base == pairs_fingerprint(translations("sw", limit=6))
    edited = table.set_column(table.column_names.index("response"), "response",
                              pa.array(["x"] + table.column("response").to_pylist()[1:]))
    assert pairs_fingerprint(edited) != base
    assert pairs_fingerprint(table.take([1, 0, 2, 3, 4, 5])) != base
    assert pairs_fingerprint(translations("zh", limit=6)) != base
    assert pairs_fingerprint(flag(table, {ids(table)[0]})) == base  # reasons do not count


def test_pairs_stage_writes_each_split_once_and_hands_on_locations(translations, tmp_path):
    """The sweep's pairs stage: one data set per (language, budget), written by content; a
    second run finds the files and writes nothing (the trials are handed these locations)."""
    import os

    import pyarrow.parquet as pq

    from clo_ray.data.pairs import pairs_key, prepare_pairs, prepare_sweep_pairs
    from clo_ray.layout import RunLayout
    from clo_ray.spec.schema import load_spec

    spec = load_spec({
        "run": {"name": "p", "storage": str(tmp_path)},
        "corpus": {"path": "builtin:parallel-sample", "format": "parallel"},
        "translator": {"backend": "parallel", "path": "builtin:parallel-sample"},
        "languages": ["sw", "yo"], "models": [{"name": "builtin:tiny-llama"}],
        "methods": ["clo"], "budgets": [4, 8], "evaluation": {"holdout": 8},
    })
    tables = {lang: translations(lang) for lang in ("sw", "yo")}
    pairs = prepare_sweep_pairs(spec, tables)
    assert sorted(pairs) == ["sw/4", "sw/8", "yo/4", "yo/8"]
    sw8 = pairs[pairs_key("sw", 8)]
    assert (sw8.n_train, sw8.n_eval, sw8.languages, sw8.budget) == (8, 8, ("sw",), "8")
    assert ids(pq.read_table(sw8.train_uri)) == ids(split_pairs(
        tables["sw"], budget=8, holdout=8, seed=spec.run.seed).train)
    assert os.path.dirname(sw8.train_uri) == RunLayout.of(spec).pairs
    assert pairs["sw/4"].eval_uri == sw8.eval_uri  # one held-out set for every budget
    stamps = {p: os.stat(p).st_mtime_ns for p in (sw8.train_uri, sw8.eval_uri)}
    assert prepare_pairs(spec, tables, ["sw"], 8) == sw8
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    both = prepare_pairs(spec, tables, ["sw", "yo"], {"sw": 4, "yo": 8})
    assert (both.languages, both.budget, both.n_train) == (("sw", "yo"), "4+8", 12)
    with pytest.raises(PairsError, match="no translations for"):
        prepare_pairs(spec, tables, ["de"], 4)
