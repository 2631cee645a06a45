"""The paper's own tables and curves: judge win rates against SFT, benchmarks per language.

- Main table (the CLO paper's Table 2, CRPO's Table 1): rows model x {target, English}
  prompts, columns languages; each cell the trained methods' win rates against the SFT model
  of the same cell at the largest budget, ``WR ±SE`` with the length-controlled rate in
  brackets, "SFT+DPO / CLO (Δ +11.3)" when two methods are compared. From judgements.parquet
  (:mod:`clo_ray.eval.judge_export`), opponent ``sft``, the first judged prompt set; each
  cell's trial is the one the results tables show (its best trial by the search metric).
- Benchmark table: ``benchmark.<name>`` per language for the base model and each method.
- Data-size curves (the paper's Figure 3): win rate of each method at each budget against
  SFT at the largest budget (opponent ``sft_largest``), with the 95% interval as a band.

Numbers are in percent, as the papers print them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from clo_ray.report.markdown import _table
from clo_ray.report.plots import fit_title
from clo_ray.report.results import (
    BASE_METHOD,
    Results,
    format_value,
    mean_interval,
    method_label,
)
from clo_ray.spec.grid import Cell

SIDES = (("target", "target prompts"), ("english", "English prompts"))


def _judgement(res: Results, judgements: Sequence[dict[str, Any]], cell: Cell,
               opponent: str, prompt_set: str, side: str) -> dict[str, Any] | None:
    """The cell's comparison: its best trial's judgement, or with repeats the mean over the
    repeats' judgements (``seeds`` > 1: ``ci_low`` / ``ci_high`` then span the seeds)."""
    found = [j for trial in res.repeats(cell) for j in judgements
             if j["trial_id"] == trial["trial_id"] and j["opponent"] == opponent
             and j["prompt_set"] == prompt_set and j["side"] == side
             and j.get("win_rate") is not None]
    if len(found) < 2:
        return dict(found[0], seeds=1) if found else None
    mean, half, n = mean_interval([j["win_rate"] for j in found])
    lcs = [j["length_controlled_winrate"] for j in found
           if j.get("length_controlled_winrate") is not None]
    return {"win_rate": mean, "standard_error": half, "ci_low": mean - half,
            "ci_high": mean + half, "seeds": n,
            "length_controlled_winrate": sum(lcs) / len(lcs) if len(lcs) == n else None}


def _rate(j: dict[str, Any] | None) -> str:
    if j is None:
        return "n/a"
    spread = f"±{j['standard_error']:.1f}" if j["seeds"] == 1 else \
        f"±{j['standard_error']:.1f} ({j['seeds']} seeds)"
    text = f"{j['win_rate']:.1f} {spread}"
    lc = j.get("length_controlled_winrate")
    return text + (f" [LC {lc:.1f}]" if lc is not None else "")


def main_table(res: Results, judgements: Sequence[dict[str, Any]], prompt_set: str) -> list[str]:
    """Markdown lines of the main table (module docstring); [] when nothing was judged."""
    # the paper's order: the baseline(s) first, CLO last, so Δ is CLO minus the baseline
    methods = [m for m in res.methods if m not in ("sft", "clo")] + (
        ["clo"] if "clo" in res.methods else [])
    if not judgements or not methods:
        return []
    rows = []
    for model in res.models:
        for side, label in SIDES:
            cells, judged = [], False
            for language in res.languages:
                budgets = res.budgets(model, language)
                found = [_judgement(res, judgements, Cell(model, language, m, budgets[-1]),
                                    "sft", prompt_set, side) if budgets else None
                         for m in methods]
                judged = judged or any(found)
                text = " / ".join(_rate(j) for j in found)
                if len(found) == 2 and all(found):
                    delta = found[1]["win_rate"] - found[0]["win_rate"]  # type: ignore[index]
                    text += f" (Δ {delta:+.1f})"
                cells.append(text)
            if judged:  # a side no prompt was judged on (a set with english: false): no row
                rows.append([model, label, *cells])
    legend = " / ".join(method_label(m) for m in methods)
    return [f"## Judge win rate against SFT (prompt set `{prompt_set}`)", "",
            f"Each cell: {legend}, win rate (%) against the SFT model of the same cell at the "
            "largest budget, ±standard error over the prompts (alpaca_eval's definitions), or "
            "with repeats the mean over seeds ±its 95% interval; [LC] the length-controlled "
            "rate beside it; 50 is parity. Every comparison, with intervals and the prompts "
            "the judge could not rate, is in judgements.parquet.",
            "", *_table(["model", "prompts", *res.languages], rows)]


