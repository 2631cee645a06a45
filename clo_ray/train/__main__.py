"""``python -m clo_ray.train SPEC --model M --language L --method METHOD --budget N``.

Runs one training alone, exactly as a sweep trial runs it (:func:`run_training`), and prints
where the run's results and its final checkpoint landed. ``--language`` may repeat
(multi-target CLO: ``--budget`` pairs per language). ``--set lr=1e-4`` applies a search
override; ``--export DIR`` also writes the merged full model (for eval or vLLM). Ray starts
locally unless ``--address`` (or ``RAY_ADDRESS``) names a cluster; re-running the same
``--run-name`` resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import yaml

from clo_ray.cli_args import positive_int, positive_number
from clo_ray.errors import CloRayError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clo_ray.train", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="sweep spec YAML")
    parser.add_argument("--model", required=True, help="builtin:NAME, a model dir or a hub id")
    parser.add_argument("--language", action="append", required=True,
                        help="target language code; repeat for multi-target training")
    parser.add_argument("--method", required=True, help="a method of the spec (clo, sft, ...)")
    parser.add_argument("--budget", type=positive_int, required=True,
                        help="training pairs per language")
    parser.add_argument("--run-name", help="Ray run name (default: model-langs-method-budget)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="search override, e.g. lr=1e-4, dpo.beta=0.2, schedule=NAME")
    parser.add_argument("--export", metavar="DIR", help="also export the merged model to DIR")
    parser.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    parser.add_argument("--num-cpus", type=positive_number,
                        help="CPUs of a local Ray (default: all)")
    return parser.parse_args(argv)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, values read as YAML (numbers, lists, strings)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise CloRayError(f"--set {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(text)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import ray

    from clo_ray.data.pairs import prepare_pairs
    from clo_ray.ray_env import driver_runtime_env, ray_address
    from clo_ray.spec.schema import load_spec
    from clo_ray.train.checkpoint import export_model
    from clo_ray.train.trainer import TrainRun, method_stages, run_training
    from clo_ray.translate.stage import load_translations

    try:
        spec = load_spec(args.spec)
        overrides = parse_overrides(args.set)
        method_stages(spec, args.method, overrides)  # bad --set values fail before Ray starts
    except CloRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        address = ray_address(args.address)
        ray.init(address=address, num_cpus=args.num_cpus if address == "local" else None,
                 runtime_env=driver_runtime_env())
    try:
        tables = load_translations(spec, list(args.language))
        pairs = prepare_pairs(spec, tables, args.language, args.budget)
        result = run_training(spec, pairs, model=args.model, method=args.method,
                              overrides=overrides, run=TrainRun(name=args.run_name))
    except CloRayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(f"results: {result.path}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    print(f"metrics: {json.dumps(metrics, sort_keys=True)}")
    if args.export and result.checkpoint:
        with result.checkpoint.as_directory() as directory:
            print(f"exported: {export_model(directory, args.export)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
