"""clo-ray: Cross-Lingual Optimization (CLO) as a distributed Ray sweep engine.

``from clo_ray import load_spec, build_tuner, run_sweep``: the spec loader is light; the two
Ray entry points are imported on first use, so ``import clo_ray`` does not start Ray.
"""

from typing import Any

from clo_ray.spec.schema import load_spec

__all__ = ["build_tuner", "load_spec", "run_sweep"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "build_tuner":
        from clo_ray.tune.tuner import build_tuner

        return build_tuner
    if name == "run_sweep":
        from clo_ray.sweep.runner import run_sweep

        return run_sweep
    raise AttributeError(f"module 'clo_ray' has no attribute {name!r}")