def benchmark_table(res: Results, benchmarks: Sequence[str]) -> list[str]:
    """Markdown lines: per benchmark, rows model x (base, methods), columns languages (the
    target language's task, English's in brackets); [] when no benchmark was run."""
    out: list[str] = []
    for name in benchmarks:
        metric = f"benchmark.{name}"
        if not res.has_data(metric):
            continue
        rows = []
        for model in res.models:
            base = [res.base_value(model, lang, metric) for lang in res.languages]
            if any(v is not None for v in base):
                rows.append([model, method_label(BASE_METHOD), *(_pct(v) for v in base)])
            for method in res.methods:
                texts = []
                for language in res.languages:
                    budgets = res.budgets(model, language, method)
                    cell = Cell(model, language, method, budgets[-1]) if budgets else None
                    target = res.value(cell, metric) if cell else None
                    english = res.value(cell, f"{metric}.en") if cell else None
                    texts.append(_pct(target) + (f" [en {_pct(english)}]"
                                                 if english is not None else ""))
                rows.append([model, method_label(method), *texts])
        out += [f"## Benchmark: {name}", "",
                "Accuracy (%) of each cell's best trial at its largest budget in the target "
                "language, [en] the English task (retention).", "",
                *_table(["model", "method", *res.languages], rows)]
    return out


def judge_curves(res: Results, judgements: Sequence[dict[str, Any]],
                 prompt_set: str) -> bytes | None:
    """PNG: win rate vs budget against SFT at the largest budget, 95% band; None when no
    ``sft_largest`` comparison exists."""
    from matplotlib.figure import Figure

    if not any(j["opponent"] == "sft_largest" for j in judgements):
        return None
    nrows, ncols = max(len(res.models), 1), max(len(res.languages), 1)
    fig = Figure(figsize=(0.6 + 3.6 * ncols, 1.4 + 2.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, model in enumerate(res.models):
        for j, language in enumerate(res.languages):
            ax = axes[i][j]
            for k, method in enumerate(res.methods):
                points = []
                for budget in res.budgets(model, language, method):
                    found = _judgement(res, judgements, Cell(model, language, method, budget),
                                       "sft_largest", prompt_set, "target")
                    if found is not None:
                        points.append((budget, found))
                if not points:
                    continue
                xs = [b for b, _ in points]
                ax.plot(xs, [p["win_rate"] for _, p in points], marker="o", color=f"C{k}",
                        label=method_label(method))
                ax.fill_between(xs, [p["ci_low"] for _, p in points],
                                [p["ci_high"] for _, p in points], color=f"C{k}", alpha=0.2)
            ax.axhline(50, linestyle="--", color="gray", linewidth=1.0)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model} · {language}", fontsize=9)
            ax.set_xlabel("training pairs", fontsize=8)
            ax.set_ylabel("win rate vs SFT@max (%)", fontsize=8)
            ax.grid(True, alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=len(handles), fontsize=8)
    fig.suptitle(fit_title(f"Judge win rate vs training pairs, against SFT at the largest "
                           f"budget ({prompt_set}, target prompts; band: 95% interval)",
                           0.6 + 3.6 * ncols), fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _pct(value: float | None) -> str:
    return format_value("target_fidelity", value)  # a share, shown in percent
