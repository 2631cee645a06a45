"""``python -m clo_ray.report RUN_DIR``: rebuild a sweep's report from its run folder.

Reads RUN_DIR/results.parquet and the spec the sweep recorded there (report settings, ranking
metric), and writes report.md, best_trials.parquet and the PNGs (:func:`build_report`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from clo_ray.errors import CloRayError
from clo_ray.layout import RunLayout, read_spec_record
from clo_ray.report.build import ReportOptions, build_report
from clo_ray.report.schema import load_results
from clo_ray.spec.schema import SweepSpec, load_spec


def load_report_spec(run_dir: str, spec_path: str | None) -> SweepSpec | None:
    """The spec to report with: ``--spec`` (a spec file, or a run's spec record), else the
    record the sweep wrote in ``run_dir``, else None (the report's defaults)."""
    if spec_path is not None:
        recorded, data = read_spec_record(spec_path)
        return load_spec(data) if recorded is not None else load_spec(spec_path)
    record = RunLayout.of_run_dir(run_dir).read_spec_record()
    return None if record is None else load_spec(record[1])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clo_ray.report",
        description="Rebuild report.md and the plots of a sweep from RUN_DIR/results.parquet.")
    parser.add_argument("run_dir", help="the run directory (local path, s3:// or gs://)")
    parser.add_argument("--spec", help="the sweep spec, for report.metrics/plots/formats and "
                        "search.metric/mode/multi_objective (default: the spec the sweep "
                        "recorded in RUN_DIR/spec.yaml, else the defaults)")
    parser.add_argument("--out", help="where to write (default: RUN_DIR)")
    parser.add_argument("--metrics", help="comma-separated metrics, overriding the spec's")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for unreadable results or an invalid spec)."""
    args = _parser().parse_args(argv)
    try:
        spec = load_report_spec(args.run_dir, args.spec)
        options = ReportOptions.of(spec) if spec is not None else ReportOptions()
        if args.metrics:
            options = replace(options, metrics=[m.strip() for m in args.metrics.split(",")
                                                if m.strip()])
        if args.no_plots:
            options = replace(options, plots=False)
        files = build_report(load_results(args.run_dir), args.out or args.run_dir, options,
                             judgements=RunLayout.of_run_dir(args.run_dir).read_judgements())
    except CloRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in files.paths():
        print(path)
    return 0


if __name__ == "__main__":
    # The process ends without interpreter teardown: pyarrow's parquet thread pool can abort
    # it ("terminate called without an active exception", exit -6; apache/arrow#34314), which
    # turned a finished report or a clean exit 2 into a crash under load. Nothing here needs
    # atexit handlers (no Ray); the output is flushed first.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
