"""``python -m clo_ray.sweep SPEC``: validate a sweep spec, then plan it or run it.

``--plan`` prints the grid, trials, data and cost estimate and starts nothing; ``--only STAGE``
runs one stage of :func:`clo_ray.sweep.runner.run_sweep`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from clo_ray.errors import CloRayError
from clo_ray.layout import RunLayout
from clo_ray.sweep.runner import STAGES, run_sweep


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
    """Entry point; returns the exit code (2 for an invalid spec or input)."""
    args = _parser().parse_args(argv)
    from clo_ray.spec.schema import load_spec
    from clo_ray.sweep.plan import build_plan, format_plan

    try:
        spec = load_spec(args.spec)
        if args.plan:
            print(format_plan(build_plan(spec)))
            return 0
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        run_sweep(spec, only=args.only)
    except CloRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results: {RunLayout.of(spec).results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
