"""``python -m clo_ray.sweep SPEC``: run a sweep (spec -> translate -> pairs -> reference ->
tune -> evaluate -> report), or with ``--plan`` validate the spec and print its plan.

Launch on a Ray cluster with ``ray job submit --working-dir . -- python -m clo_ray.sweep
sweeps/paper.yaml``; relative paths in the spec are relative to that working directory.
Today only ``--plan`` is implemented: the stages arrive with the Sweep issue.
"""

from __future__ import annotations

import argparse
import sys

from clo_ray.errors import CloRayError

STAGES = ("translate", "pairs", "reference", "tune", "evaluate", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clo_ray.sweep",
        description="Run a CLO sweep described by a YAML spec (see sweeps/*.yaml).")
    parser.add_argument("spec", help="the sweep spec, e.g. sweeps/smoke.yaml")
    parser.add_argument("--plan", action="store_true",
                        help="validate the spec and print grid cells, trials, data and an "
                             "estimated GPU-hour cost; starts nothing")
    parser.add_argument("--only", choices=STAGES, metavar="STAGE",
                        help=f"run one stage only ({', '.join(STAGES)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for an invalid spec or an unavailable mode)."""
    args = _parser().parse_args(argv)
    from clo_ray.plan import build_plan, format_plan
    from clo_ray.spec import load_spec

    try:
        spec = load_spec(args.spec)
        if not args.plan:
            print(f"spec {args.spec} is valid, but the sweep runner (stages: "
                  f"{', '.join(STAGES)}) arrives with the Sweep issue; for now run\n"
                  f"  python -m clo_ray.sweep {args.spec} --plan", file=sys.stderr)
            return 2
        print(format_plan(build_plan(spec)))
    except CloRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
