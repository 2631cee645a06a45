"""The report stage: paper-style tables, budget table, best configs, plots, the CLI.

A synthetic results table with planted values stands in for a sweep: 2 models x 2 languages x
3 methods x 3 budgets x 2 trials, base rows, a failed trial, a multi-target trial, no judge
column. In every cell trial 1 has the better objective and trial 0 the better raw metric,
so a table that showed the metric's maximum instead of the best trial's value would fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from clo_ray.report.__main__ import main
from clo_ray.report.build import ReportOptions, build_report
from clo_ray.report.fidelity_table import wilson_interval
from clo_ray.report.results import format_value, metric_mode, pareto_front
from clo_ray.report.schema import RESULTS_SCHEMA, ResultsError, load_results, validate_results

MODELS, LANGS, BUDGETS = ("m-a", "m-b"), ("sw", "ko"), (200, 800, 3200)
QUALITY = {"clo": 0.7, "sft": 0.5, "sft_dpo": 0.6}
# Planted: the best trial (by objective) of m-a / sw at 3200 pairs, per method.
PLANTED_FIDELITY = {"clo": 0.721, "sft": 0.550, "sft_dpo": 0.603}
PLANTED_NLL = {"clo": 1.234, "sft": 2.5, "sft_dpo": 1.98}


def _trial(model: str, lang: str, method: str, budget: int, k: int, **metrics) -> dict:
    return {"run": "synthetic", "trial_id": f"{model}-{lang}-{method}-{budget}-{k}",
            "model": model, "language": lang, "method": method, "budget": budget,
            "status": "completed", "params": json.dumps({"lr": 1e-4 * (k + 1),
                                                         "schedule": method}),
            "checkpoint": f"runs/x/{model}-{lang}-{method}-{budget}-{k}",
            "train_seconds": 10.0, "train_tokens": 1000, **metrics}


def synthetic_rows() -> list[dict]:
    rows = []
    for mi, model in enumerate(MODELS):
        for lang in LANGS:
            rows.append(_trial(model, lang, "base", 0, 0, objective=0.1, target_fidelity=0.1,
                               english_retention=0.99, target_nll=4.0)
                        | {"trial_id": f"{model}-{lang}-base", "params": None,
                           "train_seconds": 0.0, "train_tokens": 0})
            for method, q in QUALITY.items():
                for bi, budget in enumerate(BUDGETS):
                    for k in range(2):
                        fidelity = round(q - 0.1 * (2 - bi) - 0.02 * mi, 4) if k else 0.95
                        nll = round(3.0 - 0.5 * bi - q, 4) if k else 0.5
                        if (model, lang, budget) == ("m-a", "sw", 3200) and k:
                            fidelity, nll = PLANTED_FIDELITY[method], PLANTED_NLL[method]
                        rows.append(_trial(
                            model, lang, method, budget, k,
                            objective=q + 0.1 * bi + 0.05 * k, target_fidelity=fidelity,
                            english_retention=0.9 - 0.1 * k, target_nll=nll,
                            english_nll=2.0, preference_accuracy=0.6 + 0.1 * k,
                            **{"lm_eval.belebele": 0.3 + 0.01 * k}))
    rows.append(_trial("m-b", "ko", "clo", 3200, 9, objective=99.0, target_fidelity=0.0)
                | {"status": "failed", "checkpoint": None})
    rows.append(_trial("m-a", "sw+yo", "clo", 800, 0, objective=0.5, target_fidelity=0.444))
    return rows


@pytest.fixture(scope="module")
def results() -> pa.Table:
    rows = synthetic_rows()
    columns = {c: [r.get(c) for r in rows] for c in dict.fromkeys(k for r in rows for k in r)}
    schema = pa.schema([RESULTS_SCHEMA.field(c) if c in RESULTS_SCHEMA.names
                        else pa.field(c, pa.float64()) for c in columns])
    return pa.table(columns, schema=schema)


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    files = build_report(results, str(out), ReportOptions(metrics=None, title="Synthetic sweep"))
    return files, (out / "report.md").read_text()


def _line(text: str, start: str) -> str:
    """The first line of ``text`` starting with ``start`` (tables are found by their row)."""
    return next(line for line in text.splitlines() if line.startswith(start))


def _section(text: str, heading: str) -> str:
    rest = text.split(heading + "\n", 1)[1]
    return rest.split("\n## ", 1)[0].split("\n### ", 1)[0]


def test_paper_table_shows_best_trial_by_objective(report):
    _, md = report
    assert md.startswith("# Synthetic sweep\n")
    assert "- run: synthetic" in md and "- trials: 74 in 37 cells" in md
    fidelity = _section(md, "### target_fidelity (%)")
    assert "Each cell: CLO / SFT / SFT+DPO at the largest budget (3200 pairs" in fidelity
    assert _line(fidelity, "| model |") == "| model | ko | sw | sw+yo |"
    # The decoy trials (fidelity 0.95, worse objective) are never shown; best in bold.
    assert "| **72.1** / 55.0 / 60.3 |" in _line(fidelity, "| m-a |")
    assert "95.0" not in fidelity
    # m-b / ko / clo at 3200: the failed trial's objective 99 does not win.
    assert _line(fidelity, "| m-b |").startswith("| m-b | **68.0** / 48.0 / 58.0 |")
    # The multi-target trial has its own column at its own (smaller) budget.
    assert _line(fidelity, "| m-a |").endswith("| 44.4 / n/a / n/a (@800) |")
    assert _line(fidelity, "| m-b |").endswith("| n/a |")
    # NLL: 3 significant digits, lower is better.
    nll = _section(md, "### target_nll (lower is better)")
    assert "| **1.23** / 2.50 / 1.98 |" in _line(nll, "| m-a |")
    # Target-language and English metrics are separate tables.
    assert md.index("## Target language") < md.index("### target_fidelity")
    assert md.index("## English (retention)") < md.index("### english_retention (%)")
    assert md.index("## Overall") < md.index("### objective")


def test_budget_table_has_base_column_and_every_budget(report):
    _, md = report
    table = _section(md.split("## Data budget", 1)[1], "### target_fidelity (%)")
    assert _line(table, "| model |") == ("| model | language | method | 0 (base) | 200 | 800 "
                                         "| 3200 |")
    assert _line(table, "| m-a | sw | base |") == "| m-a | sw | base | 10.0 |  |  |  |"
    assert _line(table, "| m-a | sw | CLO |") == "| m-a | sw | CLO |  | 50.0 | 60.0 | 72.1 |"
    assert _line(table, "| m-b | ko | SFT |") == "| m-b | ko | SFT |  | 28.0 | 38.0 | 48.0 |"
    # A budget a method never ran at is "-"; a method that never ran there has no row.
    assert _line(table, "| m-a | sw+yo | CLO |") == "| m-a | sw+yo | CLO |  | - | 44.4 | - |"
    assert "| m-a | sw+yo | SFT |" not in table


def test_best_config_per_cell(report):
    _, md = report
    configs = _section(md, "## Best config per cell")
    assert _line(configs, "| model |") == ("| model | language | method | budget | trial | "
                                           "objective | params |")
    assert _line(configs, "| m-a | sw | CLO | 3200 |") == (
        '| m-a | sw | CLO | 3200 | m-a-sw-clo-3200-1 | 0.950 | '
        '`{"lr": 0.0002, "schedule": "clo"}` |')
    assert len([ln for ln in configs.splitlines() if ln.startswith("| m-")]) == 37


def test_trials_summary_pareto_and_notes(report):
    _, md = report
    trials = _section(md, "## Trials")
    assert _line(trials, "| CLO |") == "| CLO | 26 | 25 | 0 | 1 | 0 | 260 | 0.07 | 26,000 |"
    assert _line(trials, "| total |") == "| total | 74 | 73 | 0 | 1 | 0 | 740 | 0.21 | 74,000 |"
    pareto = _section(md, "## Pareto front: objective vs data budget")
    assert ("| m-a | sw | 200: CLO 0.750 (m-a-sw-clo-200-1); 800: CLO 0.850 (m-a-sw-clo-800-1); "
            "3200: CLO 0.950 (m-a-sw-clo-3200-1) |") in pareto
    notes = _section(md, "## Notes")
    assert "1 failed trial(s), not ranked: m-b-ko-clo-3200-9 (m-b / ko / CLO / 3200)" in notes
    assert "sw+yo: multi-target trials" in notes
    assert "![budget_curves_target_fidelity](budget_curves_target_fidelity.png)" in md


def test_missing_metric_column_is_na_with_a_note(results, tmp_path):
    build_report(results, str(tmp_path), ReportOptions(
        metrics=["judge_win_rate", "target_fidelity"], plots=False, formats=["md"]))
    md = (tmp_path / "report.md").read_text()
    assert "| m-a | n/a / n/a / n/a | n/a / n/a / n/a | n/a / n/a / n/a (@800) |" in md
    assert "`judge_win_rate`: no such column in the results (not measured): n/a." in md
    assert not (tmp_path / "best_trials.parquet").exists()


def test_plots_exist_and_open(report):
    files, _ = report
    names = [p.rsplit("/", 1)[-1] for p in files.plots]
    assert names == ["budget_curves_objective.png", "budget_curves_target_fidelity.png",
                     "budget_curves_english_retention.png", "budget_curves_target_nll.png",
                     "budget_curves_preference_accuracy.png", "pareto_objective.png"]
    for path in files.plots:
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_best_trials_parquet_carries_extra_columns(report):
    files, _ = report
    table = pq.read_table(files.tables)
    assert table.num_rows == 37 and "lm_eval.belebele" in table.column_names
    row = next(r for r in table.to_pylist() if r["trial_id"] == "m-a-sw-clo-3200-1")
    assert row["target_fidelity"] == pytest.approx(0.721)


def test_pareto_front_hand_made():
    # (cost, quality): b dominates a (cheaper-or-equal, better); e equals d (both stay);
    # f costs more than d for the same quality (dominated); g is the costly best.
    points = [(2, 0.5), (1, 0.6), (4, 0.7), (8, 0.7), (8, 0.7), (16, 0.7), (32, 0.9)]
    assert pareto_front(points) == [1, 2, 6]
    assert pareto_front([(1, 1.0), (1, 1.0)]) == [0, 1]
    # Minimised quality (an NLL): the cheap point with the lowest loss, then lower ones.
    assert pareto_front([(1, 3.0), (2, 2.0), (4, 2.5), (8, 1.0)], maximize=False) == [0, 1, 3]
    assert pareto_front([]) == []


def test_modes_and_formatting(results, tmp_path):
    assert metric_mode("target_nll", mode="max") == "min"
    assert metric_mode("objective", mode="min") == "min"
    assert metric_mode("target_fidelity", mode="min") == "max"
    assert [format_value("target_nll", v) for v in (2.0, 1234.5, 0.012345, None)] == [
        "2.00", "1.23e+03", "0.0123", "n/a"]
    assert format_value("judge_win_rate", 0.8304) == "83.0"
    # mode="min" on the objective picks trial 0 (the decoy) instead.
    build_report(results, str(tmp_path),
                 ReportOptions(metrics=["target_fidelity"], mode="min", plots=False))
    md = (tmp_path / "report.md").read_text()
    assert "| m-a | 95.0 / 95.0 / 95.0 | 95.0 / 95.0 / 95.0 | 44.4 / n/a / n/a (@800) |" in md


@pytest.mark.parametrize("keep", [{"method": "clo"}, {"budget": 800}])
def test_one_method_or_one_budget_does_not_crash(results, tmp_path, keep):
    (column, value), = keep.items()
    rows = [r for r in results.to_pylist() if r[column] == value]
    files = build_report(pa.Table.from_pylist(rows, schema=results.schema), str(tmp_path),
                         ReportOptions(metrics=["target_fidelity"]))
    md = (tmp_path / "report.md").read_text()
    assert "## Best config per cell" in md and files.plots
    if column == "method":
        assert "Each cell: CLO at the largest budget" in md and "only one method" in md
    else:
        assert "## Pareto front" not in md and "| **60.0** / 40.0 / 50.0 |" in md
    for path in files.plots:
        assert imread(path).shape[0] > 0


def test_empty_results_do_not_crash(results, tmp_path):
    files = build_report(results.slice(0, 0), str(tmp_path))
    assert files.plots == [] and "the results hold no trained trials" in (
        tmp_path / "report.md").read_text()


def test_cli_rebuilds_from_run_dir(results, tmp_path, capsys):
    pq.write_table(results, tmp_path / "results.parquet")
    out = tmp_path / "out"
    assert main([str(tmp_path), "--out", f"file://{out}", "--metrics",
                 "target_fidelity,target_nll"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[-1] for p in printed) == [
        "best_trials.parquet", "budget_curves_target_fidelity.png",
        "budget_curves_target_nll.png", "pareto_objective.png", "report.md"]
    assert "| **72.1** / 55.0 / 60.3 |" in (out / "report.md").read_text()
    assert imread(out / "budget_curves_target_nll.png").shape[0] > 0


def test_cli_uses_the_spec(results, tmp_path):
    pq.write_table(results, tmp_path / "results.parquet")
    assert main([str(tmp_path), "--spec", "sweeps/smoke.yaml", "--no-plots"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# smoke\n") and "### english_nll (lower is better)" in md
    assert not list(tmp_path.glob("*.png"))


def test_missing_required_column_names_column_and_file(results, tmp_path):
    path = tmp_path / "results.parquet"
    pq.write_table(results.drop_columns(["status"]), path)
    with pytest.raises(ResultsError, match=rf"{path}: missing required column\(s\) 'status'"):
        load_results(str(tmp_path))
    with pytest.raises(ResultsError, match="column 'budget' has type string"):
        validate_results(results.set_column(5, "budget", pa.array(["x"] * results.num_rows)),
                         "r.parquet")
    proc = subprocess.run([sys.executable, "-m", "clo_ray.report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'status'" in proc.stderr and str(path) in proc.stderr


def test_without_objective_each_metric_falls_back_to_its_own_best(results, tmp_path):
    build_report(results.drop_columns(["objective"]), str(tmp_path), ReportOptions(
        plots=False, metrics=["target_fidelity", "target_nll"], formats=["md"]))
    md = (tmp_path / "report.md").read_text()
    # Own best: the decoys' 95.0 fidelity (max) and 0.500 NLL (min) now win.
    assert "| m-a | 95.0 / 95.0 / 95.0 |" in md and "| m-a | 0.500 / 0.500 / 0.500 |" in md
    assert "37 cell(s) have no trial with `objective`: there each metric shows its own" in md
    assert "`objective`" not in _section(md, "## Notes").split("37 cell(s)")[0]


def test_the_papers_table_curves_and_benchmarks_from_judgements(tmp_path) -> None:
    """The paper's main table (SFT+DPO / CLO against SFT, WR ±SE [LC], Δ), its data-size
    curves against SFT at the largest budget, and the benchmark table, from a results file
    with SFT, SFT+DPO and CLO rows and a judgements table."""
    from clo_ray.eval.judge_export import judgements_table

    rows = synthetic_rows()
    for row in rows:  # a benchmark column: base 30%, trained 40% + 1 point per method
        if row["language"] in LANGS:
            row["benchmark.belebele"] = 0.30 if row["method"] == "base" else \
                0.40 + 0.01 * list(QUALITY).index(row["method"])
            row["benchmark.belebele.en"] = 0.8
    table = pa.Table.from_pylist(rows)
    best = {}  # the trial each cell's tables show: k = 1 has the better objective
    lines = []
    for model in MODELS:
        for lang in LANGS:
            for method in ("clo", "sft_dpo", "sft"):
                for budget in BUDGETS:
                    trial = f"{model}-{lang}-{method}-{budget}-1"
                    best[(model, lang, method, budget)] = trial
                    rate = {"clo": 70.4, "sft_dpo": 59.1, "sft": 50.0}[method] - 3 * (
                        BUDGETS.index(budget) != 2)
                    for opponent in ("sft", "sft_largest"):
                        if method == "sft" and opponent == "sft":
                            continue
                        for side in ("target", "english"):
                            lines.append({
                                "run": "synthetic", "trial_id": trial, "model": model,
                                "language": lang, "method": method, "budget": budget,
                                "opponent": opponent, "prompt_set": "alpaca", "side": side,
                                "n_items": 805, "failed": 0, "unparseable": 0,
                                "win_rate": rate if side == "target" else rate - 10,
                                "standard_error": 1.6, "ci_low": rate - 3.1,
                                "ci_high": rate + 3.1, "length_controlled_winrate": rate - 1,
                                "failed_items": "[]", "unparseable_items": "[]"})
            # a worse trial of the same cell, judged too: the table must not show it
            lines.append(dict(lines[-1], trial_id=f"{model}-{lang}-clo-3200-0", win_rate=99.0,
                              side="target", opponent="sft", method="clo", budget=3200))
    files = build_report(table, str(tmp_path), ReportOptions(prompt_set="alpaca",
                                                             benchmarks=("belebele",)),
                         judgements=judgements_table(lines))
    report = (tmp_path / "report.md").read_text()
    assert "## Judge win rate against SFT (prompt set `alpaca`)" in report
    header = "| model | prompts | ko | sw |"  # the paper's language order: ko before sw
    assert header.replace("ko | sw", "sw | ko") in report or header in report
    cell = "59.1 ±1.6 [LC 58.1] / 70.4 ±1.6 [LC 69.4] (Δ +11.3)"
    target_row = next(line for line in report.splitlines()
                      if line.startswith("| m-a | target prompts |"))
    assert target_row.count(cell) == 2, target_row  # both languages, the best trials only
    english_row = next(line for line in report.splitlines()
                       if line.startswith("| m-a | English prompts |"))
    assert "49.1 ±1.6 [LC 58.1] / 60.4 ±1.6 [LC 69.4] (Δ +11.3)" in english_row
    assert "## Benchmark: belebele" in report
    assert "| m-a | base | 30.0 | 30.0 |" in report
    assert "| m-a | CLO | 40.0 [en 80.0] | 40.0 [en 80.0] |" in report
    curves = tmp_path / "judge_win_rate_vs_sft_largest.png"
    assert str(curves) in files.plots and imread(curves).shape[0] > 100


def test_wilson_interval_against_a_hand_computation() -> None:
    # 24 of 48: centre (0.5 + z²/96) / (1 + z²/48) = 0.5; half-width
    # z * sqrt(0.25/48 + z²/(4 * 48²)) / (1 + z²/48) = 0.1361067 with z = 1.959964
    low, high = wilson_interval(0.5, 48)
    assert low == pytest.approx(0.3638933, abs=1e-6)
    assert high == pytest.approx(0.6361067, abs=1e-6)
    assert wilson_interval(0.0, 8)[0] == 0.0 and 0.3 < wilson_interval(0.0, 8)[1] < 0.33
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_prompt_set_fidelity_table_shows_base_methods_and_intervals(tmp_path) -> None:
    """Prompt-set fidelity per cell with a Wilson interval over the set's prompts (one
    training), or the mean over seeds with its interval (repeats); the base model first."""
    rows = [_trial("m-a", "sw", "base", 0, 0, objective=None, target_fidelity=0.5)
            | {"trial_id": "m-a-sw-base", "params": None, "prompts.builtin.target_fidelity":
               0.5, "prompts.builtin.n_target": 48.0, "repeat": 0}]  # first row: every key
    for method, rate in (("clo", 0.75), ("sft", 0.25)):
        rows.append(_trial("m-a", "sw", method, 16, 0, objective=1.0, target_fidelity=rate)
                    | {"prompts.builtin.target_fidelity": rate,
                       "prompts.builtin.n_target": 48.0, "repeat": 0})
    # CLO repeated with a second seed: its cell becomes the mean over both seeds
    rows.append(_trial("m-a", "sw", "clo", 16, 1, objective=0.5, target_fidelity=0.5)
                | {"prompts.builtin.target_fidelity": 0.65, "prompts.builtin.n_target": 48.0,
                   "repeat": 1})
    build_report(pa.Table.from_pylist(rows), str(tmp_path), ReportOptions(plots=False))
    report = (tmp_path / "report.md").read_text()
    assert "## Language fidelity on the prompt sets" in report
    row = _line(report, "| m-a | builtin | target |")
    base, clo, sft = row.split("|")[4].strip().split(" / ")
    assert base == "50.0 [36.4, 63.6]"  # 24 of 48, as in the hand computation above
    assert clo.startswith("70.0 ±") and clo.endswith("(2 seeds)")
    low, high = (100 * v for v in wilson_interval(0.25, 48))
    assert sft == f"25.0 [{low:.1f}, {high:.1f}]"
    assert "| m-a | builtin | English |" not in report  # no English answers: no row
