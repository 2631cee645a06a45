"""``python -m clo_ray.sweep SPEC``: validate a sweep spec, then plan it or run it.

``--plan`` prints the grid, trials, data and cost estimate and starts nothing; ``--only STAGE``
runs one stage of :func:`clo_ray.sweep.runner.run_sweep`.

Exit codes: 0 finished; 1 finished with failed trials (each printed with its error's first
line and log; ``--allow-failed-trials`` makes that 0); 2 invalid spec or input, or a cluster
that cannot run a trial; 130 interrupted (Ctrl-C): re-run the same command to resume.
"""

from __future__ import annotations

import argparse
import sys

from clo_ray.cli_args import positive_number
from clo_ray.errors import CloRayError
from clo_ray.layout import RunLayout
from clo_ray.sweep.console import configure_logging
from clo_ray.sweep.outcome import EXIT_INTERRUPTED, EXIT_TRIALS_FAILED, SweepInterrupted
from clo_ray.sweep.runner import STAGES, TrialsFailed, run_sweep


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
    parser.add_argument("--address", help="join the Ray cluster at this address (default: "
                                          "RAY_ADDRESS when set, else start a local Ray)")
    parser.add_argument("--placement-timeout", type=positive_number, metavar="SECONDS",
                        help="how long a trial's train workers may wait for resources before "
                             "the trial fails (default 1800)")
    parser.add_argument("--verbose", action="store_true",
                        help="print everything Ray, Tune, the workers and the libraries print "
                             "(default: our progress lines; the rest goes to log files)")
    parser.add_argument("--takeover", action="store_true",
                        help="take the run's lease from a driver that looks alive but is gone "
                             "(its node lost; by default an unrenewed lease expires in 2 min)")
    parser.add_argument("--allow-failed-trials", action="store_true",
                        help="exit 0 even when some trials failed (they are still listed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (module docstring)."""
    args = _parser().parse_args(argv)
    from clo_ray.spec.schema import load_spec
    from clo_ray.sweep.plan import build_plan, format_plan
    from clo_ray.sweep.preflight import model_problems

    resume = f"re-run `python -m clo_ray.sweep {args.spec}` to resume"
    try:
        spec = load_spec(args.spec)
        if args.plan:  # planned anywhere (a laptop plans a cluster's sweep): models warn here
            print(format_plan(build_plan(spec)))
            if problems := model_problems(spec):
                print("\nwarning: model references that will not resolve on this machine "
                      "(a sweep started here refuses them):\n  " + "\n  ".join(problems))
            return 0
        configure_logging(args.verbose)
        run_sweep(spec, only=args.only, address=args.address,
                  allow_failed_trials=args.allow_failed_trials, label=args.spec,
                  placement_timeout_s=args.placement_timeout, verbose=args.verbose,
                  takeover=args.takeover)
    except TrialsFailed as failed:
        print(f"\n{failed}\nresults: {RunLayout.of(spec).results}", file=sys.stderr)
        return EXIT_TRIALS_FAILED
    except SweepInterrupted as err:
        print(f"\n{err}\nno results or report written: {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished work is kept in storage; {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CloRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"results: {RunLayout.of(spec).results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
