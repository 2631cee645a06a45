"""``python -m clo_ray.translate SPEC``: run the translate stage of a sweep alone.

Translates the spec's corpus into its languages (or ``--languages``) with its translator,
into the translate-once cache under ``run.storage`` (a later sweep reuses it), and prints
one line per language plus the quality report. Ray starts (locally, unless RAY_ADDRESS or
``ray job submit`` points at a cluster) only if something is left to translate::

    python -m clo_ray.translate sweeps/smoke.yaml
    ray job submit --working-dir . -- python -m clo_ray.translate sweeps/paper.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from clo_ray.cli_args import positive_int
from clo_ray.errors import CloRayError


def _parser() -> argparse.ArgumentParser:
    from clo_ray.translate.stage import DEFAULT_PART_ROWS

    parser = argparse.ArgumentParser(
        prog="python -m clo_ray.translate",
        description="Translate a sweep's corpus into its target languages (cached).")
    parser.add_argument("spec", help="the sweep spec, e.g. sweeps/smoke.yaml")
    parser.add_argument("--languages", help="comma-separated subset of the spec's languages")
    parser.add_argument("--part-rows", type=positive_int, default=DEFAULT_PART_ROWS, metavar="N",
                        help="finished rows per part file: what an interrupted run keeps "
                             f"(default {DEFAULT_PART_ROWS})")
    parser.add_argument("--quiet", action="store_true", help="only warnings and the summary")
    return parser


def _summary(results: dict) -> str:
    """One line per language, then the quality report of all of them."""
    import pyarrow as pa

    from clo_ray.translate.cache import read_table
    from clo_ray.translate.quality import format_report

    header = f"{'language':<9}{'rows':>6}{'accepted':>10}{'rejected':>10}{'new':>6}" \
             f"{'retried':>9}{'seconds':>9}  cache"
    lines = [header]
    for lang, r in results.items():
        lines.append(f"{lang:<9}{r.rows:>6}{r.accepted:>10}{r.rejected:>10}{r.translated:>6}"
                     f"{r.retried:>9}{r.seconds:>9.1f}  {r.uri}")
    reports = [read_table(r.report) for r in results.values()]
    lines += ["", "quality checks (rows failing each; a row can fail several):",
              format_report(pa.concat_tables(reports))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for an invalid spec or unusable inputs)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from clo_ray.spec.schema import load_spec
    from clo_ray.translate.stage import translate_corpus

    try:
        spec = load_spec(args.spec)
        languages = args.languages.split(",") if args.languages else None
        results = translate_corpus(spec, languages=languages, part_rows=args.part_rows)
    except CloRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
